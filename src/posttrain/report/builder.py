"""The analysis of one directory: settings, the :class:`Report` that assembles report.md from its sections.

Sections live in small mixin modules (tables, study, structure, spread, runs); docs/design.md "Report" is the contract.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from posttrain import stats
from posttrain.report.format import CANCELLED, LORA_ORDER, PLOTS_DIR, scale_key
from posttrain.report.labels import short_labels
from posttrain.report.loading import Loaded, select_cells
from posttrain.report.runs import RunsSections
from posttrain.report.spread import SpreadSections
from posttrain.report.structure import StructureSections
from posttrain.report.study import StudySections
from posttrain.report.tables import TablesSections
from posttrain.results import COMPLETED


@dataclass
class Settings:
    metrics: list[str]
    baseline: str | None
    alpha: float
    correction: str
    seed: int
    n_resamples: int
    effect: float = stats.DEFAULT_EFFECT
    power: float = stats.DEFAULT_POWER


@dataclass
class Analysis:
    """The tables a report is made of (report.md, the CSVs and W&B all draw from these)."""

    summary: pd.DataFrame
    comparisons: pd.DataFrame
    inversions: pd.DataFrame
    markdown: str
    plots: dict[str, Path]
    metrics: list[str] = field(default_factory=list)
    #: One row per (metric, variant, scale, lora): n, mean, base (the untrained model's score), delta = mean - base.
    cells: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: One row per comparison and metric: the power analysis (power.csv).
    power: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: The matplotlib Figures drawn (closed, still readable), by the same key as ``plots``.
    figures: dict = field(default_factory=dict)


class Report(TablesSections, StudySections, StructureSections, SpreadSections, RunsSections):
    """Builds the analysis of one directory; :meth:`write` puts it on disk."""

    def __init__(self, root: Path, loaded: Loaded, settings: Settings):
        self.root = root
        self.loaded = loaded
        self.s = settings
        # short labels everywhere in report.md and the plots; the CSVs keep the full variant names
        self.labels, self.shared_overrides = short_labels(loaded.runs["variant"])
        self.full_name = {label: v for v, label in self.labels.items()}
        self.runs = loaded.runs.assign(variant=loaded.runs["variant"].map(self.labels))
        self.curves = [{**c, "variant": self.labels.get(c["variant"], c["variant"])} for c in loaded.curves]
        if settings.baseline is not None:
            self.s = replace(settings, baseline=self.labels.get(settings.baseline, settings.baseline))
        self.completed, dup_notes = select_cells(self.runs)
        self.notes = list(loaded.notes) + dup_notes
        self.scales = sorted(set(self.runs["scale"]), key=scale_key)
        self.loras = [lo for lo in LORA_ORDER if lo in set(self.runs["lora"])]
        self.variants = sorted(set(self.runs["variant"]))
        self.plot_paths: dict[str, Path] = {}
        self.plot_skips: dict[str, str] = {}
        self.comparisons = pd.DataFrame(columns=list(stats.COMPARISON_COLUMNS))
        self.inversions = pd.DataFrame(columns=["metric", "lora", "scale_a", "scale_b", "x", "y", "diff_a", "diff_b",
                                                "p_adj_a", "p_adj_b", "significant_a", "significant_b",
                                                "significant_both"])
        self._all_pairs: dict[str, pd.DataFrame] = {}
        self.spread_metrics: list[str] = []
        self.power = pd.DataFrame()
        self.figures: dict = {}
        self._base = loaded.base.groupby(["metric", "scale"])["value"].median().to_dict() \
            if not loaded.base.empty else {}

    # -- data access ----------------------------------------------------------------------------------------

    def values(self, metric: str) -> pd.DataFrame:
        if metric not in self.completed.columns:
            return pd.DataFrame(columns=["variant", "scale", "lora", "seed", metric])
        v = self.completed[["variant", "algo", "scale", "lora", "seed", metric]].dropna(subset=[metric]).copy()
        v["_sk"] = v["scale"].map(scale_key)
        v["_lk"] = v["lora"].map(LORA_ORDER.index)
        return v.sort_values(["_sk", "_lk", "variant", "seed"], kind="stable").drop(columns=["_sk", "_lk"])

    def means(self, metric: str, lora: str) -> pd.DataFrame:
        v = self.values(metric)
        v = v[v["lora"] == lora]
        if v.empty:
            return pd.DataFrame()
        table = v.pivot_table(index="variant", columns="scale", values=metric, aggfunc="mean")
        return table[[s for s in self.scales if s in table.columns]]

    def base(self, metric: str, scale: str) -> float:
        """The untrained base model's score at ``scale`` (median over the runs that recorded it; NaN if none)."""
        return float(self._base.get((metric, scale), math.nan))

    def delta(self, value: float, metric: str, scale: str) -> str:
        """``Δ +0.0123`` (the change over the base), or "" when the base was not scored."""
        base = self.base(metric, scale)
        return f"Δ {value - base:+.4f}" if math.isfinite(base) and math.isfinite(value) else ""

    def cell_table(self) -> pd.DataFrame:
        """Per (metric, variant, scale, lora): n, mean, base, delta (Analysis.cells; W&B's report summary)."""
        rows = []
        for metric in self.s.metrics:
            for (variant, scale, lora), x in self.values(metric).groupby(["variant", "scale", "lora"])[metric]:
                base = self.base(metric, scale)
                rows.append({"metric": metric, "variant": self.full_name.get(variant, variant), "scale": scale,
                             "lora": lora, "n": int(x.size), "mean": float(x.mean()), "base": base,
                             "delta": float(x.mean()) - base})
        return pd.DataFrame(rows, columns=["metric", "variant", "scale", "lora", "n", "mean", "base", "delta"])

    def all_pairs(self, metric: str) -> pd.DataFrame:
        if metric not in self._all_pairs:
            if self.s.baseline is None and not self.comparisons.empty:
                self._all_pairs[metric] = self.comparisons[self.comparisons["metric"] == metric]
            else:
                self._all_pairs[metric] = stats.compare_groups(
                    self.values(metric), metric, alpha=self.s.alpha, correction=self.s.correction,
                    n_resamples=0, metric=metric)
        return self._all_pairs[metric]

    # -- analysis -------------------------------------------------------------------------------------------

    def run(self) -> Analysis:
        frames = [stats.compare_groups(self.values(m), m, baseline=self.s.baseline, alpha=self.s.alpha,
                                       correction=self.s.correction, n_resamples=self.s.n_resamples,
                                       seed=self.s.seed, metric=m) for m in self.s.metrics]
        frames = [f for f in frames if not f.empty]
        if frames:
            self.comparisons = pd.concat(frames, ignore_index=True)
        plots_dir = self.root / PLOTS_DIR
        md = self._header()
        for section in (self._main, self._main_figure, self._comparisons, self._power, self._factorial,
                        self._stability, self._spread, self._leverage, self._robust, self._training, self._failed):
            md += [""] + section(plots_dir)
        notes = self._notes()
        if notes:
            md += ["", "## Notes", ""] + [f"- {n}" for n in notes]
        markdown = "\n".join(md).rstrip() + "\n"
        full = self.full_name.get
        comparisons = self.comparisons.assign(a=self.comparisons["a"].map(lambda v: full(v, v)),
                                              b=self.comparisons["b"].map(lambda v: full(v, v)))
        inversions = self.inversions.assign(x=self.inversions["x"].map(lambda v: full(v, v)),
                                            y=self.inversions["y"].map(lambda v: full(v, v)))
        power = self.power.assign(a=self.power["a"].map(lambda v: full(v, v)),
                                  b=self.power["b"].map(lambda v: full(v, v))) if not self.power.empty else self.power
        return Analysis(summary=self.loaded.runs.copy(), comparisons=comparisons, inversions=inversions,
                        markdown=markdown, plots=dict(self.plot_paths), metrics=list(self.s.metrics),
                        cells=self.cell_table(), power=power, figures=dict(self.figures))

    def _plot(self, key: str, path: Path, func, *args, **kwargs) -> list[str]:
        """Draw one plot: ``func(*args, path, **kwargs)`` returns its Figure, or a one-line reason it was not drawn."""
        out = func(*args, path, **kwargs) if func is not None else None
        if isinstance(out, str):
            self.plot_skips[key] = out
            return [f"_Plot `{path.name}` skipped: {out}._"]
        self.plot_paths[key] = path
        if out is not None:
            self.figures[key] = out
        return [f"![{key}]({PLOTS_DIR}/{path.name})"]

    def _header(self) -> list[str]:
        runs = self.runs
        n_done = int((runs["status"] == COMPLETED).sum())
        n_failed = len(runs) - n_done
        n_cancelled = int((runs["status"] == CANCELLED).sum())
        mode = (f"each variant vs baseline `{self.s.baseline}` (a = variant, b = baseline)" if self.s.baseline
                else "all pairs of variants within each (scale, LoRA), a before b alphabetically")
        lines = [
            f"# Post-training report: {self.root.resolve().name}",
            "",
            f"- Runs: {len(runs)} result.json files, {n_done} completed, {n_failed} failed or unfinished"
            + (f" ({n_cancelled} cancelled)" if n_cancelled else "")
            + (" (listed under *Failed runs*)" if n_failed else "")
            + (f"; {self.loaded.n_archived} archived result{'s' if self.loaded.n_archived != 1 else ''} "
               "(`seed-<n>.<hash>` relaunch archives) skipped" if self.loaded.n_archived else ""),
            f"- Variants: {', '.join(self.variants)}; scales: {', '.join(self.scales)}; LoRA: "
            f"{', '.join(self.loras)}",
            f"- Metrics compared: {', '.join(f'`{m}`' for m in self.s.metrics)} (each task's primary metric "
            "unless --metric names others)",
            f"- Base model: {self._base_line()}",
            f"- Comparisons: {mode}; Welch's t-test (Welch 1947), {self.s.correction} correction over each "
            f"(metric, scale, LoRA) family, alpha = {self.s.alpha:g}; Cohen's d with the pooled sd; 95% "
            f"percentile bootstrap intervals, {self.s.n_resamples} resamples, seed {self.s.seed}",
        ]
        if self.shared_overrides:
            lines.append(f"- Overrides every variant shares (left out of the labels): "
                         f"`{','.join(self.shared_overrides)}`")
        return lines

    def _base_line(self) -> str:
        parts = []
        for m in self.s.metrics:
            scored = [f"{self.base(m, sc):.4f} ({sc})" for sc in self.scales if math.isfinite(self.base(m, sc))]
            if scored:
                parts.append(f"`{m}` {', '.join(scored)}")
        if not parts:
            return "not scored (eval.base_scores off, or older result.json files): no change over the base shown"
        return ("the untrained model's scores (result.json `eval.base_metrics`): " + "; ".join(parts)
                + "; Δ in the tables = mean − base")

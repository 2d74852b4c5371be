"""``python -m posttrain.report DIR``: tables, statistics and plots over every result.json under DIR.

Reads every result.json under DIR (:func:`posttrain.results.iter_results`, which skips ``seed-<n>.<hash>``
archives), completed and failed, groups runs by (variant, scale, lora) as docs/design.md says (results
without ``variant`` use ``algo``), and writes into DIR:

- ``summary.csv``      one row per result.json: algo, variant, scale, lora, seed, status, every metric
                       (``task/metric`` as lm-eval names it), training tokens/seconds/steps, error, path.
- ``comparisons.csv``  one row per compared pair and metric (columns :data:`posttrain.stats.COMPARISON_COLUMNS`):
                       Welch's t-test, family-wise corrected p, Cohen's d, bootstrap interval of the difference.
- ``inversions.csv``   every pair of variants whose order inverts between two scales.
- ``report.md``        main table, comparisons, scale x LoRA factorial, ranking stability, cross-domain spread,
                       leverage, robust aggregates (rliable), failed runs, and the plots below.
- ``plots/*.png``      accuracy by algorithm, forest plot, ranks across scales, interaction, training curves.

With ``--wandb`` the same tables and plots go to W&B as a report run in the sweep's group (offline unless
WANDB_MODE says otherwise). User errors print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from posttrain import stats
from posttrain.results import COMPLETED, FAILED, RESULT_FILE, is_archive, iter_results

DEFAULT_METRICS = ("gsm8k/exact_match,strict-match", "synth_gsm8k/exact_match,strict-match")
KNOWN_SCALES = ("tiny-s", "tiny-m", "tiny-l", "0.5b", "1.5b", "3b", "7b")
#: The metric that stands for a task in the cross-domain spread when --metric names none of that task's.
TASK_METRIC_PRIORITY = (
    "exact_match,strict-match", "acc_norm,none", "acc,none", "exact_match,none", "exact_match,flexible-extract",
    "math_verify,none",
)
#: lm-eval metrics where lower is better (everything else: higher is better).
LOWER_IS_BETTER = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")
LORA_ORDER = ("off", "on")
PLOTS_DIR = "plots"
TRAIN_FIELDS = ("tokens", "seconds", "steps", "tokens_per_s", "final_loss")
MAX_INVERSION_ROWS = 40


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


# ------------------------------------------------------------------------------------------------ helpers


def scale_key(scale: str) -> tuple:
    """Order scales: the named ones in docs/design.md's order, then others by parameter count, then by name."""
    if scale in KNOWN_SCALES:
        return (0, KNOWN_SCALES.index(scale), 0.0, scale)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([mb])", str(scale).lower())
    if m:
        return (1, 0, float(m.group(1)) * (1e-3 if m.group(2) == "m" else 1.0), scale)
    return (2, 0, 0.0, str(scale))


def is_stderr(metric: str) -> bool:
    """lm-eval's standard-error entries (``exact_match_stderr,strict-match``) are never compared."""
    name = metric.split("/", 1)[-1]
    return name.split(",", 1)[0].endswith("_stderr")


def lower_is_better(metric: str) -> bool:
    return metric.split("/", 1)[-1].split(",", 1)[0] in LOWER_IS_BETTER


def _lora(value: object) -> str:
    if isinstance(value, str):
        return "on" if value.strip().lower() in ("on", "true", "1", "yes") else "off"
    return "on" if bool(value) else "off"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def _num(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def _curve(points: object) -> list[tuple[float, float]]:
    out = []
    for point in points or []:
        if isinstance(point, (list, tuple)) and len(point) == 2:
            step, val = _num(point[0]), _num(point[1])
            if math.isfinite(step) and math.isfinite(val):
                out.append((step, val))
    return out


def f4(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.4f}"


def fp(p: float) -> str:
    if p is None or not math.isfinite(p):
        return "n/a"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.4f}"


def f2(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.2f}"


def f3(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.3f}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _mean_sd(x: np.ndarray) -> str:
    if x.size == 0:
        return "—"
    return f"{x.mean():.4f} ± {x.std(ddof=1):.4f} (n={x.size})" if x.size > 1 else f"{x.mean():.4f} (n=1)"


def md_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    def cell(v: object) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines


# ------------------------------------------------------------------------------------------------ loading


@dataclass
class Loaded:
    """Everything read from DIR: one row per result.json, training curves, and what was noticed on the way."""

    runs: pd.DataFrame
    metrics: list[str]
    curves: list[dict]
    n_archived: int
    notes: list[str] = field(default_factory=list)


def _unusable(result) -> str | None:
    """Why a parsed result.json cannot be used (None when it can)."""
    if not isinstance(result, dict):
        return "not a result object"
    missing = [k for k in ("status", "algo", "scale", "seed", "lora") if result.get(k) is None]
    if missing:
        return f"result.json lacks {', '.join(missing)}"
    try:
        int(result["seed"])
    except (TypeError, ValueError):
        return f"seed {result['seed']!r} is not an integer"
    return None


def load_results(root: str | os.PathLike) -> Loaded:
    """One DataFrame row per result.json under ``root`` (archives skipped), metrics flattened as ``task/metric``."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root}: no such directory")
    if not root.is_dir():
        raise UserError(f"{root}: not a directory")
    n_archived = sum(
        1 for p in root.rglob(RESULT_FILE)
        if any(is_archive(parent) for parent in p.relative_to(root).parents if parent != Path("."))
    )
    rows, curves, metric_names = [], [], set()
    unreadable: list[tuple[Path, str]] = []  # listed in report.md and skipped: one bad file never stops the report
    items = list(iter_results(root, unreadable))
    if not items and not unreadable:
        extra = f" ({n_archived} archived results skipped)" if n_archived else ""
        raise UserError(f"no result.json under {root}{extra}")
    for path, result in items:
        rel = path.relative_to(root).as_posix()
        problem = _unusable(result)
        if problem:
            unreadable.append((path, problem))
            continue
        seed = int(result["seed"])
        train = result.get("train") or {}
        error = result.get("error") or {}
        meta = result.get("algo_meta") or {}
        row = {
            "algo": str(result["algo"]), "variant": str(result.get("variant") or result["algo"]),
            "scale": str(result["scale"]), "lora": _lora(result["lora"]), "seed": seed,
            "status": str(result["status"]),
        }
        for task, entries in (result.get("metrics") or {}).items():
            if not isinstance(entries, dict):
                continue
            for name, value in entries.items():
                value = _num(value)
                if math.isfinite(value):
                    row[f"{task}/{name}"] = value
                    metric_names.add(f"{task}/{name}")
        for key in TRAIN_FIELDS:
            row[f"train_{key}"] = _num(train.get(key)) if isinstance(train, dict) else math.nan
        row.update({
            "config_hash": result.get("config_hash"), "family": meta.get("family"), "category": meta.get("category"),
            "error_type": error.get("type") if isinstance(error, dict) else None,
            "error_message": (error.get("message") if isinstance(error, dict) else str(error)) or None,
            "path": rel,
        })
        rows.append(row)
        if isinstance(train, dict):
            loss, reward = _curve(train.get("loss_curve")), _curve(train.get("reward_curve"))
            if loss or reward:
                curves.append({"variant": row["variant"], "scale": row["scale"], "lora": row["lora"],
                               "seed": seed, "loss_curve": loss, "reward_curve": reward})
    if not rows:
        path, reason = unreadable[0]
        raise UserError(f"no readable result.json under {root}: {len(unreadable)} unreadable, e.g. {path}: {reason}")
    metrics = sorted(metric_names)
    head = ["algo", "variant", "scale", "lora", "seed", "status"]
    tail = [f"train_{k}" for k in TRAIN_FIELDS] + ["config_hash", "family", "category", "error_type",
                                                   "error_message", "path"]
    runs = pd.DataFrame(rows).reindex(columns=head + metrics + tail)
    runs["_sk"] = runs["scale"].map(scale_key)
    runs = runs.sort_values(["variant", "_sk", "lora", "seed", "path"], kind="stable").drop(columns="_sk")
    runs = runs.reset_index(drop=True)
    unknown = sorted(set(runs["status"]) - {COMPLETED, FAILED})
    notes = [f"`{path.relative_to(root).as_posix()}` skipped: {reason}" for path, reason in unreadable]
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    if unknown:
        notes.append(f"runs with an unknown status ({', '.join(unknown)}) are listed with the failed runs and "
                     "not used in the statistics")
    return Loaded(runs=runs, metrics=metrics, curves=curves, n_archived=n_archived, notes=notes)


def select_cells(runs: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """The completed runs the statistics use: one per (variant, scale, lora, seed).

    Two results for one cell with different config hashes are a user error (two configs would be pooled);
    with the same hash (the same run found twice, e.g. two sweep directories under DIR) the completed one
    first in path order is used and the others are named in a note.
    """
    notes = []
    keys = ["variant", "scale", "lora", "seed"]
    for key, group in runs.groupby(keys, sort=False):
        hashes = group["config_hash"].astype(str).tolist()
        if len(set(hashes)) > 1:
            first = group.iloc[0]
            other = group[group["config_hash"].astype(str) != str(first["config_hash"])].iloc[0]
            raise UserError(
                f"runs of different config in one cell (variant={key[0]}, scale={key[1]}, lora={key[2]}, "
                f"seed={key[3]}): {first['path']} (config_hash {first['config_hash']}) and {other['path']} "
                f"(config_hash {other['config_hash']}); remove or move one of them"
            )
    completed = runs[runs["status"] == COMPLETED]
    dup = completed.duplicated(keys, keep="first")
    for _, row in completed[dup].iterrows():
        kept = completed[(completed[keys] == row[keys]).all(axis=1)].iloc[0]
        notes.append(f"`{row['path']}` repeats the cell of `{kept['path']}` (same config hash); only the latter "
                     "is used in the statistics")
    return completed[~dup].reset_index(drop=True), notes


def select_metrics(available: Sequence[str], requested: Sequence[str] | None, any_completed: bool) -> list[str]:
    """The metrics to compare: ``--metric`` values (checked) or the default."""
    if requested:
        out = []
        for m in requested:
            if is_stderr(m):
                raise UserError(f"metric {m!r} is a standard-error entry; stderr entries are never compared")
            if any_completed and m not in available:
                shown = [a for a in available if not is_stderr(a)]
                raise UserError(f"metric {m!r} is in no result.json; available: {', '.join(shown) or 'none'}")
            if m not in out:
                out.append(m)
        return out
    for m in DEFAULT_METRICS:
        if m in available:
            return [m]
    if not any_completed or not available:
        return [DEFAULT_METRICS[-1]]
    shown = [a for a in available if not is_stderr(a)]
    raise UserError(f"neither default metric ({' nor '.join(DEFAULT_METRICS)}) is present; pass --metric, one of: "
                    f"{', '.join(shown)}")


def resolve_baseline(baseline: str | None, completed: pd.DataFrame) -> tuple[str | None, list[str]]:
    """``--baseline`` names a variant, or an algo that has exactly one variant here."""
    if baseline is None:
        return None, []
    variants = sorted(set(completed["variant"]))
    if baseline in variants:
        return baseline, []
    matching = sorted(set(completed.loc[completed["algo"] == baseline, "variant"]))
    if len(matching) == 1:
        return matching[0], [f"baseline `{baseline}` is the algo of variant `{matching[0]}`, used as the baseline"]
    if len(matching) > 1:
        raise UserError(f"baseline {baseline!r} is the algo of several variants ({', '.join(matching)}); name one")
    raise UserError(f"baseline {baseline!r} is not among the completed variants: {', '.join(variants) or 'none'}")


# ------------------------------------------------------------------------------------------------ analysis


@dataclass
class Settings:
    metrics: list[str]
    baseline: str | None
    alpha: float
    correction: str
    seed: int
    n_resamples: int


@dataclass
class Analysis:
    """The tables a report is made of (report.md, the CSVs and W&B all draw from these)."""

    summary: pd.DataFrame
    comparisons: pd.DataFrame
    inversions: pd.DataFrame
    markdown: str
    plots: dict[str, Path]


class Report:
    """Builds the analysis of one directory; :meth:`write` puts it on disk."""

    def __init__(self, root: Path, loaded: Loaded, settings: Settings):
        self.root = root
        self.loaded = loaded
        self.s = settings
        self.runs = loaded.runs
        self.completed, dup_notes = select_cells(loaded.runs)
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
        for section in (self._main, self._comparisons, self._factorial, self._stability, self._spread,
                        self._leverage, self._robust, self._training, self._failed):
            md += [""] + section(plots_dir)
        notes = self._notes()
        if notes:
            md += ["", "## Notes", ""] + [f"- {n}" for n in notes]
        markdown = "\n".join(md).rstrip() + "\n"
        summary = self.runs.copy()
        return Analysis(summary=summary, comparisons=self.comparisons, inversions=self.inversions,
                        markdown=markdown, plots=dict(self.plot_paths))

    def _plot(self, key: str, path: Path, func, *args, **kwargs) -> list[str]:
        reason = func(*args, path, **kwargs) if func is not None else None
        if reason:
            self.plot_skips[key] = reason
            return [f"_Plot `{path.name}` skipped: {reason}._"]
        self.plot_paths[key] = path
        return [f"![{key}]({PLOTS_DIR}/{path.name})"]

    def _header(self) -> list[str]:
        runs = self.runs
        n_done = int((runs["status"] == COMPLETED).sum())
        n_failed = len(runs) - n_done
        mode = (f"each variant vs baseline `{self.s.baseline}` (a = variant, b = baseline)" if self.s.baseline
                else "all pairs of variants within each (scale, LoRA), a before b alphabetically")
        lines = [
            f"# Post-training report: {self.root.resolve().name}",
            "",
            f"- Runs: {len(runs)} result.json files, {n_done} completed, {n_failed} failed or unfinished"
            + (" (listed under *Failed runs*)" if n_failed else "")
            + (f"; {self.loaded.n_archived} archived result{'s' if self.loaded.n_archived != 1 else ''} "
               "(`seed-<n>.<hash>` relaunch archives) skipped" if self.loaded.n_archived else ""),
            f"- Variants: {', '.join(self.variants)}; scales: {', '.join(self.scales)}; LoRA: "
            f"{', '.join(self.loras)}",
            f"- Metrics compared: {', '.join(f'`{m}`' for m in self.s.metrics)}",
            f"- Comparisons: {mode}; Welch's t-test (Welch 1947), {self.s.correction} correction over each "
            f"(metric, scale, LoRA) family, alpha = {self.s.alpha:g}; Cohen's d with the pooled sd; 95% "
            f"percentile bootstrap intervals, {self.s.n_resamples} resamples, seed {self.s.seed}",
        ]
        return lines

    # main table ---------------------------------------------------------------------------------------------

    def _main(self, plots_dir: Path) -> list[str]:
        out = ["## Main results", "",
               "Mean ± sample sd (n seeds) per variant and scale. **Bold**: best at that scale; ≈: not significantly "
               f"different from the best (Welch, {self.s.correction} over the best-vs-rest family, alpha = "
               f"{self.s.alpha:g}); n/a: cannot be tested against the best (n = 1 or zero variance in both); "
               "no mark: significantly worse; —: no completed run."]
        failed = self.runs[self.runs["status"] != COMPLETED]
        for metric in self.s.metrics:
            values = self.values(metric)
            lower = lower_is_better(metric)
            out += ["", f"### `{metric}`" + (" (lower is better)" if lower else "")]
            if values.empty:
                out += ["", "_No completed run reports this metric._"]
                continue
            for lora in self.loras:
                vl = values[values["lora"] == lora]
                fl = failed[failed["lora"] == lora]
                variants = sorted(set(vl["variant"]) | set(fl["variant"]))
                if not variants:
                    continue
                scales = [s for s in self.scales if s in set(vl["scale"]) | set(fl["scale"])]
                marks = {s: self._tie_marks(vl[vl["scale"] == s], metric, lower) for s in scales}
                rows = []
                for variant in variants:
                    row = [variant]
                    for scale in scales:
                        x = vl.loc[(vl["variant"] == variant) & (vl["scale"] == scale), metric].to_numpy(float)
                        nf = int(((fl["variant"] == variant) & (fl["scale"] == scale)).sum())
                        row.append(self._cell(x, nf, marks[scale].get(variant)))
                    rows.append(row)
                out += ["", f"LoRA {lora}:", ""] + md_table(["variant", *scales], rows)
            out += [""] + self._plot(f"accuracy {metric}", plots_dir / f"accuracy__{_slug(metric)}.png",
                                     _plots().accuracy_plot, values, metric, self.scales, self.loras,
                                     sorted(set(values["variant"])))
        return out

    def _tie_marks(self, cell: pd.DataFrame, metric: str, lower: bool) -> dict[str, str]:
        if cell.empty:
            return {}
        means = cell.groupby("variant")[metric].mean().sort_index()
        best = means.idxmin() if lower else means.idxmax()
        marks = {best: "best"}
        comp = stats.compare_groups(cell.assign(_c=0), metric, by=["_c"], baseline=best, alpha=self.s.alpha,
                                    correction=self.s.correction, n_resamples=0)
        for r in comp.itertuples():
            marks[r.a] = "n/a" if not math.isfinite(r.p) else ("worse" if r.significant else "tie")
        return marks

    @staticmethod
    def _cell(x: np.ndarray, n_failed: int, mark: str | None) -> str:
        extra = f", {n_failed} failed" if n_failed else ""
        if x.size == 0:
            return f"— ({n_failed} failed)" if n_failed else "—"
        text = f"{x.mean():.4f} ± {x.std(ddof=1):.4f}" if x.size > 1 else f"{x.mean():.4f}"
        if mark == "best":
            text = f"**{text}**"
        text += f" (n={x.size}{extra})"
        if mark == "tie":
            text += " ≈"
        elif mark == "n/a" or x.size == 1:
            text += " n/a"
        return text

    # comparisons ---------------------------------------------------------------------------------------------

    def _comparisons(self, plots_dir: Path) -> list[str]:
        out = ["## Comparisons", "",
               "diff = mean_a − mean_b; 95% CI: percentile bootstrap of diff (each group resampled on its own); "
               f"p: Welch's two-sided t-test; p_adj: {self.s.correction} over the (metric, scale, LoRA) family of "
               "testable pairs; d: Cohen's d (pooled sd). n/a: not testable (n = 1 or zero variance in both). "
               "All rows are in `comparisons.csv`."]
        for metric in self.s.metrics:
            out += ["", f"### `{metric}`", ""]
            comp = self.comparisons[self.comparisons["metric"] == metric] if not self.comparisons.empty else None
            if comp is None or comp.empty:
                why = ("no cell has the baseline and another variant" if self.s.baseline
                       else "no cell has two or more variants")
                out += [f"_No comparisons: {why}._"]
                self.plot_skips[f"forest {metric}"] = why
                continue
            n_sig = int(comp["significant"].sum())
            n_test = int(np.isfinite(comp["p"].astype(float)).sum())
            out += [f"{len(comp)} comparisons, {n_test} testable, {n_sig} significant after correction.", ""]
            rows = []
            for r in comp.itertuples():
                sig = "n/a" if not math.isfinite(r.p) else ("**yes**" if r.significant else "no")
                rows.append([r.scale, r.lora, r.a, r.b, r.n_a, r.n_b, f4(r.mean_a), f4(r.mean_b),
                             f"{r.diff:+.4f}", f"[{f4(r.ci_low)}, {f4(r.ci_high)}]" if math.isfinite(r.ci_low)
                             else "n/a", f2(r.t), f2(r.df), fp(r.p), fp(r.p_adj), sig, f2(r.cohen_d)])
            out += md_table(["scale", "LoRA", "a", "b", "n_a", "n_b", "mean_a", "mean_b", "diff", "95% CI", "t",
                             "df", "p", "p_adj", "significant", "d"], rows)
            out += [""] + self._plot(f"forest {metric}", plots_dir / f"forest__{_slug(metric)}.png",
                                     _plots().forest_plot, self.comparisons, metric, baseline=self.s.baseline)
        return out

    # factorial ----------------------------------------------------------------------------------------------

    def _factorial(self, plots_dir: Path) -> list[str]:
        out = ["## Scale × LoRA factorial", "",
               "Two-way ANOVA with interaction, `metric ~ C(scale) * C(lora)` (statsmodels ols + anova_lm, Type II "
               "sums of squares), per variant, over the scales that have both LoRA on and off runs. Partial η² = "
               "SS_effect / (SS_effect + SS_residual); η² = SS_effect / SS_total."]
        for metric in self.s.metrics:
            values = self.values(metric)
            out += ["", f"### `{metric}`"]
            cells = {}
            for variant in sorted(set(values["variant"])):
                sub = values[values["variant"] == variant]
                both = [s for s in self.scales if set(sub.loc[sub["scale"] == s, "lora"]) >= {"on", "off"}]
                if len(both) >= 2:
                    cells[variant] = sub[sub["scale"].isin(both)]
            if not cells:
                reason = "no variant has two or more scales that each have LoRA on and off runs"
                out += ["", f"_Skipped: {reason}._"]
                self.plot_skips[f"interaction {metric}"] = reason
                continue
            for variant, data in cells.items():
                out += ["", f"**{variant}** (scales {', '.join(s for s in self.scales if s in set(data['scale']))}; "
                        f"n = {len(data)}):", ""]
                mrows = []
                for scale in [s for s in self.scales if s in set(data["scale"])]:
                    row = [scale]
                    for lora in ("off", "on"):
                        x = data.loc[(data["scale"] == scale) & (data["lora"] == lora), metric].to_numpy(float)
                        row.append(_mean_sd(x))
                    mrows.append(row)
                out += md_table(["scale", "LoRA off", "LoRA on"], mrows) + [""]
                try:
                    table = stats.factorial_anova(data, metric, "scale", "lora")
                except ValueError as exc:
                    out += [f"_ANOVA not possible: {exc}._"]
                    continue
                rows = [[r.effect, f"{r.sum_sq:.6f}", f"{r.df:g}", f2(r.F), fp(r.p), f3(r.partial_eta_sq),
                         f3(r.eta_sq)] for r in table.itertuples()]
                out += md_table(["effect", "SS", "df", "F", "p", "partial η²", "η²"], rows)
            out += [""] + self._plot(f"interaction {metric}", plots_dir / f"interaction__{_slug(metric)}.png",
                                     _plots().interaction_plot, cells, metric, self.scales)
        return out

    # ranking stability ---------------------------------------------------------------------------------------

    def _stability(self, plots_dir: Path) -> list[str]:
        out = ["## Ranking stability across scales", "",
               "Kendall's tau-b (scipy.stats.kendalltau) between the rankings of variant means at two scales "
               "(variants present at both). An inversion is a pair whose order flips; it is significant at an end "
               f"when that scale's all-pairs Welch test is significant after {self.s.correction} correction "
               f"(alpha = {self.s.alpha:g}). All inversions are in `inversions.csv`."]
        inv_frames = []
        for metric in self.s.metrics:
            out += ["", f"### `{metric}`"]
            means = {lora: self.means(metric, lora) for lora in self.loras}
            lookup = {}
            for r in self.all_pairs(metric).itertuples():
                lookup[(r.scale, r.lora, r.a, r.b)] = (r.p_adj, r.significant)
            any_multi = False
            for lora, m in list(means.items()):
                if m.shape[1] < 2 or m.dropna(thresh=2).shape[0] < 2:
                    means.pop(lora)  # fewer than two scales, or fewer than two variants seen at two scales
                    if not m.empty:
                        out += ["", f"LoRA {lora}: no ranking to compare (fewer than two variants at two or more "
                                "scales)."]
                    continue
                any_multi = True
                out += ["", f"LoRA {lora}:", ""]
                tau = stats.kendall_stability(m)
                out += md_table(["scale a", "scale b", "variants", "tau", "p"],
                                [[r.scale_a, r.scale_b, r.n, f3(r.tau), fp(r.p)] for r in tau.itertuples()])

                def sig(scale, x, y, _lora=lora):
                    return lookup.get((scale, _lora, x, y), (math.nan, False))

                inv = stats.rank_inversions(m, sig)
                if inv.empty:
                    out += ["", "No order inversions."]
                    continue
                inv.insert(0, "lora", lora)
                inv.insert(0, "metric", metric)
                inv_frames.append(inv)
                # most significant first, then in scale order (rank_inversions already walks scales in order)
                inv = inv.assign(_k=-(inv["significant_a"].astype(int) + inv["significant_b"].astype(int)))
                inv = inv.sort_values("_k", kind="stable")
                n_both = int(inv["significant_both"].sum())
                out += ["", f"{len(inv)} inversions, {n_both} significant at both ends:", ""]
                rows = []
                for r in inv.head(MAX_INVERSION_ROWS).itertuples():
                    rows.append([f"{r.scale_a} → {r.scale_b}", f"{r.x} vs {r.y}",
                                 f"{r.diff_a:+.4f}", f"{r.diff_b:+.4f}", fp(r.p_adj_a), fp(r.p_adj_b),
                                 "**yes**" if r.significant_both else "no"])
                out += md_table(["scales", "pair (x vs y)", "x − y at a", "x − y at b", "p_adj at a", "p_adj at b",
                                 "significant at both"], rows)
                if len(inv) > MAX_INVERSION_ROWS:
                    out += ["", f"_{len(inv) - MAX_INVERSION_ROWS} more in `inversions.csv`._"]
            if not any_multi:
                reason = ("only one scale" if len(set(self.values(metric)["scale"])) < 2
                          else "fewer than two variants were run at two or more scales")
                out += ["", f"_Skipped: {reason}._"]
                self.plot_skips[f"ranks {metric}"] = reason
                continue
            out += [""] + self._plot(f"ranks {metric}", plots_dir / f"ranks__{_slug(metric)}.png",
                                     _plots().rank_plot, means, metric, lower_is_better=lower_is_better(metric))
        if inv_frames:
            self.inversions = pd.concat(inv_frames, ignore_index=True)
        return out

    # cross-domain spread -------------------------------------------------------------------------------------

    def task_metrics(self) -> dict[str, str]:
        """One metric per task: the selected one for its task, else the first of TASK_METRIC_PRIORITY present."""
        present = [m for m in self.loaded.metrics if not is_stderr(m) and self.completed[m].notna().any()] \
            if not self.completed.empty else []
        tasks: dict[str, list[str]] = {}
        for m in present:
            tasks.setdefault(m.split("/", 1)[0], []).append(m.split("/", 1)[1])
        chosen = {}
        for task, names in tasks.items():
            selected = [m for m in self.s.metrics if m.split("/", 1)[0] == task]
            if selected:
                chosen[task] = selected[0]
                continue
            preferred = [p for p in TASK_METRIC_PRIORITY if p in names]
            chosen[task] = f"{task}/{preferred[0] if preferred else sorted(names)[0]}"
        return chosen

    def _spread(self, plots_dir: Path) -> list[str]:
        out = ["## Cross-domain spread", "",
               "Spread = max − min of the variant means of one task's metric at one (scale, LoRA); ratio = the "
               "reference task's spread / that task's spread (how much more the algorithms differ on the "
               "reference task)."]
        chosen = self.task_metrics()
        ref_task = self.s.metrics[0].split("/", 1)[0]
        if len(chosen) < 2 or ref_task not in chosen:
            out += ["", "_Skipped: needs the reference task and at least one other task._"]
            return out
        others = [t for t in sorted(chosen) if t != ref_task]
        self.spread_metrics = [chosen[t] for t in [ref_task, *others]]
        out += ["", "Metric per task: " + ", ".join(f"`{chosen[t]}`" for t in [ref_task, *others]) + "; reference: "
                f"`{ref_task}`.", ""]
        headers = ["scale", "LoRA", f"{ref_task} spread"]
        for t in others:
            headers += [f"{t} spread", f"ratio {ref_task}/{t}"]
        rows = []
        for scale in self.scales:
            for lora in self.loras:
                spreads = {}
                for t in [ref_task, *others]:
                    v = self.values(chosen[t])
                    cell = v[(v["scale"] == scale) & (v["lora"] == lora)]
                    spreads[t] = stats.spread(cell.groupby("variant")[chosen[t]].mean())
                if all(sp["n"] < 2 for sp in spreads.values()):
                    continue  # one variant or none: no spread to show
                ref = spreads[ref_task]

                def show(sp):
                    if sp["n"] < 2:
                        return "n/a"
                    return f"{sp['spread']:.4f} ({sp['best']} − {sp['worst']})"

                row = [scale, lora, show(ref)]
                for t in others:
                    sp = spreads[t]
                    ok = ref["n"] >= 2 and sp["n"] >= 2 and sp["spread"] > 0
                    row += [show(sp), f"{ref['spread'] / sp['spread']:.1f}×" if ok else "n/a"]
                rows.append(row)
        out += md_table(headers, rows)
        return out

    # leverage -----------------------------------------------------------------------------------------------

    def _leverage(self, plots_dir: Path) -> list[str]:
        out = ["## Leverage", "",
               "Share of the variance of the metric explained by each factor: a main-effects ANOVA "
               "`metric ~ C(scale) + C(variant) + C(lora) + C(seed)` over all completed runs (factors with two or "
               "more levels), Type II sums of squares; share = SS_factor / SS_total; range = max − min of the "
               "factor's level means. For an unbalanced design the shares need not sum to 1."]
        for metric in self.s.metrics:
            out += ["", f"### `{metric}`", ""]
            values = self.values(metric)
            try:
                table = stats.leverage(values, metric, ("scale", "variant", "lora", "seed"))
            except (ValueError, KeyError) as exc:
                out += [f"_Skipped: {exc}._"]
                continue
            table = pd.concat([table[table["factor"] != "Residual"].sort_values("share", ascending=False),
                               table[table["factor"] == "Residual"]])
            rows = [[r.factor, "" if not math.isfinite(r.levels) else int(r.levels), f"{r.sum_sq:.6f}", f"{r.df:g}",
                     f3(r.share), f3(r.partial_eta_sq), f4(r.range), f2(r.F), fp(r.p)] for r in table.itertuples()]
            out += md_table(["factor", "levels", "SS", "df", "share", "partial η²", "range", "F", "p"], rows)
        return out

    # robust aggregates ---------------------------------------------------------------------------------------

    def _robust(self, plots_dir: Path) -> list[str]:
        out = ["## Robust aggregates (rliable)", "",
               "As rliable reports them (Agarwal et al. 2021): interquartile mean (IQM, mean of the middle 50% of "
               "runs) and probability of improvement P(a > b) (normalised Mann-Whitney U: a random run of a beats a "
               "random run of b, ties counted half), each with a 95% percentile bootstrap interval "
               f"({self.s.n_resamples} resamples, runs resampled within each group; n/a for n < 2)."]
        for metric in self.s.metrics:
            values = self.values(metric)
            out += ["", f"### `{metric}`"]
            if values.empty:
                out += ["", "_No completed run reports this metric._"]
                continue
            groups = {k: g[metric].to_numpy(float) for k, g in values.groupby(["variant", "scale", "lora"])}
            for lora in self.loras:
                scales = [s for s in self.scales if any(k[1] == s and k[2] == lora for k in groups)]
                variants = sorted({k[0] for k in groups if k[2] == lora})
                if not variants:
                    continue
                rows = []
                for variant in variants:
                    row = [variant]
                    for scale in scales:
                        x = groups.get((variant, scale, lora))
                        if x is None:
                            row.append("—")
                            continue
                        low, high = stats.iqm_ci(x, n_resamples=self.s.n_resamples,
                                                 rng=stats.rng_for(self.s.seed, "iqm", metric, scale, lora, variant))
                        ci = f" [{f4(low)}, {f4(high)}]" if math.isfinite(low) else " [n/a]"
                        row.append(f"{stats.iqm(x):.4f}{ci}")
                    rows.append(row)
                out += ["", f"IQM, LoRA {lora}:", ""] + md_table(["variant", *scales], rows)
            comp = self.comparisons[self.comparisons["metric"] == metric] if not self.comparisons.empty else None
            if comp is None or comp.empty:
                continue
            rows = []
            for r in comp.itertuples():
                x, y = groups[(r.a, r.scale, r.lora)], groups[(r.b, r.scale, r.lora)]
                poi = stats.probability_of_improvement(x, y)
                low, high = stats.probability_of_improvement_ci(
                    x, y, n_resamples=self.s.n_resamples,
                    rng=stats.rng_for(self.s.seed, "poi", metric, r.scale, r.lora, r.a, r.b))
                rows.append([r.scale, r.lora, r.a, r.b, f3(poi), f"[{f3(low)}, {f3(high)}]" if math.isfinite(low)
                             else "n/a"])
            out += ["", "Probability of improvement (same pairs as the comparisons):", ""]
            out += md_table(["scale", "LoRA", "a", "b", "P(a > b)", "95% CI"], rows)
        return out

    # training curves, failed runs -----------------------------------------------------------------------------

    def _training(self, plots_dir: Path) -> list[str]:
        out = ["## Training curves", ""]
        n_loss = sum(1 for c in self.loaded.curves if c["loss_curve"])
        n_reward = sum(1 for c in self.loaded.curves if c["reward_curve"])
        out += [f"{n_loss} runs with a loss curve, {n_reward} with a reward curve (`train.loss_curve`, "
                "`train.reward_curve`).", ""]
        out += self._plot("training curves", plots_dir / "training_curves.png", _plots().training_curves,
                          self.loaded.curves, self.scales)
        return out

    def _failed(self, plots_dir: Path) -> list[str]:
        failed = self.runs[self.runs["status"] != COMPLETED]
        out = ["## Failed runs", ""]
        if failed.empty:
            return out + ["None."]
        rows = []
        for r in failed.itertuples():
            message = (r.error_message or "").strip().splitlines()
            text = f"{r.error_type or 'error'}: {message[0] if message else '(no message)'}"
            if len(text) > 300:
                text = text[:297] + "..."
            rows.append([f"`{r.path}`", r.status, r.variant, r.scale, r.lora, r.seed, text])
        return out + md_table(["path", "status", "variant", "scale", "LoRA", "seed", "error"], rows)

    def _notes(self) -> list[str]:
        notes = list(self.notes)
        checked = list(self.s.metrics) + [m for m in self.spread_metrics if m not in self.s.metrics]
        for metric in checked:
            if metric in self.completed.columns:
                lacking = self.completed[self.completed[metric].isna()]
                if not lacking.empty:
                    shown = ", ".join(f"`{p}`" for p in lacking["path"].head(5))
                    more = f" and {len(lacking) - 5} more" if len(lacking) > 5 else ""
                    verb = "lacks" if len(lacking) == 1 else "lack"
                    notes.append(f"{_plural(len(lacking), 'completed run')} {verb} `{metric}` (left out of its "
                                 f"statistics): {shown}{more}")
            if metric not in self.s.metrics:
                continue
            values = self.values(metric)
            missing = []
            for lora in self.loras:  # the grid of one LoRA setting: its variants x its scales
                vl = values[values["lora"] == lora]
                have = set(zip(vl["variant"], vl["scale"]))
                scales = [sc for sc in self.scales if sc in set(vl["scale"])]
                missing += [(v, sc, lora) for v in sorted(set(vl["variant"])) for sc in scales if (v, sc) not in have]
            if missing:
                shown = ", ".join(f"{v}/{sc}/lora-{lo}" for v, sc, lo in missing[:12])
                more = f" and {len(missing) - 12} more" if len(missing) > 12 else ""
                notes.append(f"`{metric}`: {_plural(len(missing), 'cell')} (variant/scale/LoRA) without a "
                             f"completed run reporting it: {shown}{more}")
            if self.s.baseline is not None and not values.empty:
                cells = values.groupby(["scale", "lora"])["variant"].apply(set)
                absent = [f"{s}/lora-{lo}" for (s, lo), vs in cells.items() if self.s.baseline not in vs]
                absent = sorted(absent, key=lambda c: scale_key(c.split("/")[0]))
                if absent:
                    notes.append(f"`{metric}`: the baseline `{self.s.baseline}` has no completed run at "
                                 f"{', '.join(absent)}, so those cells have no comparisons")
        for key, reason in self.plot_skips.items():
            notes.append(f"plot skipped ({key}): {reason}")
        return notes


def _plots():
    from posttrain import report_plots  # matplotlib only when a report is drawn
    return report_plots


# ------------------------------------------------------------------------------------------------ output


def _csv(frame: pd.DataFrame, path: Path) -> None:
    frame = frame.copy()
    for col in frame.columns:
        if frame[col].dtype == bool:
            frame[col] = frame[col].map({True: "true", False: "false"})
    frame.to_csv(path, index=False, na_rep="", float_format="%.10g")


def write(root: Path, analysis: Analysis) -> list[Path]:
    """Write summary.csv, comparisons.csv, inversions.csv and report.md into ``root``; return the paths."""
    paths = [root / "summary.csv", root / "comparisons.csv", root / "inversions.csv", root / "report.md"]
    _csv(analysis.summary, paths[0])
    comp = analysis.comparisons.reindex(columns=list(stats.COMPARISON_COLUMNS))
    comp["significant"] = comp["significant"].astype(bool)
    _csv(comp, paths[1])
    _csv(analysis.inversions, paths[2])
    paths[3].write_text(analysis.markdown, encoding="utf-8")
    return paths + list(analysis.plots.values())


def build(root: str | os.PathLike, *, metrics: Sequence[str] | None = None, baseline: str | None = None,
          alpha: float = 0.05, correction: str = "bonferroni", seed: int = 0,
          n_resamples: int = stats.DEFAULT_RESAMPLES) -> Analysis:
    """Load DIR and compute every table and plot (plots are written under DIR/plots)."""
    root = Path(root)
    loaded = load_results(root)
    completed, _ = select_cells(loaded.runs)
    chosen = select_metrics(loaded.metrics, metrics, not completed.empty)
    resolved, notes = resolve_baseline(baseline, completed)
    loaded.notes.extend(notes)
    plots_dir = root / PLOTS_DIR
    if plots_dir.is_dir():
        for old in plots_dir.glob("*.png"):
            old.unlink()
    settings = Settings(metrics=chosen, baseline=resolved, alpha=alpha, correction=correction, seed=seed,
                        n_resamples=n_resamples)
    return Report(root, loaded, settings).run()


def log_to_wandb(root: Path, analysis: Analysis) -> str:
    """Log the tables, plots and report.md as one W&B run (job_type "report") in the sweep's group."""
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb needs the wandb package (pip install wandb)") from None
    group = os.environ.get("WANDB_RUN_GROUP") or root.resolve().name
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "posttrain"), group=group, job_type="report",
                     name=f"report-{group}", dir=str(root), mode=os.environ.get("WANDB_MODE", "offline"),
                     config={"report_dir": str(root)})
    try:
        for name, frame in (("summary", analysis.summary), ("comparisons", analysis.comparisons),
                            ("inversions", analysis.inversions)):
            if not frame.empty:
                run.log({name: wandb.Table(dataframe=frame.astype(object).where(frame.notna(), None))})
        if analysis.plots:
            run.log({f"plots/{key}": wandb.Image(str(path)) for key, path in analysis.plots.items()})
        artifact = wandb.Artifact(f"report-{re.sub(r'[^A-Za-z0-9._-]', '_', group)}", type="report")
        for fname in ("report.md", "summary.csv", "comparisons.csv", "inversions.csv"):
            if (root / fname).exists():
                artifact.add_file(str(root / fname))
        run.log_artifact(artifact)
        return str(getattr(run, "dir", ""))
    finally:
        run.finish()


# ------------------------------------------------------------------------------------------------ CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2 (argparse's default prints the usage too)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m posttrain.report",
                description="Tables, statistics and plots over every result.json under DIR.")
    p.add_argument("dir", metavar="DIR", help="sweep directory (e.g. outputs/paper)")
    p.add_argument("--metric", action="append", default=None, metavar="M",
                   help="task/metric as lm-eval names it, repeatable (default: gsm8k/exact_match,strict-match if "
                        "present, else synth_gsm8k/exact_match,strict-match)")
    p.add_argument("--baseline", default=None, metavar="ALGO",
                   help="compare every variant with this one (default: all pairs)")
    p.add_argument("--alpha", type=float, default=0.05, help="significance level (default 0.05)")
    p.add_argument("--correction", choices=stats.CORRECTIONS, default="bonferroni",
                   help="family-wise correction per (metric, scale, lora) (default bonferroni)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.add_argument("--resamples", type=int, default=stats.DEFAULT_RESAMPLES,
                   help=f"bootstrap resamples (default {stats.DEFAULT_RESAMPLES})")
    p.add_argument("--wandb", action="store_true", help="also log the report to W&B (offline unless WANDB_MODE)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        if not (0.0 < args.alpha < 1.0):
            raise UserError(f"--alpha must be between 0 and 1, got {args.alpha:g}")
        if args.seed < 0:
            raise UserError(f"--seed must be a non-negative integer, got {args.seed}")
        if args.resamples < 0:
            raise UserError(f"--resamples must be a non-negative integer, got {args.resamples}")
        root = Path(args.dir)
        try:
            analysis = build(root, metrics=args.metric, baseline=args.baseline, alpha=args.alpha,
                             correction=args.correction, seed=args.seed, n_resamples=args.resamples)
            written = write(root, analysis)
        except OSError as exc:  # unreadable result.json, read-only DIR, full disk
            raise UserError(f"{exc}") from None
        if args.wandb:
            log_to_wandb(root, analysis)
    except UserError as exc:
        sys.stderr.write(f"{prog}: error: {' '.join(str(exc).split())}\n")
        raise SystemExit(2) from None
    n_sig = int(analysis.comparisons["significant"].sum()) if not analysis.comparisons.empty else 0
    print(f"wrote {root / 'report.md'} ({len(analysis.summary)} runs, {len(analysis.comparisons)} comparisons, "
          f"{n_sig} significant, {len(analysis.plots)} plots; {len(written)} files)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

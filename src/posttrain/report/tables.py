"""report.md sections: the main results table (best marked, ties) and the pairwise comparisons."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from posttrain import stats
from posttrain.report.format import _slug, f2, f4, fp, lower_is_better, md_table, plots
from posttrain.results import COMPLETED


class TablesSections:
    """Sections of :class:`posttrain.report.builder.Report` (mixin: uses its ``s``, ``values``, ``_plot``...)."""

    # main table ---------------------------------------------------------------------------------------------

    def _main(self, plots_dir: Path) -> list[str]:
        out = ["## Main results", "",
               "Mean ± sample sd (n seeds) per variant and scale. **Bold**: best at that scale; ≈: not significantly "
               f"different from the best (Welch, {self.s.correction} over the best-vs-rest family, alpha = "
               f"{self.s.alpha:g}); n/a: cannot be tested against the best (n = 1 or zero variance in both); "
               "no mark: significantly worse; —: no completed run. Several variants sharing the best mean is a tie: "
               "none is bold, each is marked ≈. Δ: the change over the untrained base (row *base*)."]
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
                if any(math.isfinite(self.base(metric, sc)) for sc in scales):
                    rows.append(["*base* (untrained)"] + [f4(self.base(metric, sc)) if math.isfinite(
                        self.base(metric, sc)) else "—" for sc in scales])
                for variant in variants:
                    row = [variant]
                    for scale in scales:
                        x = vl.loc[(vl["variant"] == variant) & (vl["scale"] == scale), metric].to_numpy(float)
                        nf = int(((fl["variant"] == variant) & (fl["scale"] == scale)).sum())
                        cell = self._cell(x, nf, marks[scale].get(variant))
                        delta = self.delta(float(x.mean()), metric, scale) if x.size else ""
                        row.append(f"{cell} {delta}" if delta else cell)
                    rows.append(row)
                out += ["", f"LoRA {lora}:", ""] + md_table(["variant", *scales], rows)
            out += [""] + self._plot(f"accuracy {metric}", plots_dir / f"accuracy__{_slug(metric)}.png",
                                     plots().accuracy_plot, values, metric, self.scales, self.loras,
                                     sorted(set(values["variant"])), base={sc: self.base(metric, sc)
                                                                           for sc in self.scales})
        return out

    def _tie_marks(self, cell: pd.DataFrame, metric: str, lower: bool) -> dict[str, str]:
        if cell.empty:
            return {}
        means = cell.groupby("variant")[metric].mean().sort_index()
        best = means.idxmin() if lower else means.idxmax()
        top = means[np.isclose(means.to_numpy(float), means[best], rtol=0.0, atol=1e-12)]
        if len(top) > 1:  # a tie for the best mean: no winner
            marks = {v: "tie" for v in top.index}
            cell = cell[~cell["variant"].isin(top.index[1:])]
        else:
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
               "testable pairs; d: Cohen's d (pooled sd); Δ base a / b: each mean minus the untrained base's "
               "score. n/a: not testable (n = 1 or zero variance in both). "
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
                base = self.base(metric, r.scale)
                over = f"{r.mean_a - base:+.4f} / {r.mean_b - base:+.4f}" if math.isfinite(base) else "n/a"
                rows.append([r.scale, r.lora, r.a, r.b, r.n_a, r.n_b, f4(r.mean_a), f4(r.mean_b), over,
                             f"{r.diff:+.4f}", f"[{f4(r.ci_low)}, {f4(r.ci_high)}]" if math.isfinite(r.ci_low)
                             else "n/a", f2(r.t), f2(r.df), fp(r.p), fp(r.p_adj), sig, f2(r.cohen_d)])
            out += md_table(["scale", "LoRA", "a", "b", "n_a", "n_b", "mean_a", "mean_b", "Δ base a / b", "diff",
                             "95% CI", "t", "df", "p", "p_adj", "significant", "d"], rows)
            out += [""] + self._plot(f"forest {metric}", plots_dir / f"forest__{_slug(metric)}.png",
                                     plots().forest_plot, self.comparisons, metric, baseline=self.s.baseline)
        return out


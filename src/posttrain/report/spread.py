"""report.md sections: the cross-domain spread (one metric per task) and the leverage of each factor."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from posttrain import stats
from posttrain.report.format import TASK_METRIC_PRIORITY, f2, f3, f4, fp, is_stderr, md_table


class SpreadSections:
    """Sections of :class:`posttrain.report.builder.Report` (mixin: uses its ``s``, ``values``, ``_plot``...)."""

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


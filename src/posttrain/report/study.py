"""report.md sections: the paper-style main figure and the power analysis of every comparison.

Power (docs/design.md "Report", :mod:`posttrain.stats.power`): for each compared pair, the minimum
detectable effect at the seeds it has and the seeds per variant needed to detect ``--effect``, so a
non-significant difference reads as a real null (the study could have seen the effect) or an underpowered one.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from posttrain import stats
from posttrain.report.format import f3, f4, md_table, plots

POWER_COLUMNS = ("metric", "scale", "lora", "a", "b", "n_a", "n_b", "alpha_test", "pooled_sd", "mde_d", "mde",
                 "effect", "seeds_needed", "significant", "verdict")


def _seeds(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"> {stats.power.MAX_SEEDS}" if n > stats.power.MAX_SEEDS else str(n)


class StudySections:
    """Sections of :class:`posttrain.report.builder.Report` (mixin: uses its ``s``, ``values``, ``_plot``...)."""

    def _main_figure(self, plots_dir: Path) -> list[str]:
        out = ["## Main figure", "",
               "Rows: tasks (each one's primary metric); columns: scales. Each variant's seeds (dots), its mean and "
               "95% t-interval (black); the untrained base's score as a dashed line."]
        values = {m: self.values(m) for m in self.s.metrics}
        base = {(m, sc): self.base(m, sc) for m in self.s.metrics for sc in self.scales}
        return out + [""] + self._plot("main figure", plots_dir / "main_figure.png", plots().main_figure, values,
                                       list(self.s.metrics), self.scales, self.loras, base)

    def _power(self, plots_dir: Path) -> list[str]:
        level = (f"alpha/m for {self.s.correction} over the family's m testable pairs" if self.s.correction != "none"
                 else "alpha, no correction")
        out = ["## Power", "",
               f"Power analysis of each comparison (statsmodels TTestIndPower, two-sided, power {self.s.power:g}; "
               f"each test at {level}): MDE = the smallest difference the test detects with that power at the "
               "pair's seeds, as Cohen's d and in the metric's units (d × pooled sd); seeds = per variant, to "
               f"detect a difference of {self.s.effect:g} (`--effect`) with the pooled sd seen. A non-significant "
               "pair is a *real null* when MDE ≤ the effect, *underpowered* when not; *no variance*: every run of "
               "both variants scored the same. All rows are in `power.csv`."]
        rows_all = []
        for metric in self.s.metrics:
            out += ["", f"### `{metric}`", ""]
            comp = self.comparisons[self.comparisons["metric"] == metric] if not self.comparisons.empty else None
            if comp is None or comp.empty:
                out += ["_No comparisons._"]
                continue
            rows, verdicts = [], []
            for (scale, lora), fam in comp.groupby(["scale", "lora"], sort=False):
                m = int(fam["p"].astype(float).notna().sum())
                alpha = stats.family_alpha(self.s.alpha, self.s.correction, m)
                for r in fam.itertuples():
                    pw = stats.analyse(int(r.n_a), float(r.std_a), int(r.n_b), float(r.std_b),
                                       significant=bool(r.significant), effect=self.s.effect, alpha=alpha,
                                       power=self.s.power)
                    verdicts.append(pw.verdict)
                    rows_all.append({"metric": metric, "scale": scale, "lora": lora, "a": r.a, "b": r.b,
                                     "n_a": int(r.n_a), "n_b": int(r.n_b), "alpha_test": alpha, "pooled_sd": pw.sd,
                                     "mde_d": pw.mde_d, "mde": pw.mde, "effect": pw.effect,
                                     "seeds_needed": pw.seeds_needed, "significant": bool(r.significant),
                                     "verdict": pw.verdict})
                    rows.append([scale, lora, r.a, r.b, f"{int(r.n_a)}/{int(r.n_b)}", f"{alpha:.4g}", f4(pw.sd),
                                 f3(pw.mde_d), f4(pw.mde), _seeds(pw.seeds_needed), pw.verdict])
            counts = pd.Series(verdicts).value_counts()
            out += [", ".join(f"{counts[v]} {v}" for v in ("detected", "real null", "underpowered", "no variance",
                                                            "too few seeds") if v in counts) + ".", ""]
            out += md_table(["scale", "LoRA", "a", "b", "n a/b", "alpha/test", "pooled sd", "MDE (d)", "MDE",
                             f"seeds for {self.s.effect:g}", "verdict"], rows)
        self.power = pd.DataFrame(rows_all, columns=list(POWER_COLUMNS))
        return out


"""report.md sections: the scale x LoRA factorial and the ranking stability across scales."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from posttrain import stats
from posttrain.report.format import MAX_INVERSION_ROWS, _mean_sd, _slug, f2, f3, fp, lower_is_better, md_table, plots


class StructureSections:
    """Sections of :class:`posttrain.report.builder.Report` (mixin: uses its ``s``, ``values``, ``_plot``...)."""

    # factorial ----------------------------------------------------------------------------------------------

    def _factorial(self, plots_dir: Path) -> list[str]:
        out = ["## Scale × LoRA factorial", "",
               "Two-way ANOVA with interaction, `metric ~ C(scale) * C(lora)` (statsmodels ols + anova_lm, Type II "
               "sums of squares), per variant, over the scales that have both LoRA on and off runs. Partial η² = "
               "SS_effect / (SS_effect + SS_residual); η² = SS_effect / SS_total. Δ: mean minus the untrained base's "
               "score."]
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
                        delta = self.delta(float(x.mean()), metric, scale) if x.size else ""
                        row.append(_mean_sd(x) + (f" {delta}" if delta else ""))
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
                                     plots().interaction_plot, cells, metric, self.scales,
                                     base={sc: self.base(metric, sc) for sc in self.scales})
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
                                     plots().rank_plot, means, metric, lower_is_better=lower_is_better(metric))
        if inv_frames:
            self.inversions = pd.concat(inv_frames, ignore_index=True)
        return out


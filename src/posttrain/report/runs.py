"""report.md sections: robust aggregates (rliable), training curves, failed runs and the notes."""

from __future__ import annotations

import math
from pathlib import Path

from posttrain import stats
from posttrain.report.format import _plural, f3, f4, md_table, plots, scale_key
from posttrain.results import COMPLETED


class RunsSections:
    """Sections of :class:`posttrain.report.builder.Report` (mixin: uses its ``s``, ``values``, ``_plot``...)."""

    # robust aggregates ---------------------------------------------------------------------------------------

    def _robust(self, plots_dir: Path) -> list[str]:
        out = ["## Robust aggregates (rliable)", "",
               "As rliable reports them (Agarwal et al. 2021): interquartile mean (IQM, mean of the middle 50% of "
               "runs) and probability of improvement P(a > b) (normalised Mann-Whitney U: a random run of a beats a "
               "random run of b, ties counted half), each with a 95% percentile bootstrap interval "
               f"({self.s.n_resamples} resamples, runs resampled within each group; n/a for n < 2). Δ: IQM minus the "
               "untrained base's score."]
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
                        delta = self.delta(stats.iqm(x), metric, scale)
                        row.append(f"{stats.iqm(x):.4f}{ci}" + (f" {delta}" if delta else ""))
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
        n_loss = sum(1 for c in self.curves if c["loss_curve"])
        n_reward = sum(1 for c in self.curves if c["reward_curve"])
        out += [f"{n_loss} runs with a loss curve, {n_reward} with a reward curve (`train.loss_curve`, "
                "`train.reward_curve`).", ""]
        out += self._plot("training curves", plots_dir / "training_curves.png", plots().training_curves,
                          self.curves, self.scales)
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



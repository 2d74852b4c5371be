"""PNG plots for :mod:`posttrain.report` (matplotlib, Agg backend; no display needed).

Every function writes one file and returns its matplotlib Figure (closed, still readable: tests inspect its axes),
or returns a one-line reason and writes nothing when the data cannot make the plot (the report prints the reason
instead of the image). docs/design.md "Report".
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scipy.stats  # noqa: E402

_DPI = 110


def _colors(names: Sequence[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _t_interval(x: np.ndarray) -> tuple[float, float]:
    """95% t-interval of the mean (scipy.stats.t); NaN for n < 2."""
    if x.size < 2:
        return math.nan, math.nan
    sem = scipy.stats.sem(x)
    if sem == 0:
        return float(x.mean()), float(x.mean())
    low, high = scipy.stats.t.interval(0.95, x.size - 1, loc=x.mean(), scale=sem)
    return float(low), float(high)


def _save(fig, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    plt.close(fig)
    return fig


BASE_STYLE = {"color": "dimgray", "ls": "--", "lw": 1.0, "zorder": 1}


def _base_line(ax, value: float | None) -> None:
    """The untrained base's score as a dashed horizontal line labelled "base"."""
    if value is not None and math.isfinite(value):
        ax.axhline(value, label="base", **BASE_STYLE)


def _dots_and_interval(ax, i: float, x: np.ndarray, color, jitter: np.random.Generator) -> None:
    """One variant at x position ``i``: its seeds as dots, its mean and 95% t-interval (hollow mean for n = 1)."""
    ax.scatter(i + jitter.uniform(-0.12, 0.12, x.size), x, s=14, color=color, alpha=0.6, zorder=2)
    low, high = _t_interval(x)
    mean = x.mean()
    if math.isfinite(low):
        ax.errorbar(i + 0.25, mean, yerr=[[mean - low], [high - mean]], fmt="o", color="black", ms=4, capsize=3,
                    zorder=3)
    else:
        ax.plot(i + 0.25, mean, "o", color="black", ms=4, mfc="white", zorder=3)


def accuracy_plot(values: pd.DataFrame, metric: str, scales: Sequence[str], loras: Sequence[str],
                  variants: Sequence[str], path: Path, *, base: dict | None = None):
    """One panel per (LoRA, scale): each variant's seeds as dots, its mean and 95% t-interval; base: dashed."""
    if values.empty:
        return "no completed run reports this metric"
    colors = _colors(list(variants))
    fig, axes = plt.subplots(len(loras), len(scales), figsize=(max(4.0, 0.55 * len(variants) + 1.5) * len(scales),
                                                                3.4 * len(loras)), squeeze=False, sharey=True)
    jitter = np.random.default_rng(0)
    for r, lora in enumerate(loras):
        for c, scale in enumerate(scales):
            ax = axes[r][c]
            cell = values[(values["scale"] == scale) & (values["lora"] == lora)]
            row_variants = [v for v in variants if v in set(values.loc[values["lora"] == lora, "variant"])]
            for i, variant in enumerate(row_variants):
                x = cell.loc[cell["variant"] == variant, metric].to_numpy(dtype=float)
                if x.size == 0:
                    continue
                _dots_and_interval(ax, i, x, colors[variant], jitter)
            _base_line(ax, (base or {}).get(scale))
            ax.set_xticks(range(len(row_variants)))
            ax.set_xticklabels(row_variants, rotation=45, ha="right", fontsize=8)
            ax.set_xlim(-0.5, max(len(row_variants), 2) - 0.5)
            ax.set_title(f"{scale}, LoRA {lora}", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
            if c == 0:
                ax.set_ylabel(metric, fontsize=8)
    fig.suptitle("seeds (dots), mean and 95% t-interval (black; hollow: n = 1); dashed: the untrained base",
                 fontsize=9)
    return _save(fig, path)


def forest_plot(comparisons: pd.DataFrame, metric: str, path: Path, *, baseline: str | None):
    """Differences of means with their bootstrap intervals, significant (after correction) in colour."""
    rows = comparisons[comparisons["metric"] == metric]
    if rows.empty:
        return "no pair could be compared (a single group per scale, or no baseline in any cell)"
    labels = [f"{r.a} − {r.b}  [{r.scale}, LoRA {r.lora}]" for r in rows.itertuples()]
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(rows) + 1.4))
    y = np.arange(len(rows))[::-1]
    for yi, r in zip(y, rows.itertuples()):
        untested = not math.isfinite(r.p_adj)
        color = "lightgray" if untested else ("tab:red" if r.significant else "tab:gray")
        if math.isfinite(r.ci_low):
            ax.hlines(yi, r.ci_low, r.ci_high, color=color, lw=2)
        ax.plot(r.diff, yi, "o", color=color if not untested else "gray", mfc="white" if untested else color)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel(f"difference of means, {metric} (95% bootstrap CI)", fontsize=8)
    what = f"vs baseline {baseline}" if baseline else "all pairs"
    ax.set_title(f"{what}: red = significant after correction, gray = not, hollow = not testable", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def rank_plot(means: dict[str, pd.DataFrame], metric: str, path: Path, *, lower_is_better: bool = False):
    """Rank (1 = best) of each variant at each scale, one line per variant, one panel per LoRA setting."""
    panels = {lora: m for lora, m in means.items() if m.shape[1] >= 2}
    if not panels:
        return "only one scale"
    variants = sorted({v for m in panels.values() for v in m.index}, key=str)
    colors = _colors(variants)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.8), squeeze=False)
    for ax, (lora, m) in zip(axes[0], panels.items()):
        ranks = m.rank(axis=0, ascending=lower_is_better, method="min")
        for variant in ranks.index:
            ax.plot(range(m.shape[1]), ranks.loc[variant].to_numpy(dtype=float), "o-", color=colors[variant],
                    label=variant)
        ax.set_xticks(range(m.shape[1]))
        ax.set_xticklabels(list(m.columns))
        ax.invert_yaxis()
        ax.set_ylabel("rank (1 = best)")
        ax.set_title(f"{metric}, LoRA {lora}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def interaction_plot(cells: dict[str, pd.DataFrame], metric: str, scales: Sequence[str], path: Path, *,
                     base: dict | None = None):
    """Scale x LoRA interaction: mean +- sd at each scale, one line per LoRA setting, one panel per variant; the
    untrained base's score at each scale dotted in gray (``base[scale]``)."""
    if not cells:
        return "no variant has two or more scales with both LoRA on and off"
    fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells), 3.4), squeeze=False)
    for ax, (variant, data) in zip(axes[0], cells.items()):
        present = [s for s in scales if s in set(data["scale"])]
        for lora, style in (("off", "o-"), ("on", "s--")):
            sub = data[data["lora"] == lora]
            stats = [sub.loc[sub["scale"] == s, metric].to_numpy(dtype=float) for s in present]
            mean = [x.mean() if x.size else math.nan for x in stats]
            sd = [x.std(ddof=1) if x.size > 1 else 0.0 for x in stats]
            ax.errorbar(range(len(present)), mean, yerr=sd, fmt=style, capsize=3, label=f"LoRA {lora}")
        base_y = [(base or {}).get(s, math.nan) for s in present]
        if any(math.isfinite(b) for b in base_y):
            ax.plot(range(len(present)), base_y, ":", color=BASE_STYLE["color"], marker="_", label="base")
        ax.set_xticks(range(len(present)))
        ax.set_xticklabels(present)
        ax.set_title(variant, fontsize=9)
        ax.set_ylabel(metric, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("scale x LoRA: mean +- sd over seeds (non-parallel lines = interaction); gray: the untrained base",
                 fontsize=9)
    return _save(fig, path)


def training_curves(curves: list[dict], scales: Sequence[str], path: Path):
    """Training loss per run, one row of panels per algorithm (each its own y axis: DPO, SimPO and KTO losses are
    not on one scale), one column per scale, colour = variant; online methods add a row of mean reward."""
    kinds = [k for k in ("loss_curve", "reward_curve") if any(c.get(k) for c in curves)]
    if not kinds:
        return "no result.json has train.loss_curve or train.reward_curve"
    panels = [(algo, kind) for kind in kinds
              for algo in sorted({c.get("algo") or c["variant"] for c in curves if c.get(kind)}, key=str)]
    present = [s for s in scales if any(c["scale"] == s and any(c.get(k) for k in kinds) for c in curves)]
    colors = _colors(sorted({c["variant"] for c in curves}, key=str))
    fig, axes = plt.subplots(len(panels), len(present), figsize=(4.6 * len(present), 2.8 * len(panels)),
                             squeeze=False)
    for r, (algo, kind) in enumerate(panels):
        for col, scale in enumerate(present):
            ax = axes[r][col]
            seen = set()
            for c in curves:
                points = c.get(kind) or []
                if c["scale"] != scale or not points or (c.get("algo") or c["variant"]) != algo:
                    continue
                steps, vals = zip(*points)
                label = c["variant"] if c["variant"] not in seen else None
                seen.add(c["variant"])
                ax.plot(steps, vals, "-" if c["lora"] == "off" else "--", color=colors[c["variant"]], alpha=0.7,
                        lw=1, label=label)
            ax.set_title(f"{algo}, {scale}: {'loss' if kind == 'loss_curve' else 'mean reward'}", fontsize=9)
            if r == len(panels) - 1:
                ax.set_xlabel("optimizer step", fontsize=8)
            ax.grid(alpha=0.3)
            if seen:
                ax.legend(fontsize=6)
    fig.suptitle("training curves, one row per algorithm (losses of different algorithms are not comparable); "
                 "solid: LoRA off, dashed: LoRA on", fontsize=9)
    fig.subplots_adjust(hspace=0.4)
    return _save(fig, path)


def main_figure(values: dict[str, pd.DataFrame], metrics: Sequence[str], scales: Sequence[str],
                loras: Sequence[str], base: dict, path: Path):
    """The paper-style figure: a task (metric) x scale grid; in each panel every variant (x LoRA) with its seed dots
    and 95% t-interval, the untrained base as a dashed line (``base[(metric, scale)]``)."""
    metrics = [m for m in metrics if not values[m].empty]
    if not metrics:
        return "no completed run reports a study metric"
    present = [s for s in scales if any(s in set(values[m]["scale"]) for m in metrics)]
    both = len(loras) > 1
    groups = sorted({(v, lo) for m in metrics for v, lo in zip(values[m]["variant"], values[m]["lora"])},
                    key=lambda g: (g[1], str(g[0])))
    colors = _colors(sorted({g[0] for g in groups}, key=str))
    fig, axes = plt.subplots(len(metrics), len(present), figsize=(max(3.6, 0.5 * len(groups) + 1.6) * len(present),
                                                                  3.0 * len(metrics)), squeeze=False)
    jitter = np.random.default_rng(0)
    for r, metric in enumerate(metrics):
        v = values[metric]
        for c, scale in enumerate(present):
            ax = axes[r][c]
            for i, (variant, lora) in enumerate(groups):
                x = v.loc[(v["scale"] == scale) & (v["variant"] == variant) & (v["lora"] == lora),
                          metric].to_numpy(dtype=float)
                if x.size:
                    _dots_and_interval(ax, i, x, colors[variant], jitter)
            _base_line(ax, base.get((metric, scale)))
            ax.set_xticks(range(len(groups)))
            ax.set_xticklabels([f"{g[0]}{' +LoRA' if both and g[1] == 'on' else ''}" for g in groups], rotation=45,
                               ha="right", fontsize=7)
            ax.set_xlim(-0.5, max(len(groups), 2) - 0.5)
            ax.grid(axis="y", alpha=0.3)
            if r == 0:
                ax.set_title(scale, fontsize=9)
            if c == 0:
                ax.set_ylabel(metric.replace(",", "\n"), fontsize=7)
    fig.suptitle("seeds (dots), mean and 95% t-interval (black); dashed: the untrained base", fontsize=9)
    return _save(fig, path)

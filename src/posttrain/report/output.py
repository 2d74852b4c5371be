"""Writing the analysis: summary.csv, comparisons.csv, inversions.csv, report.md (docs/design.md, "Report")."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import pandas as pd

from posttrain import stats
from posttrain.report.builder import Analysis, Report, Settings
from posttrain.report.format import PLOTS_DIR
from posttrain.report.loading import load_results, resolve_baseline, select_cells, select_metrics
from posttrain.report.study import POWER_COLUMNS

# ------------------------------------------------------------------------------------------------ output


def _csv(frame: pd.DataFrame, path: Path) -> None:
    frame = frame.copy()
    for col in frame.columns:
        if frame[col].dtype == bool:
            frame[col] = frame[col].map({True: "true", False: "false"})
    frame.to_csv(path, index=False, na_rep="", float_format="%.10g")


def write(root: Path, analysis: Analysis) -> list[Path]:
    """Write summary.csv, comparisons.csv, inversions.csv, power.csv and report.md into ``root``; return the paths."""
    paths = [root / "summary.csv", root / "comparisons.csv", root / "inversions.csv", root / "report.md",
             root / "power.csv"]
    _csv(analysis.summary, paths[0])
    comp = analysis.comparisons.reindex(columns=list(stats.COMPARISON_COLUMNS))
    comp["significant"] = comp["significant"].astype(bool)
    _csv(comp, paths[1])
    _csv(analysis.inversions, paths[2])
    paths[3].write_text(analysis.markdown, encoding="utf-8")
    _csv(analysis.power.reindex(columns=list(POWER_COLUMNS)), paths[4])
    return paths + list(analysis.plots.values())


def build(root: str | os.PathLike, *, metrics: Sequence[str] | None = None, baseline: str | None = None,
          alpha: float = 0.05, correction: str = "bonferroni", seed: int = 0,
          n_resamples: int = stats.DEFAULT_RESAMPLES, effect: float = stats.DEFAULT_EFFECT,
          power: float = stats.DEFAULT_POWER) -> Analysis:
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
                        n_resamples=n_resamples, effect=effect, power=power)
    return Report(root, loaded, settings).run()


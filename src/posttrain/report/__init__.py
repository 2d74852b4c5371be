"""``python -m posttrain.report DIR``: tables, statistics and plots over every result.json under DIR.

Reads every result.json under DIR (:func:`posttrain.results.iter_results`, which skips ``seed-<n>.<hash>``
archives; a truncated or incomplete one is listed in report.md and skipped), completed, failed and cancelled,
groups runs by (variant, scale, lora) as docs/design.md says (results without ``variant`` use ``algo``), and
compares every task's primary metric (``--metric`` to choose), writing into DIR:

- ``summary.csv``      one row per result.json: algo, variant, scale, lora, seed, status, every metric
                       (``task/metric`` as lm-eval names it), training tokens/seconds/steps, error, path.
- ``comparisons.csv``  one row per compared pair and metric (columns :data:`posttrain.stats.COMPARISON_COLUMNS`):
                       Welch's t-test, family-wise corrected p, Cohen's d, bootstrap interval of the difference.
- ``power.csv``        per comparison: minimum detectable effect at its seeds, seeds needed for ``--effect``,
                       and whether a null is real or underpowered.
- ``inversions.csv``   every pair of variants whose order inverts between two scales.
- ``report.md``        main table (with the base model's score and the change over it), the main figure,
                       comparisons, power, scale x LoRA factorial, ranking stability, cross-domain spread,
                       leverage, robust aggregates (rliable), training curves, failed and cancelled runs.
- ``plots/*.png``      main figure (task x scale), accuracy by variant, forest plot, ranks across scales,
                       interaction, training curves (one row per algorithm).

Labels drop the overrides every variant shares (named once in the header); the CSVs keep the full names.
With ``--wandb`` the tables and plots go to the sweep's one W&B report run and its dashboard view is built
(:mod:`posttrain.report.wandb_report`). User errors print one line to stderr and exit with status 2.

Modules: loading (result.json -> DataFrame), builder (the Report and its settings), tables / study / structure /
spread / runs (report.md sections), labels, format, output (CSV + report.md), cli, wandb_report, dashboard.
"""

from __future__ import annotations

from posttrain import stats
from posttrain.report.builder import Analysis, Report, Settings
from posttrain.report.cli import main
from posttrain.report.format import (DEFAULT_METRICS, KNOWN_SCALES, LOWER_IS_BETTER, TASK_METRIC_PRIORITY,
                                     UserError, is_stderr, lower_is_better, md_table, scale_key)
from posttrain.report.loading import Loaded, load_results, resolve_baseline, select_cells, select_metrics
from posttrain.report.output import build, write
from posttrain.report.wandb_report import log_to_wandb

__all__ = ["Analysis", "DEFAULT_METRICS", "KNOWN_SCALES", "LOWER_IS_BETTER", "Loaded", "Report", "Settings",
           "TASK_METRIC_PRIORITY", "UserError", "build", "is_stderr", "load_results", "log_to_wandb",
           "lower_is_better", "main", "md_table", "resolve_baseline", "scale_key", "select_cells", "select_metrics",
           "stats", "write"]

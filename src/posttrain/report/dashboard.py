"""The sweep's W&B dashboard as code: a saved workspace view (wandb-workspaces) of one sweep's group.

Built as an object by :func:`build_workspace` (no network needed; tests check its panels and filters); saved by
:func:`save_workspace` only when W&B runs online. Sections (docs/design.md "Report"; issue 13):

- "Study metrics": each study metric per run group (the runset groups runs by variant, then scale), mean and
  standard error over seeds;
- "Change over the base": ``delta/<metric>`` (run minus the untrained base, from each run's summary);
- "Training curves": ``train/loss`` over steps, grouped by variant (mean, standard error band);
- "Hyperparameters": a parallel-coordinates panel over algo, scale, lora, seed and each study metric.

The runset is filtered to the sweep's group and to training runs (job_type ``train``).
"""

from __future__ import annotations

from typing import Sequence

TRAIN_CURVES = ("train/loss",)
PARALLEL_KEYS = ("algo", "scale", "lora", "seed")


def workspace_name(group: str) -> str:
    return f"posttrain sweep {group}"


def build_workspace(*, entity: str, project: str, group: str, metrics: Sequence[str]):
    """The dashboard of one sweep as a ``wandb_workspaces.workspaces.Workspace`` (not saved)."""
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError:
        return None
    study = [wr.BarPlot(title=f"{m} by variant and scale", metrics=[wr.SummaryMetric(m)], groupby_aggfunc="mean",
                        groupby_rangefunc="stderr", orientation="h") for m in metrics]
    deltas = [wr.BarPlot(title=f"change over the base: {m}", metrics=[wr.SummaryMetric(f"delta/{m}")],
                         groupby_aggfunc="mean", groupby_rangefunc="stderr", orientation="h") for m in metrics]
    curves = [wr.LinePlot(title=f"{key} by variant", x="Step", y=[key], groupby=wr.Config("variant"),
                          groupby_aggfunc="mean", groupby_rangefunc="stderr") for key in TRAIN_CURVES]
    columns = [wr.ParallelCoordinatesPlotColumn(metric=wr.Config(k)) for k in PARALLEL_KEYS]
    columns += [wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(m)) for m in metrics]
    parallel = [wr.ParallelCoordinatesPlot(title="algo, scale, LoRA, seed -> study metrics", columns=columns)]
    sections = [ws.Section(name=name, panels=panels, is_open=True) for name, panels in (
        ("Study metrics", study), ("Change over the base", deltas), ("Training curves", curves),
        ("Hyperparameters", parallel))]
    return ws.Workspace(
        entity=entity, project=project, name=workspace_name(group), sections=sections,
        runset_settings=ws.RunsetSettings(filters=[ws.Metric("Group") == group, ws.Metric("JobType") == "train"],
                                          groupby=[ws.Config("variant"), ws.Config("scale")]))


def save_workspace(workspace) -> str:
    """Save the view to W&B (needs the network); returns its URL."""
    workspace.save()
    return str(workspace.url)

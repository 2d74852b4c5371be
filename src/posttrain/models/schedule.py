"""THE learning-rate schedule: linear warmup, then cosine decay (or constant), as a multiplier of the peak LR.

Used by both engines of the training loop (``lr_lambda``: HF ``get_cosine_schedule_with_warmup``, decay to 0) and by
the embedded base builder (posttrain.embedded: decay to ``final_lr_frac`` of the peak, so a finished base is not the
tail of an unfinished schedule; docs/design.md).
"""

from __future__ import annotations

import math
import warnings


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, final_lr_frac: float = 0.0,
                  warmup_offset: int = 1) -> float:
    """LR multiplier at ``step``: ``(step + 1) / (warmup_steps + warmup_offset)`` during warmup (offset 1: HF's ramp,
    which never reaches 1 inside the warmup; 0: reaches 1 at its last step), then cosine from 1 down to
    ``final_lr_frac`` at ``total_steps`` (and kept there after)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + warmup_offset)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_lr_frac + (1 - final_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))


#: ``trainer.schedule`` -> multiplier at (step, total steps, warmup steps).
SCHEDULES = {
    "cosine": warmup_cosine,
    "constant": lambda step, total, warmup: warmup_cosine(step, total, warmup) if step < warmup else 1.0,
}


def lr_lambda(total_steps: int, warmup_steps: int, schedule: str):
    """The loop's schedule as a ``LambdaLR`` function: linear warmup then cosine to 0, or constant."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown trainer.schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    fn = SCHEDULES[schedule]
    return lambda step: fn(step, total_steps, warmup_steps)


def warmup_steps(trainer_cfg, total_steps: int) -> int:
    return int(math.ceil(float(trainer_cfg.warmup_ratio) * total_steps))


def advance_schedule(scheduler) -> None:
    """One schedule step without an optimizer step, on purpose: torch's "lr_scheduler.step() before
    optimizer.step()" warning does not apply."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
        scheduler.step()

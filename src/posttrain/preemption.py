"""Checkpoints for long runs: on a time interval, and on Slurm's requeue signal, so a requeued run loses nothing.

Slurm warns a job before its time limit or a preemption with a signal (``--signal=USR2@<seconds>``; submitit's
jobs get USR2 and submitit's handler requeues the job and exits). Left alone, that handler exits in the middle of a
step and the run resumes from its last checkpoint, which by default came at the last epoch end: at the real scales
an epoch is ~900 optimizer steps, hours of GPU time. :class:`Preemption` catches the signal instead, lets the loop
finish the step it is in, has it write a checkpoint, and only then hands the signal to the handler that was there
before (submitit's: requeue, exit), or, with none, ends the process as the signal would have.

Every rank must agree to checkpoint at the same step (DeepSpeed saves are collective; Slurm may deliver the signal
to the ranks at slightly different moments): the loop asks :meth:`due` with the engine's all-reduce, which combines
the signal flag and the time interval of every rank into one decision.
"""

from __future__ import annotations

import signal
import sys
import time
from typing import Callable

REQUEUE_SIGNALS = (signal.SIGUSR2,)


class Preemption:
    """Defers the requeue signal to the next step boundary; also says when a time-based checkpoint is due."""

    def __init__(self, every_minutes: float | None = 30.0, signals=REQUEUE_SIGNALS):
        self.every_s = None if not every_minutes else float(every_minutes) * 60.0
        self.last = time.monotonic()
        self.pending: tuple[int, object] | None = None
        self._previous: dict[int, object] = {}
        self._signals = signals

    def __enter__(self) -> "Preemption":
        for sig in self._signals:
            try:
                self._previous[sig] = signal.signal(sig, self._defer)
            except ValueError:  # not the main thread (an in-process caller): no signal handling there
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _defer(self, signum, frame) -> None:
        if self.pending is None:
            print(f"[preempted] {signal.Signals(signum).name}: checkpointing at the end of this step, then "
                  "requeueing", file=sys.stderr, flush=True)
        self.pending = (signum, frame)

    def due(self, all_reduce_max: Callable[[list[float]], list[float]]) -> tuple[bool, bool]:
        """``(checkpoint now, stop after it)``, the same on every rank (one small all-reduce per step)."""
        timed = self.every_s is not None and time.monotonic() - self.last >= self.every_s
        signalled, timed = (bool(v) for v in all_reduce_max([float(self.pending is not None), float(timed)]))
        return signalled or timed, signalled

    def saved(self) -> None:
        self.last = time.monotonic()

    def hand_over(self) -> None:
        """After the checkpoint: run the signal's previous handler (submitit: requeue, exit), or end as the signal
        would. Ranks whose previous handler returns (submitit's on rank > 0) exit too: the requeue restarts them."""
        signum, frame = self.pending or (REQUEUE_SIGNALS[0], None)
        previous = self._previous.get(signum, signal.SIG_DFL)
        self.__exit__()
        if callable(previous):
            previous(signum, frame)
        raise SystemExit(128 + int(signum))

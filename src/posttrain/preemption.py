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

Cancellation is the other kind of signal: Ctrl-C (SIGINT, Python's KeyboardInterrupt) and SIGTERM (``kill``,
``timeout``, a container stop). :func:`cancellation` turns SIGTERM into :class:`Cancelled` (a KeyboardInterrupt) for
the duration of a run, so both unwind through run.py, which records the cell as ``cancelled`` with the steps done and
keeps its checkpoint (docs/design.md, "Contracts"). Inside the training loop :class:`Preemption` defers them as it
defers USR2: the step in progress finishes, a checkpoint is written, then :class:`Cancelled` is raised, so a
relaunch resumes exactly there; the same signal a second time cancels at once. Under submitit SIGTERM already has a
handler (submitit lets it pass, since Slurm sends it on preemption too, where USR2 requeues): it is left in place.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import time
from typing import Callable, Iterator

REQUEUE_SIGNALS = (signal.SIGUSR2,)
CANCEL_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Cancelled(KeyboardInterrupt):
    """A run stopped by a signal (SIGTERM; Ctrl-C is Python's own KeyboardInterrupt); exit status 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"{signal.Signals(signum).name}")
        self.signum = int(signum)


def signal_of(exc: BaseException) -> int:
    """The signal number behind a cancellation (SIGINT for a plain KeyboardInterrupt)."""
    return int(getattr(exc, "signum", signal.SIGINT))


def _raise_cancelled(signum, frame) -> None:
    raise Cancelled(signum)


@contextlib.contextmanager
def cancellation() -> Iterator[None]:
    """SIGTERM raises :class:`Cancelled` inside the block (where no one else handles it); restored on exit."""
    previous = None
    try:
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            previous = signal.signal(signal.SIGTERM, _raise_cancelled)
    except ValueError:  # not the main thread: nothing to install
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


class Preemption:
    """Defers the requeue and cancel signals to the next step boundary; also says when a time-based checkpoint is
    due."""

    def __init__(self, every_minutes: float | None = 30.0, signals=REQUEUE_SIGNALS, cancel_signals=CANCEL_SIGNALS):
        self.every_s = None if not every_minutes else float(every_minutes) * 60.0
        self.last = time.monotonic()
        self.pending: tuple[int, object] | None = None
        self._previous: dict[int, object] = {}
        self._signals = signals
        self._cancel = cancel_signals
        self.state = None  # the loop's live TrainState (train.py), so an exception can carry the steps done

    def __enter__(self) -> "Preemption":
        for sig in self._signals:
            try:
                self._previous[sig] = signal.signal(sig, self._defer)
            except ValueError:  # not the main thread (an in-process caller): no signal handling there
                pass
        for sig in self._cancel:  # only where Python's default or run.py's cancellation() would act on it
            try:
                if signal.getsignal(sig) in (signal.default_int_handler, signal.SIG_DFL, _raise_cancelled):
                    self._previous[sig] = signal.signal(sig, self._defer_cancel)
            except ValueError:
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

    def _defer_cancel(self, signum, frame) -> None:
        if self.pending is not None and self.pending[0] == signum:
            raise Cancelled(signum)  # the same signal again: stop now (the last checkpoint stays); torchrun's
            # SIGTERM after a Ctrl-C is not a second request, it lets the step finish and checkpoint
        print(f"\n[cancelling] {signal.Signals(signum).name}: checkpointing at the end of this step, then stopping "
              "(send it again to stop at once)", file=sys.stderr, flush=True)
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
        if signum in self._cancel:
            raise Cancelled(signum)  # run.py records the cell as cancelled; the checkpoint is this step's
        if callable(previous):
            previous(signum, frame)
        raise SystemExit(128 + int(signum))

"""What an algorithm carries from one optimizer step to the next, kept and checkpointed by the one loop.

Most objectives are stateless: a step's loss depends on the weights and the step's data alone. A few are not:

- beta-DPO's running mean of the reward margins (Wu et al., NeurIPS 2024, arXiv 2407.08639: an EMA, momentum 0.9);
- BCO's running mean ``delta`` of the implicit rewards (Jung et al. 2024, arXiv 2404.04656; TRL's ``RunningMoments``);
- PPO's value head and its optimizer (algorithms/critic.py).

The loop owns one :class:`LoopMemory` per run. Objectives ask it for named objects (``memory.get(key, factory)``);
each object has ``state_dict`` / ``load_state_dict``, so the loop's checkpoint holds them and a resumed run continues
with exactly the state the uninterrupted run had. Objects that observe the data during a step (running statistics)
also have ``commit(all_reduce_sum)``: the loop calls it once after every optimizer step on every rank, so the
statistic is the same global value on every rank and advances once per optimizer step, whatever the micro-batch split.
"""

from __future__ import annotations

from typing import Callable

import torch


class RunningMean:
    """A running mean of a detached per-example quantity, advanced once per optimizer step.

    ``momentum`` None: the cumulative mean of the per-step means (TRL's ``RunningMoments`` fed one batch mean per
    step, as its BCO does); otherwise an EMA ``mu <- momentum * mu + (1 - momentum) * step mean`` (beta-DPO: 0.9),
    started at the first step's mean. ``value`` is None before the first commit: the loss then uses the batch's own
    mean (the pure functions' default; the unpaired family's preparer passes the whole step's mean over micro-batches
    and ranks instead), which is what the first step of both papers' algorithms sees.

    Deliberate difference from TRL's BCO: TRL updates the mean with the current batch before using it; here a step
    uses the statistic of the steps before it (the current step's mean is only known after all its micro-batches,
    on all ranks), and the first step its own batch mean.
    """

    def __init__(self, momentum: float | None = None):
        self.momentum = momentum
        self.value: float | None = None
        self.count = 0  # committed steps
        self._sum, self._n = 0.0, 0

    def observe(self, values: torch.Tensor) -> None:
        values = values.detach().float()
        self._sum += float(values.sum())
        self._n += int(values.numel())

    def commit(self, all_reduce_sum: Callable[[list[float]], list[float]]) -> None:
        total, n = all_reduce_sum([self._sum, float(self._n)])
        self._sum, self._n = 0.0, 0
        if n == 0:
            return
        mean = total / n
        self.count += 1
        if self.value is None:
            self.value = mean
        elif self.momentum is None:
            self.value += (mean - self.value) / self.count
        else:
            self.value = self.momentum * self.value + (1.0 - self.momentum) * mean

    def state_dict(self) -> dict:
        return {"momentum": self.momentum, "value": self.value, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.momentum, self.value, self.count = state["momentum"], state["value"], int(state["count"])


class LoopMemory:
    """Named stateful objects of one run (see the module docstring); ``state_dict`` goes into the checkpoint."""

    def __init__(self, saved: dict | None = None):
        self._objects: dict[str, object] = {}
        self._saved = dict(saved or {})  # restored lazily: an object is built by whoever first asks for it

    def get(self, key: str, factory: Callable[[], object]):
        """The object named ``key``, built by ``factory()`` on first use (and then restored from the checkpoint)."""
        if key not in self._objects:
            obj = factory()
            if key in self._saved:
                obj.load_state_dict(self._saved.pop(key))
            self._objects[key] = obj
        return self._objects[key]

    def commit(self, all_reduce_sum: Callable[[list[float]], list[float]]) -> None:
        """End of an optimizer step: every running statistic folds in what it observed (in key order on all ranks)."""
        for key in sorted(self._objects):
            commit = getattr(self._objects[key], "commit", None)
            if commit is not None:
                commit(all_reduce_sum)

    def state_dict(self) -> dict:
        return {**self._saved, **{k: o.state_dict() for k, o in self._objects.items()}}

"""Evaluation on all of a run's ranks: lm-eval's own data parallelism around our in-memory model.

docs/real-scales.md ("Evaluation on every rank") and docs/design.md ("Layers": evaluate). lm-eval's evaluator
already knows data parallelism: it gives rank r the documents r, r+N, r+2N, ... of each task
(``lm.rank`` / ``lm.world_size``), pads the request counts so every rank runs as many requests, and gathers the
per-document metric values to rank 0 (``lm.gather_object``), which aggregates them exactly as one process would.
Its HFLM only turns this on when it builds the model itself under ``accelerate launch``; given a model instance it
reports rank 0 of 1. :class:`DataParallelHFLM` reports the process group's rank and size and implements
``all_gather`` and ``barrier`` over torch.distributed (gloo on CPU, NCCL on GPU) instead of through an Accelerate
object (``gather_object`` is HFLM's own, already torch.distributed).

One thing lm-eval's sharding does not keep: random few-shot sampling draws from one generator per task, advanced
document by document, so a rank that builds only its own documents' prompts draws other few-shot examples than one
process does (lm-eval's own TODO in ``Task.build_all_requests``; gsm8k's 8-shot prompts are drawn that way).
:class:`ShardedTaskManager` therefore builds every document's prompt on every rank (string work, no model) and keeps
the rank's share: the same prompts as one process, document for document, so rank 0's metrics are the
single-process metrics (0/1 metrics exactly; log-likelihoods up to the batch composition's float rounding).

A task with fewer documents than ranks (``eval.limit=1`` on two ranks) cannot be sharded (a rank without documents
breaks lm-eval's gather): :func:`eval_world_size` then answers 1 and rank 0 evaluates alone, as before. The base
scores are built by all ranks together through posttrain.cache.cached_json_on_all_ranks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from posttrain.models import distributed


def eval_world_size(limit, ranks: int | None = None) -> int:
    """How many of the ``ranks`` (default: the process group's) share an evaluation with ``eval.limit`` =
    ``limit``: all of them, unless the limit leaves fewer documents than ranks (lm-eval's limit: a count, or below
    1.0 a fraction of each task), where rank 0 evaluates alone."""
    ranks = distributed.world_size() if ranks is None else int(ranks)
    if ranks > 1 and limit is not None and float(limit) >= 1.0 and int(float(limit)) < ranks:
        return 1
    return ranks


class DataParallelHFLM(HFLM):
    """lm-eval's HFLM over an in-memory model, one per rank, each evaluating its share of the documents."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # a model instance: HFLM sets rank 0 of 1
        self._rank = torch.distributed.get_rank()
        self._world_size = torch.distributed.get_world_size()

    def all_gather(self, tensor):
        """Every rank's ``tensor`` concatenated along dim 0 in rank order (a 0-d tensor counts as shape [1]), as
        Accelerate's ``gather`` that HFLM uses under ``accelerate launch``."""
        one = (tensor if tensor.ndim else tensor[None]).contiguous()
        parts = [torch.empty_like(one) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, one)
        return torch.cat(parts)

    def barrier(self):
        torch.distributed.barrier()


def _build_share(task, build: Callable) -> Callable:
    """``task.build_all_requests`` that builds every document's requests as one process does, then keeps only the
    documents of this rank (``doc_id % world_size == rank``: lm-eval's own ``doc_iterator`` split)."""

    def build_all_requests(*, rank: int = 0, world_size: int = 1, **kwargs) -> None:
        build(rank=0, world_size=1, **kwargs)
        docs = len({inst.doc_id for inst in task._instances})
        if docs < world_size:
            raise ValueError(f"task {task.task_name} has {docs} document(s) for {world_size} ranks: raise eval.limit "
                             f"to at least {world_size} (or set it to null)")
        task._instances = [inst for inst in task._instances if inst.doc_id % world_size == rank]

    return build_all_requests


class ShardedTaskManager(TaskManager):
    """lm-eval's TaskManager whose tasks build their few-shot prompts as one process does, then keep this rank's
    share (see the module docstring)."""

    def load(self, *args, **kwargs):
        loaded = super().load(*args, **kwargs)
        for task in loaded["tasks"].values():
            task.build_all_requests = _build_share(task, task.build_all_requests)
        return loaded

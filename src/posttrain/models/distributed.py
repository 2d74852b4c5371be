"""torch.distributed from the environment: Slurm tasks (submitit), torchrun, or one process.

``setup_distributed()`` is called once at the start of a run, before any model is built:

- torchrun / a launcher that already exported ``RANK`` and ``WORLD_SIZE``: those are used as they are;
- a submitit Slurm job (``SUBMITIT_EXECUTOR=slurm``): one task per GPU; ranks from submitit's ``JobEnvironment``
  (``global_rank``, ``local_rank``, ``num_tasks``), ``MASTER_ADDR`` = the job's first host, ``MASTER_PORT`` derived
  from the Slurm job id (so concurrent jobs on one node do not collide);
- otherwise world size 1: the variables are set for a single process (rank 0, a free local port), so DeepSpeed
  finds them and does not fall back to MPI discovery (mpi4py).

Without CUDA it sets ``DS_ACCELERATOR=cpu`` (DeepSpeed picks its accelerator when first imported, so this must
run before ``import deepspeed``) and uses gloo; with CUDA each rank selects ``cuda:<local rank>`` and uses NCCL.
With more than one process the process group is initialised here; with one it is left to DeepSpeed (and never
needed by the plain torch engine).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch

#: Base of the port range derived from a Slurm job id (``MASTER_PORT = PORT_BASE + job_id % PORT_SPAN``).
PORT_BASE, PORT_SPAN = 20000, 20000


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    source: str  # "torchrun" | "slurm" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_env():
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or "SLURM_JOB_ID" not in os.environ:
        return None
    try:
        import submitit

        return submitit.JobEnvironment()
    except Exception:  # noqa: BLE001 - not a submitit job after all: fall through to the next source
        return None


def discover() -> DistInfo:
    """Where this process sits (rank, local rank, world size) and which source said so; exports the variables."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
        env.setdefault("LOCAL_RANK", str(local))
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in env:
            if world > 1:
                raise RuntimeError("RANK and WORLD_SIZE are set but MASTER_PORT is not: launch with torchrun or set "
                                   "MASTER_ADDR/MASTER_PORT for every rank")
            env["MASTER_PORT"] = str(free_port())
        return DistInfo(rank, local, world, "torchrun")
    job = _slurm_env()
    if job is not None:
        rank, local, world = int(job.global_rank), int(job.local_rank), int(job.num_tasks)
        env.setdefault("MASTER_ADDR", job.hostnames[0] if world > 1 else "127.0.0.1")
        if world > 1:  # every task must agree on the port without talking: derive it from the job id
            job_id = int("".join(ch for ch in env["SLURM_JOB_ID"] if ch.isdigit()) or 0)
            env.setdefault("MASTER_PORT", str(PORT_BASE + job_id % PORT_SPAN))
        else:
            env.setdefault("MASTER_PORT", str(free_port()))
        env.update(RANK=str(rank), LOCAL_RANK=str(local), WORLD_SIZE=str(world))
        return DistInfo(rank, local, world, "slurm")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(free_port()))
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    return DistInfo(0, 0, 1, "single")


_INFO: DistInfo | None = None


def setup_distributed(timeout_minutes: float = 60.0) -> DistInfo:
    """Idempotent: discover the ranks, pick the device, initialise the process group when world size > 1.

    ``timeout_minutes`` bounds every collective: generous, because rank 0 may build shared caches (a tiny base,
    self-play data) while the other ranks already wait in DeepSpeed's first broadcast.
    """
    global _INFO
    if _INFO is not None:
        return _INFO
    info = discover()
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank % torch.cuda.device_count())
        backend = "nccl"
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        backend = "gloo"
    if info.world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size,
                                             timeout=timedelta(minutes=timeout_minutes))
    _INFO = info
    return info


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0")) if _INFO is None else _INFO.rank


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def is_main_process() -> bool:
    """True on global rank 0 (and in a plain single process): the one that writes result.json, logs to W&B."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        torch.distributed.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks (float64 on the CPU with gloo, on the current GPU with NCCL); identity alone."""
    return _all_reduce(values, "SUM")


def all_reduce_max(values: list[float]) -> list[float]:
    """Element-wise maximum over ranks; identity alone."""
    return _all_reduce(values, "MAX")


def _all_reduce(values: list[float], op: str) -> list[float]:
    if world_size() == 1:
        return [float(v) for v in values]
    device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" \
        else torch.device("cpu")
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=getattr(torch.distributed.ReduceOp, op))
    return t.tolist()


def all_reduce_grads_(params) -> None:
    """Sum the gradients of ``params`` over the ranks in place, for a module kept outside DeepSpeed (PPO's value
    head); a parameter without a gradient on this rank contributes zeros. Identity alone."""
    if world_size() == 1:
        return
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        torch.distributed.all_reduce(param.grad)


def mean_over_ranks(stats: dict[str, float]) -> dict[str, float]:
    """Each key's mean over the ranks that have it (ranks may log different keys: a rank with no batch logs none)."""
    if world_size() == 1:
        return dict(stats)
    gathered: list = [None] * world_size()
    torch.distributed.all_gather_object(gathered, {k: float(v) for k, v in stats.items()})
    keys = sorted({k for g in gathered for k in g})
    return {k: sum(g[k] for g in gathered if k in g) / sum(1 for g in gathered if k in g) for k in keys}

"""The optimisation engine behind the loop: backward, step, schedule, state for checkpoints.

Two engines behind the same calls (``backward``, ``step``, ``lr``, ``state_dict``/``load_state_dict``, plus ``model``
for forwards, ``rank``/``world_size`` and ``all_reduce_sum``/``all_reduce_max``/``mean_over_ranks`` for the data
split and the logs):

- ``TorchEngine``: plain PyTorch on one process (AdamW, cosine with linear warmup from models/schedule.py, gradient
  clipping).
- ``DeepSpeedEngine``: DeepSpeed ZeRO 0-3, one rank per GPU (or per process on CPU with gloo), built from the
  trainer config so that both engines optimise the same thing: AdamW with the trainer's betas/eps/weight decay
  (decay on matrices only, as TorchEngine), the same warmup+cosine ``LambdaLR`` (built by DeepSpeed on its own
  optimizer), gradient clipping at ``trainer.max_grad_norm``; ``trainer.precision=bf16-mixed`` is DeepSpeed's bf16
  mode (bf16 module, float32 master weights and states; under ZeRO-3 float32 gradient accumulation), on GPU and CPU
  ranks alike (models/precision.py).

Both engines expose ``autocast()``: the context every forward of the loop runs in (bf16 autocast over float32
master weights for ``bf16-mixed`` on the plain engine; nothing otherwise).

Gradient accumulation stays the loop's: it calls ``backward`` once per micro-batch with losses ALREADY divided by
the whole step's example/token count over ALL ranks (``all_reduce_sum``), then ``step`` once. DeepSpeed runs with
``managed_gradient_accumulation: false`` and ``gradient_accumulation_steps: 1``: ``backward`` only accumulates
(ZeRO-2/3 reduce-scatter into their partitions as they go) and never rescales by 1/GAS, every ``step`` is the
boundary (reduction, clipping, update). DeepSpeed averages gradients over the data-parallel ranks, so ``backward``
multiplies the loss by the world size: the update is then exactly the single-process update of the same step.
(DeepSpeed 0.19.8: the default managed mode with GAS=1 and one ``step`` after several backwards keeps only the
last micro-batch's gradient under ZeRO-2 (measured: grad norm 0.49 instead of 0.75 on the test model);
``set_gradient_accumulation_boundary`` needs the boundary set before the LAST backward, which the engine cannot
know; managed GAS=n with ``scale_wrt_gas=False`` needs a ``step()`` per micro-batch and a fixed micro-batch count,
which the shorter last step of an epoch breaks.)

Forwards must go through ``engine.model`` (the DeepSpeed engine module): DeepSpeed's forward resets ZeRO's
per-micro-batch state and hooks its backward prologue onto the outputs. ``engine.module`` is the bare model.

ZeRO-3 partitions the weights: a forward that not every rank runs hangs. ``gathered(model)`` gathers the full
weights on every rank (collective: every rank must enter it) and detaches ZeRO-3's forward hooks, so inside it each
rank may generate or evaluate on its own; it is a no-op for every other engine.
"""

from __future__ import annotations

import shutil
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch

from posttrain.cell import deepspeed_on
from posttrain.models import distributed
from posttrain.models.precision import Precision
from posttrain.models.schedule import advance_schedule as _advance_schedule, lr_lambda  # noqa: F401
from posttrain.models.schedule import warmup_steps as _warmup_steps


def _precision(trainer_cfg, *, deepspeed: bool, cuda: bool | None = None) -> Precision:
    return Precision.from_config(trainer_cfg.get("precision", "fp32"), deepspeed=deepspeed, cuda=cuda)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> tuple[list[dict], list[torch.nn.Parameter]]:
    """AdamW groups: weight decay on matrices (ndim >= 2), none on vectors (norms, biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], params


class TorchEngine:
    rank = 0
    world_size = 1

    def __init__(self, model: torch.nn.Module, trainer_cfg, total_steps: int):
        self.model = model
        self.module = model
        groups, params = _param_groups(model, float(trainer_cfg.weight_decay))
        self.optimizer = torch.optim.AdamW(groups, lr=float(trainer_cfg.lr), betas=tuple(trainer_cfg.betas),
                                           eps=float(trainer_cfg.eps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(total_steps, _warmup_steps(trainer_cfg, total_steps), str(trainer_cfg.schedule)))
        self.max_grad_norm = trainer_cfg.max_grad_norm
        self.params = params
        self.device = next(model.parameters()).device
        self.precision = _precision(trainer_cfg, deepspeed=False)

    def autocast(self):
        return self.precision.autocast(self.device)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        """Clip, step the optimizer and the schedule, zero the gradients; returns the gradient norm."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, float(self.max_grad_norm or float("inf")))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def skip_step(self) -> None:
        """An optimizer step without data (no micro-batch on any rank): the schedule advances, the weights and the
        optimizer's moments do not (a zero-gradient AdamW step would still move them by momentum and decay)."""
        _advance_schedule(self.scheduler)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @staticmethod
    def all_reduce_sum(values: list[float]) -> list[float]:
        return [float(v) for v in values]

    all_reduce_max = all_reduce_sum  # one process: the identity

    @staticmethod
    def mean_over_ranks(stats: dict) -> dict:
        return dict(stats)

    @staticmethod
    def all_reduce_grads_(params) -> None:  # one process: nothing to sum
        return None

    def state_dict(self) -> dict:
        trainable = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        return {"trainable": trainable, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "trainable" not in state:
            raise RuntimeError("this checkpoint was written by the DeepSpeed engine; resume it with the same "
                               "deepspeed config (or delete the checkpoint directory to start over)")
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state["trainable"].items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed

#: Keys of a conf/deepspeed/*.yaml that are ours, not DeepSpeed's.
_OWN_KEYS = ("enabled", "stage", "zero", "config", "torch_adam")
#: bare model -> its DeepSpeed engine (so ``gathered(model)`` works on the model the caller holds).
_ENGINES: "weakref.WeakKeyDictionary[torch.nn.Module, object]" = weakref.WeakKeyDictionary()


def _plain(cfg) -> dict:
    if cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return dict(cfg)


def deepspeed_enabled(deepspeed_cfg) -> bool:
    """Whether the ``deepspeed`` config turns DeepSpeed on: the one rule, :func:`posttrain.cell.deepspeed_on`."""
    return deepspeed_on(deepspeed_cfg)


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _offloads(zero: dict, what: str) -> bool:
    device = (zero.get(f"offload_{what}") or {}).get("device", "none")
    return device not in (None, "none")


def deepspeed_config(trainer_cfg, deepspeed_cfg, *, world_size: int, cuda: bool) -> dict:
    """DeepSpeed's config dict from our trainer config and a conf/deepspeed/*.yaml (``stage``, ``zero``, ``config``)."""
    ds = _plain(deepspeed_cfg)
    unknown = sorted(set(ds) - set(_OWN_KEYS))
    if unknown:
        raise ValueError(f"unknown deepspeed option(s) {unknown}; known: {list(_OWN_KEYS)} (DeepSpeed's own keys go "
                         "under deepspeed.config, ZeRO options under deepspeed.zero)")
    stage = int(ds.get("stage", 0))
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.stage must be 0, 1, 2 or 3, not {stage}")
    zero = {**(ds.get("zero") or {}), "stage": stage}
    offload_optimizer = _offloads(zero, "optimizer")
    # torch's AdamW everywhere except GPU + optimizer offload, where DeepSpeed's CPU Adam (a compiled op) is the
    # reason to offload at all; on a CPU-only machine nothing is compiled for the optimizer.
    torch_adam = ds.get("torch_adam")
    torch_adam = (not (cuda and offload_optimizer)) if torch_adam is None else bool(torch_adam)
    bf16 = _precision(trainer_cfg, deepspeed=True, cuda=cuda).deepspeed_bf16
    micro = int(trainer_cfg.micro_batch_size)
    max_norm = trainer_cfg.max_grad_norm
    config = {
        "train_micro_batch_size_per_gpu": micro,
        # The loop owns accumulation (see the module docstring): DeepSpeed never divides by a GAS.
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro * world_size,
        "managed_gradient_accumulation": False,
        "gradient_clipping": float(max_norm) if max_norm else 0.0,
        "optimizer": {"type": "AdamW", "params": {
            "lr": float(trainer_cfg.lr), "betas": [float(b) for b in trainer_cfg.betas], "eps": float(trainer_cfg.eps),
            "weight_decay": float(trainer_cfg.weight_decay), "torch_adam": torch_adam}},
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10 ** 12,
        "wall_clock_breakdown": False,
    }
    if bf16 and stage == 3:  # sum the step's micro-batch gradients in float32, as the plain engine does (DeepSpeed's
        # default accumulates in the module's bf16; ZeRO-0 refuses the mix, ZeRO-2 reduces into its fp32 partitions)
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if torch_adam and offload_optimizer:
        config["zero_force_ds_cpu_optimizer"] = False  # torch AdamW on offloaded states (CPU-only machines)
    return _merge(config, ds.get("config") or {})


class DeepSpeedEngine:
    """The loop's engine on DeepSpeed (ZeRO 0-3). Call ``setup_distributed()`` first on multi-process runs."""

    def __init__(self, model: torch.nn.Module, trainer_cfg, total_steps: int, deepspeed_cfg, *,
                 checkpoint_dir: str | Path | None = None):
        from posttrain.models.distributed import setup_distributed

        info = setup_distributed()  # idempotent; also sets DS_ACCELERATOR=cpu before deepspeed is imported
        import deepspeed

        cuda = torch.cuda.is_available()
        self.config = deepspeed_config(trainer_cfg, deepspeed_cfg, world_size=info.world_size, cuda=cuda)
        self.stage = int(self.config["zero_optimization"]["stage"])
        self.precision = _precision(trainer_cfg, deepspeed=True, cuda=cuda)
        if not self.config["bf16"]["enabled"] and any(p.dtype in (torch.bfloat16, torch.float16)
                                                      for p in model.parameters()):
            model.float()  # no DeepSpeed bf16 (CPU, or fp32): float32 weights (a LoRA run's bf16 base included)
        groups, params = _param_groups(model, float(trainer_cfg.weight_decay))
        self._frozen = any(not p.requires_grad for p in model.parameters())
        fn = lr_lambda(total_steps, _warmup_steps(trainer_cfg, total_steps), str(trainer_cfg.schedule))
        # ZeRO-0 in fp32 leaves the optimizer unwrapped and reports no gradient norm: clip (and measure) in a
        # pre-step hook of the optimizer, after DeepSpeed's all-reduce, exactly as TorchEngine does.
        self._own_clip = self.stage == 0 and not self.config["bf16"]["enabled"]
        if self._own_clip:
            self._max_norm = float(self.config["gradient_clipping"] or float("inf"))
            self.config["gradient_clipping"] = 0.0
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=groups, config=self.config,
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, fn))
        self._norm = None
        if self._own_clip:
            self._params = params
            self.ds.basic_optimizer.register_step_pre_hook(self._clip)
        self.module = model
        self.model = self.ds  # forwards go through DeepSpeed's forward (ZeRO state, backward prologue)
        self.rank, self.world_size = info.rank, info.world_size
        self.device = self.ds.device
        self.checkpoint_root = None if checkpoint_dir is None else Path(checkpoint_dir) / "deepspeed"
        self._last_tag = None
        _ENGINES[model] = self.ds

    def autocast(self):
        return self.precision.autocast(self.device)

    def _clip(self, optimizer, args, kwargs):
        self._norm = float(torch.nn.utils.clip_grad_norm_(self._params, self._max_norm))

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages over ranks; the loop's loss is already a share of the global step (see docstring).
        self.ds.backward(loss * self.world_size if self.world_size > 1 else loss, scale_wrt_gas=False)

    def step(self) -> float:
        """Reduce, clip, update, schedule, zero the gradients (one optimizer step); returns the gradient norm."""
        self._norm = None
        self.ds.step()
        norm = self._norm if self._own_clip else self.ds.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)

    def skip_step(self) -> None:
        """As TorchEngine.skip_step; DeepSpeed's step counter advances too (it names the checkpoint tags)."""
        _advance_schedule(self.scheduler)
        self.ds.global_steps += 1

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    all_reduce_sum = staticmethod(distributed.all_reduce_sum)
    all_reduce_max = staticmethod(distributed.all_reduce_max)
    all_reduce_grads_ = staticmethod(distributed.all_reduce_grads_)
    mean_over_ranks = staticmethod(distributed.mean_over_ranks)

    # Checkpoints: DeepSpeed's own (each rank writes its partitions) under <checkpoint_dir>/deepspeed/<tag>/; the
    # loop's checkpoint.pt (written by rank 0 after every rank returned from state_dict) names the tag, so it stays
    # the commit point of a checkpoint. The newest two tags are kept (the committed one and the one being committed).
    def state_dict(self) -> dict:
        if self.checkpoint_root is None:
            raise RuntimeError("DeepSpeedEngine was built without a checkpoint_dir: it cannot save checkpoints")
        tag = f"step{int(self.ds.global_steps)}"
        self.ds.save_checkpoint(str(self.checkpoint_root), tag=tag, client_state={}, save_latest=False,
                                exclude_frozen_parameters=self._frozen)
        if self.rank == 0:
            for old in self.checkpoint_root.iterdir():
                if old.is_dir() and old.name not in (tag, self._last_tag):
                    shutil.rmtree(old, ignore_errors=True)
        self._last_tag = tag
        return {"deepspeed": {"tag": tag, "stage": self.stage, "world_size": self.world_size}}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("deepspeed")
        if saved is None:
            raise RuntimeError("this checkpoint was written by the plain torch engine; resume it without DeepSpeed "
                               "(or delete the checkpoint directory to start over)")
        if (saved["stage"], saved["world_size"]) != (self.stage, self.world_size):
            raise RuntimeError(f"the checkpoint was written with ZeRO-{saved['stage']} on {saved['world_size']} "
                               f"rank(s); this run has ZeRO-{self.stage} on {self.world_size}: resume with the same "
                               "layout (or delete the checkpoint directory to start over)")
        path, _ = self.ds.load_checkpoint(str(self.checkpoint_root), tag=saved["tag"],
                                          load_module_strict=not self._frozen, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed checkpoint {saved['tag']!r} not found under {self.checkpoint_root}")
        self._last_tag = saved["tag"]

    def gathered(self):
        return gathered(self.module)

    def close(self) -> None:
        """Release DeepSpeed's hooks and buffers (tests build several engines in one process)."""
        _ENGINES.pop(self.module, None)
        destroy = getattr(self.ds, "destroy", None)
        if destroy is not None:
            destroy()


class ProcessGroup:
    """The engines' collectives without an engine (``rank``, ``all_reduce_sum``/``all_reduce_max``,
    ``all_reduce_grads_``, ``mean_over_ranks`` over posttrain.models.distributed): what a family's ``prepare`` uses
    when it is called outside the loop (tests, tools); the loop passes its engine."""

    all_reduce_sum = staticmethod(distributed.all_reduce_sum)
    all_reduce_max = staticmethod(distributed.all_reduce_max)
    all_reduce_grads_ = staticmethod(distributed.all_reduce_grads_)
    mean_over_ranks = staticmethod(distributed.mean_over_ranks)

    @property
    def rank(self) -> int:
        return distributed.rank()

    @property
    def world_size(self) -> int:
        return distributed.world_size()


PROCESS_GROUP = ProcessGroup()


def make_engine(model: torch.nn.Module, trainer_cfg, total_steps: int, deepspeed_cfg=None, *,
                checkpoint_dir: str | Path | None = None):
    """TorchEngine unless ``deepspeed_cfg`` is given and ``enabled``; then DeepSpeedEngine."""
    if not deepspeed_enabled(deepspeed_cfg):
        return TorchEngine(model, trainer_cfg, total_steps)
    return DeepSpeedEngine(model, trainer_cfg, total_steps, deepspeed_cfg, checkpoint_dir=checkpoint_dir)


def _engine_of(model):
    """(DeepSpeed engine, bare module) for a bare model or a DeepSpeed engine module; (None, model) otherwise."""
    if model is None:
        return None, model
    ds = _ENGINES.get(model)
    if ds is not None:
        return ds, model
    inner = getattr(model, "module", None)  # the DeepSpeed engine module itself
    if isinstance(inner, torch.nn.Module) and _ENGINES.get(inner) is model:
        return model, inner
    return None, model


def _zero3_offload(ds):
    optimizer = getattr(ds, "optimizer", None)
    return getattr(optimizer, "parameter_offload", None)


@contextmanager
def gathered(model):
    """Full weights on every rank for the duration (ZeRO-3); yields the bare model. A no-op otherwise.

    Collective: EVERY rank must enter (and leave) it. Inside, ZeRO-3's forward hooks are detached, so each rank's
    forwards are purely local (generation of any length, lm-eval on each rank's share of the documents); changes to
    the weights inside are discarded on exit (the partitions are the truth).
    """
    ds, module = _engine_of(model)
    offload = None if ds is None else _zero3_offload(ds)
    if ds is None or offload is None or ds.zero_optimization_stage() != 3:
        yield module
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        # Detach every ZeRO-3 forward hook, the start-of-forward one included: its trace check is a collective.
        start = offload.fwd_pre_hook
        start_fn = offload.module._forward_pre_hooks.get(start.id)
        start.remove()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        for param in module.parameters():
            param.ds_active_sub_modules.clear()
        try:
            yield module
        finally:
            if start_fn is not None:
                offload.fwd_pre_hook = offload.module.register_forward_pre_hook(start_fn, prepend=True)
            offload._register_deepspeed_module(offload.module)  # also invalidates the recorded trace

"""Gradient checkpointing when memory requires it (``trainer.gradient_checkpointing``: auto | true | false; issue 14,
"Speed, per run"; docs/training.md, "Memory: gradient checkpointing and fused kernels").

Checkpointing recomputes each decoder layer's forward inside the backward pass: the same values (the config hash
leaves the key out), about one more forward of time. ``auto`` turns it on only when the run would not fit the GPU
otherwise, from an estimate of one rank's peak memory:

- **States** (per parameter, by ``trainer.precision`` and engine; ZeRO, Rajbhandari et al. 2020, arXiv 1910.02054):
  trainable weights, gradients and AdamW states (fp32: 4 + 4 + 8 bytes; plain bf16-mixed: float32 master weights,
  so the same 4 + 4 + 8, plus the 2-byte bf16 copies autocast keeps of them through a forward; DeepSpeed's bf16:
  2-byte module + 4-byte float32 gradient partitions + 12 bytes of float32 master weights and moments; bf16-pure:
  2 + 2 + 4). LoRA trains only the adapters (the frozen base holds its weights only). ZeRO stage 1 shards the
  optimizer states over the ranks, stage 2 the gradients too, stage 3 the weights too; an offloaded optimizer
  (or parameters) leaves the GPU; ZeRO's communication buckets and stage 3's gathered layer are added.
- **Reference**: a separate frozen copy of the policy when one is kept (full fine-tuning with a reference that is not
  served from the log-prob cache; a LoRA reference is the same network with adapters off: free).
- **Activations** for ``micro_batch_size`` examples x their sequences (2 per pair, ``num_samples`` per prompt online)
  x ``data.max_length`` tokens, counted the way Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large
  Transformer Models", arXiv 2205.05198, section 4.1) count them, as the tensors each operation saves for its
  backward, but for Qwen2's layer (RMSNorm, RoPE, grouped-query SDPA attention: no s x s score matrix, SwiGLU)
  and for our precisions: per layer and token ``c_h * hidden + c_i * intermediate + 4 * heads`` bytes (the last
  term SDPA's float32 log-sum-exp) plus the padding mask's ``e * seq_len`` (e: compute bytes; twice that where rows
  sharing a prompt run packed, up to twice as wide), with (c_h, c_i) in
  :data:`LAYOUTS` measured with torch's saved-tensor hooks (tests/test_memory_plan.py checks them). Checkpointed,
  a layer keeps only its input (``r * hidden`` per token, r: residual-stream bytes) and one layer at a time is
  recomputed. The LM head on completion positions keeps float32 logits for the backward (4 x vocabulary bytes per
  completion position, models/logps.py) plus one transient chunk.

The estimate is compared with ``torch.cuda.get_device_properties(...).total_memory`` less a margin
(:data:`MARGIN`, :data:`RESERVED_GIB`: CUDA context, NCCL, allocator fragmentation). On CPU ``auto`` is off (no device
memory to protect); ``true`` / ``false`` always win. :class:`Decision` is what result.json's ``train`` block records
as ``gradient_checkpointing``; :func:`apply` / :func:`applied` switch the model (the HF way, non-reentrant, so peft
models need no input-grad hook; ``config.use_cache`` off while training, restored after). Forwards in eval mode or
without gradients (the reference, sampling with the KV cache, lm-eval) are never checkpointed (transformers'
``GradientCheckpointingLayer``), so rollouts still generate with their cache.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping, Optional

from posttrain.models.wrappers import hf_model

GIB = 1024 ** 3
MARGIN = 0.10  # fraction of the device's memory kept free
RESERVED_GIB = 2.0  # and this much on top: CUDA context, NCCL buffers, allocator fragmentation
SETTINGS = ("auto", "true", "false")

#: Activation layouts: per layer and token, bytes per hidden unit and per intermediate unit saved for backward
#: (measured on Qwen2 layers with torch.autograd.graph.saved_tensors_hooks, CPU, transformers 5.24), and the
#: residual-stream / compute element sizes.
LAYOUTS = {
    "fp32": {"c_h": 40, "c_i": 16, "residual": 4, "compute": 4},       # float32 weights, no autocast
    "fp32-lora": {"c_h": 33, "c_i": 16, "residual": 4, "compute": 4},  # frozen float32 base + adapters
    "autocast": {"c_h": 34, "c_i": 8, "residual": 4, "compute": 2},    # float32 weights under bf16 autocast
    "bf16": {"c_h": 24, "c_i": 8, "residual": 2, "compute": 2},        # bf16 weights (DeepSpeed bf16, bf16-pure)
    "bf16-lora": {"c_h": 29, "c_i": 9, "residual": 2, "compute": 2},   # frozen bf16 base + adapters, autocast
}
#: Per parameter: (trainable weight, gradient, optimizer states with any master copy, frozen weight) bytes.
PLAIN_BYTES = {"fp32": (4, 4, 8, 4), "bf16-mixed": (4, 4, 8, 2), "bf16-pure": (2, 2, 4, 2)}
DEEPSPEED_BYTES = {"fp32": (4, 4, 8, 4), "bf16-mixed": (2, 4, 12, 2)}
HEAD_CHUNK = 256  # models/logps.py CHUNK: completion positions through the head at a time
#: DeepSpeed's bucket defaults (elements), as conf/deepspeed/zero*.yaml set them.
ZERO_BUCKETS = {"reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7}


@dataclass(frozen=True)
class Shape:
    """A decoder's shape (Qwen2 layout: q/k/v with bias, SwiGLU MLP, RMSNorms)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool = True

    @classmethod
    def from_config(cls, config) -> "Shape":
        return cls(int(config.hidden_size), int(config.intermediate_size), int(config.num_hidden_layers),
                   int(config.num_attention_heads), int(getattr(config, "num_key_value_heads", None)
                                                        or config.num_attention_heads),
                   int(config.vocab_size), bool(getattr(config, "tie_word_embeddings", False)))

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    @property
    def layer_params(self) -> int:
        h, kv = self.hidden, self.kv_dim
        return (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * self.intermediate + 2 * h

    @property
    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * self.layer_params + self.hidden

    def lora_params(self, r: int) -> int:
        """Adapter parameters of LoRA rank ``r`` on every linear layer of the blocks (peft's all-linear)."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        per_layer = (h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h)
        return self.layers * r * per_layer


@dataclass(frozen=True)
class Setup:
    """What a run holds on one rank besides the shape."""

    precision: str = "fp32"
    lora: bool = False
    zero_stage: Optional[int] = None  # None: the plain engine (no DeepSpeed)
    ranks: int = 1
    offload_optimizer: bool = False
    offload_params: bool = False
    reference_copy: bool = False  # a separate frozen reference network is kept
    sequences: int = 1  # sequences in one micro-batch forward
    max_length: int = 512
    completion_tokens: Optional[int] = None  # completion positions per sequence (None: max_length)
    shared_prompt: bool = False  # rows sharing a prompt run packed (rows up to twice max_length: a wider mask)
    buckets: Optional[Mapping[str, float]] = None  # ZeRO bucket sizes (elements); None: ZERO_BUCKETS

    def layout(self) -> str:
        if self.precision == "fp32":
            return "fp32-lora" if self.lora else "fp32"
        if self.lora:
            return "bf16-lora"
        return "autocast" if self.precision == "bf16-mixed" and self.zero_stage is None else "bf16"


@dataclass(frozen=True)
class Estimate:
    """One rank's peak, GiB, by part; ``total(checkpointed)`` sums them."""

    states: float
    reference: float
    buffers: float
    activations: float
    activations_checkpointed: float
    head: float

    def total(self, checkpointed: bool = False) -> float:
        acts = self.activations_checkpointed if checkpointed else self.activations
        return self.states + self.reference + self.buffers + acts + self.head


def estimate(shape: Shape, setup: Setup, *, params: Optional[int] = None, trainable: Optional[int] = None,
             lora_r: int = 16) -> Estimate:
    """The per-rank memory estimate (module docstring); ``params``/``trainable`` default to the shape's counts (LoRA:
    rank-``lora_r`` adapters on every linear layer)."""
    total = shape.params if params is None else int(params)
    train = (shape.lora_params(lora_r) if setup.lora else total) if trainable is None else int(trainable)
    frozen = total - train if setup.lora else 0
    table = PLAIN_BYTES if setup.zero_stage is None else DEEPSPEED_BYTES
    if setup.precision not in table:
        raise ValueError(f"trainer.precision={setup.precision} has no memory model "
                         f"{'under DeepSpeed' if setup.zero_stage is not None else 'on the plain engine'}")
    w, g, o, wf = table[setup.precision]
    stage, n = (setup.zero_stage or 0), max(1, int(setup.ranks))
    if setup.zero_stage is not None and setup.precision == "bf16-mixed" and stage < 2:
        g = 2  # bf16 gradients in the module; float32 partitions only from stage 2 (stage 3: fp32 accumulation)
    weights = (train * w + frozen * wf) / (n if stage == 3 else 1)
    if setup.offload_params and stage == 3:
        weights = 0.0
    grads = train * (2 if setup.offload_optimizer else g) / (n if stage >= 2 else 1)
    optim = 0.0 if setup.offload_optimizer else train * o / (n if stage >= 1 else 1)
    autocast_cache = 2 * train if setup.zero_stage is None and setup.precision == "bf16-mixed" and not setup.lora \
        else 0
    reference = total * (wf if setup.lora else w) if setup.reference_copy and not setup.lora else 0
    buffers = 0.0
    if setup.zero_stage is not None and stage >= 1:
        sizes = {**ZERO_BUCKETS, **dict(setup.buckets or {})}
        elem = 2 if setup.precision == "bf16-mixed" else 4
        buffers = float(sizes["reduce_bucket_size"]) * elem
        if stage in (1, 2):
            buffers += float(sizes["allgather_bucket_size"]) * elem
        if stage == 3:  # the layer being computed and the embedding/head, gathered whole, plus the prefetch
            buffers += (shape.vocab * shape.hidden + shape.layer_params
                        + float(sizes["stage3_prefetch_bucket_size"])) * elem
    lay = LAYOUTS[setup.layout()]
    seq, tokens = int(setup.max_length), int(setup.sequences) * int(setup.max_length)
    mask_width = 2 * seq if setup.shared_prompt else seq  # a packed row spans at most twice a row (shared_prompt.py)
    per_layer = (lay["c_h"] * shape.hidden + lay["c_i"] * shape.intermediate + 4 * shape.heads
                 + lay["compute"] * mask_width) * tokens
    outside = (lay["residual"] + 4) * shape.hidden * tokens  # embedding output, final norm (computed in float32)
    acts = shape.layers * per_layer + outside
    acts_ckpt = shape.layers * lay["residual"] * shape.hidden * tokens + per_layer + outside
    completions = int(setup.sequences) * min(seq, int(setup.completion_tokens or seq))
    head = completions * (4 * shape.vocab + lay["compute"] * shape.hidden) \
        + min(completions, HEAD_CHUNK) * shape.vocab * (lay["compute"] + 8)
    return Estimate(states=(weights + grads + optim + autocast_cache) / GIB, reference=reference / GIB,
                    buffers=buffers / GIB, activations=acts / GIB, activations_checkpointed=acts_ckpt / GIB,
                    head=head / GIB)


def budget_gib(total_memory_bytes: int) -> float:
    """What a run may plan to use of a device with ``total_memory_bytes``."""
    return total_memory_bytes / GIB * (1 - MARGIN) - RESERVED_GIB


def setting_of(value: Any) -> str:
    """``trainer.gradient_checkpointing`` (or ``trainer.liger``) as one of auto | true | false; one line otherwise."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value.lower() in SETTINGS:
        return value.lower()
    raise ValueError(f"{value!r}: must be auto, true or false")


@dataclass(frozen=True)
class Decision:
    """What ran, for result.json's ``train.gradient_checkpointing``."""

    setting: str  # auto | true | false, as configured
    enabled: bool
    estimate_gib: Optional[float]  # one rank's peak without checkpointing
    checkpointed_gib: Optional[float]  # and with it
    budget_gib: Optional[float]  # None on CPU
    reason: str

    def record(self) -> dict:
        return asdict(self)


def decide(setting: Any, est: Optional[Estimate], total_memory_bytes: Optional[int]) -> Decision:
    """Turn the setting and the estimate into a decision; ``total_memory_bytes`` None means no GPU (CPU)."""
    setting = setting_of(setting)
    plain = None if est is None else round(est.total(False), 2)
    ckpt = None if est is None else round(est.total(True), 2)
    budget = None if total_memory_bytes is None else round(budget_gib(total_memory_bytes), 2)
    if setting != "auto":
        return Decision(setting, setting == "true", plain, ckpt, budget,
                        f"trainer.gradient_checkpointing={setting}")
    if budget is None:
        return Decision(setting, False, plain, ckpt, None, "auto: no GPU, no device memory to protect")
    if plain is None:
        return Decision(setting, False, None, None, budget, "auto: no estimate for this model (no Qwen2-style "
                        "config): off; set trainer.gradient_checkpointing=true if it runs out of memory")
    if plain <= budget:
        return Decision(setting, False, plain, ckpt, budget,
                        f"auto: {plain:.1f} GiB per GPU without checkpointing fits the {budget:.1f} GiB budget")
    over = "" if ckpt <= budget else (" and still exceeds it with checkpointing: use a smaller micro-batch, "
                                      "more ZeRO sharding or offload")
    return Decision(setting, True, plain, ckpt, budget, f"auto: {plain:.1f} GiB per GPU without checkpointing "
                    f"exceeds the {budget:.1f} GiB budget ({ckpt:.1f} GiB with it){over}")


# ------------------------------------------------------------------------------------------------------------------
# The run's call site


def sequences_per_example(algo, hparams: Mapping) -> int:
    """Sequences one example puts through a training forward: 2 for pairs (chosen and rejected in one forward),
    ``num_samples`` per prompt for online policy-gradient methods, 1 otherwise."""
    if algo.data == "pairs" or algo.family == "online_pairwise":
        return 2
    if algo.data == "prompts":
        from posttrain.algorithms.online import split_hparams

        return int(split_hparams(algo, dict(hparams))[1]["num_samples"])
    return 1


def plan_run(model, cfg, algo, hparams: Mapping, *, reference_copy: bool, device=None) -> Decision:
    """The decision for one run from its composed config, the loaded (not yet engine-wrapped) model and the device.
    ``reference_copy``: a separate reference network is kept (``Reference.movable``). On several GPU ranks it is a
    collective (the smallest GPU decides for all): call it on every rank."""
    import torch

    from posttrain.cell import deepspeed_on
    from posttrain.models import shared_prompt
    from posttrain.models.distributed import world_size

    setting = setting_of(cfg.trainer.get("gradient_checkpointing", "auto"))
    leaf = hf_model(model)
    try:
        shape = Shape.from_config(leaf.config)
    except (AttributeError, TypeError):
        shape = None
    ds = cfg.get("deepspeed") if deepspeed_on(cfg.get("deepspeed")) else None
    zero = dict(ds.get("zero") or {}) if ds is not None else {}
    offloads = {what: (zero.get(f"offload_{what}") or {}).get("device", "none") not in (None, "none")
                for what in ("optimizer", "param")}
    setup = Setup(precision=str(cfg.trainer.precision), lora=bool(cfg.lora.enabled),
                  zero_stage=None if ds is None else int(ds.get("stage", 0)), ranks=world_size(),
                  offload_optimizer=offloads["optimizer"], offload_params=offloads["param"],
                  reference_copy=bool(reference_copy),
                  sequences=int(cfg.trainer.micro_batch_size) * sequences_per_example(algo, hparams),
                  max_length=int(cfg.data.max_length), completion_tokens=cfg.data.get("max_new_tokens"),
                  shared_prompt=shared_prompt.applies(cfg.trainer.get("shared_prompt", "auto"), model, algo,
                                                      hparams),
                  buckets={k: v for k, v in zero.items() if k in ZERO_BUCKETS})
    params = sum(p.numel() for p in leaf.parameters())
    trainable = sum(p.numel() for p in leaf.parameters() if p.requires_grad)
    est = None if shape is None else estimate(shape, setup, params=params, trainable=trainable)
    device = torch.device(device) if device is not None else next(leaf.parameters()).device
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    if total is not None and setup.ranks > 1:  # every rank must decide alike (ZeRO-3 gathers again in a recompute):
        smallest = torch.tensor([float(total)], device=device)  # the smallest GPU of the job decides (collective)
        torch.distributed.all_reduce(smallest, op=torch.distributed.ReduceOp.MIN)
        total = int(smallest.item())
    return decide(setting, est, total)


def apply(model, decision: Decision) -> Callable[[], None]:
    """Switch checkpointing on when ``decision.enabled`` (non-reentrant, every decoder layer) and the KV cache off for
    training forwards; returns the function that restores both (call it before generation-heavy work or saving)."""
    if not decision.enabled:
        return lambda: None
    leaf = hf_model(model)
    if not getattr(leaf, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(leaf).__name__} does not support gradient checkpointing: set "
                         "trainer.gradient_checkpointing=false")
    kwargs = {"use_reentrant": False}
    had_input_hook = bool(getattr(leaf, "_require_grads_hooks", None))  # peft's own, kept on restore
    if hasattr(leaf, "activation_checkpointing_enable"):  # transformers >= 5.x (the old name warns)
        leaf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        leaf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    config = getattr(leaf, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if config is not None:
        config.use_cache = False

    def restore() -> None:
        if hasattr(leaf, "activation_checkpointing_disable"):
            leaf.activation_checkpointing_disable()
        else:
            leaf.gradient_checkpointing_disable()
        if not had_input_hook and hasattr(leaf, "disable_input_require_grads"):
            leaf.disable_input_require_grads()  # transformers' enable adds it for every input_ids model
        if config is not None:
            config.use_cache = use_cache

    return restore


@contextmanager
def applied(model, decision: Decision):
    """``with applied(policy, decision): state = train(...)``: checkpointing (when decided) for the block only."""
    restore = apply(model, decision)
    try:
        yield decision
    finally:
        restore()

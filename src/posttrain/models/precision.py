"""Numeric precision of a run: one choice, ``trainer.precision``, that decides how weights are held, how forwards
compute and what the optimizer updates (recorded in result.json under ``train.precision``).

- ``fp32``: weights, compute and AdamW states in float32 (the tiny embedded scales).
- ``bf16-mixed`` (the real scales' default): bf16 compute with float32 master weights and float32 AdamW states.
  On the plain engine the weights live in float32 and forwards (training, reference, sampling, evaluation) run under
  ``torch.autocast(bfloat16)``; a bf16 checkpoint on disk (every Qwen2.5 release) upcasts exactly. Under DeepSpeed it
  is DeepSpeed's own bf16 mode (bf16 module, float32 master copy and optimizer states inside its optimizer), on a GPU
  and on CPU ranks alike, so the CPU rehearsal runs the GPU's path. On the plain engine with LoRA the frozen base
  stays in bf16 (loaded as stored; it is never updated) and peft keeps the adapters in float32 (its
  ``autocast_adapter_dtype``): only trainable weights need a master copy.
- ``bf16-pure``: bf16 weights updated by AdamW in place, no master copy. Only when asked for: at the study's learning
  rate 1e-6 most updates are below bf16's resolution and round away (measured on a Qwen2.5-0.5B-shaped q_proj:
  10 AdamW steps changed 1.96% of the entries in bf16 against 100% in float32), so a run "trains" without moving.

Why this matters (README, "Real scales"): with ``bf16-pure`` the study's 0.5B/1.5B cells would find "no difference"
between algorithms by construction. TRL's default (``bf16=True`` in its configs) is the mixed mode through
accelerate's autocast over float32 weights; we follow it.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch

PRECISIONS = ("fp32", "bf16-mixed", "bf16-pure")

PURE_BF16_COST = ("trainer.precision=bf16-pure: AdamW updates the bf16 weights in place with no float32 master copy; "
                  "at lr 1e-6 most updates round to zero (about 2% of a layer's entries move in 10 steps, against 100% "
                  "in float32). Use bf16-mixed unless you measure exactly this.")


class PrecisionError(ValueError):
    """A precision the configuration or the device cannot do; the message says what to use instead."""


@dataclass(frozen=True)
class Precision:
    name: str
    deepspeed_bf16: bool = False  # DeepSpeed's bf16 mode does the mixing

    @classmethod
    def from_config(cls, name: str, *, deepspeed: bool = False, cuda: bool | None = None) -> "Precision":
        """Check ``trainer.precision`` against the engine and the device; one clear line when it cannot run."""
        name = str(name)
        if name not in PRECISIONS:
            raise PrecisionError(f"trainer.precision={name!r} is not one of {', '.join(PRECISIONS)}")
        cuda = torch.cuda.is_available() if cuda is None else cuda
        if name != "fp32" and cuda and torch.cuda.is_available() \
                and not torch.cuda.is_bf16_supported(including_emulation=False):  # V100/T4 only emulate it
            raise PrecisionError(f"trainer.precision={name}: this GPU ({torch.cuda.get_device_name(0)}) has no bf16; "
                                 "use trainer.precision=fp32")
        if name == "bf16-pure" and deepspeed:
            raise PrecisionError("trainer.precision=bf16-pure runs on the plain engine only (DeepSpeed's bf16 always "
                                 "keeps float32 master weights): use bf16-mixed, or deepspeed=none")
        return cls(name, deepspeed_bf16=name == "bf16-mixed" and deepspeed)

    @property
    def bf16(self) -> bool:
        return self.name != "fp32"

    def load_dtype(self, *, lora: bool = False) -> torch.dtype:
        """The dtype to load the checkpoint in: float32 master weights unless they are bf16 on purpose (pure bf16,
        DeepSpeed's bf16 module, or a frozen LoRA base whose trainable adapters peft keeps in float32)."""
        if self.name == "fp32":
            return torch.float32
        if self.name == "bf16-pure" or self.deepspeed_bf16 or lora:
            return torch.bfloat16
        return torch.float32

    def autocast(self, device: torch.device | str):
        """The forward context: bf16 autocast for the mixed mode (over DeepSpeed's bf16 module too, where it keeps
        autocast's float32 ops, softmax and norms, as on the plain engine), nothing otherwise (pure bf16 weights
        compute in bf16 by themselves)."""
        if self.name != "bf16-mixed":
            return nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """For lm-eval's HFLM ``mixed_precision_dtype`` (it disables any outer autocast around its forwards)."""
        return torch.bfloat16 if self.name == "bf16-mixed" else None

    def record(self, model: torch.nn.Module) -> dict:
        """What ran, for result.json: the choice and the dtypes actually held by the trainable weights."""
        trainable = {str(p.dtype).replace("torch.", "") for p in model.parameters() if p.requires_grad}
        frozen = {str(p.dtype).replace("torch.", "") for p in model.parameters() if not p.requires_grad}
        master = "float32" if (self.name != "bf16-pure") else "bfloat16"
        return {"name": self.name, "compute": "bfloat16" if self.bf16 else "float32",
                "trainable_weights": sorted(trainable), "frozen_weights": sorted(frozen),
                "master_weights": master, "optimizer_states": master,
                "engine_mixing": "deepspeed_bf16" if self.deepspeed_bf16 else
                ("torch_autocast" if self.name == "bf16-mixed" else "none")}

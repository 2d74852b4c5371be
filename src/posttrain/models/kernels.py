"""Fused kernels from liger-kernel when it is installed (``trainer.liger``: auto | true | false; issue 14, "Speed,
per run"; docs/training.md, "Memory: gradient checkpointing and fused kernels").

liger-kernel's Triton kernels replace Qwen2's RMSNorm, rotary embedding and SwiGLU MLP on the loaded model instance
through its documented instance-level entry point, ``apply_liger_kernel_to_qwen2(..., model=model)`` (liger-kernel
0.8.5, ``liger_kernel/transformers/monkey_patch.py``). Its fused linear cross-entropy stays OFF (and plain
cross-entropy too): our log-probs never go through the HF loss, they come from the hidden states through
models/logps.py, and liger's fused forward would replace the CausalLM forward those log-probs rely on.

Side effects to know (from liger's source): RoPE is patched in ``transformers.models.qwen2.modeling_qwen2`` for the
whole process (a module-level function), and models built later in the process get the liger RMSNorm / MLP classes;
the instance patch covers the modules already built. Apply it before the reference copy is made
(``Reference(...)`` deep-copies the policy, patched forwards included), so policy and reference compute with the
same kernels and the log-ratios start at zero.

``auto`` = on when the model is on CUDA and liger-kernel imports (it needs Triton, i.e. a GPU machine), else off.
``true`` without CUDA or without the package is a mistake caught by :func:`refusal` before anything loads.
"""

from __future__ import annotations

from typing import Any, Optional

from posttrain.models.memory_plan import setting_of
from posttrain.models.wrappers import hf_model

#: HF ``config.model_type`` -> liger-kernel's instance-level function for it.
APPLIERS = {"qwen2": "apply_liger_kernel_to_qwen2"}
#: What we ask of it: the three fused kernels, none of its losses.
KERNELS = {"rope": True, "rms_norm": True, "swiglu": True, "cross_entropy": False, "fused_linear_cross_entropy": False}


def liger_import_error() -> Optional[str]:
    """None when ``liger_kernel.transformers`` imports, else why not (one line)."""
    try:
        import liger_kernel.transformers  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or its own version check (RuntimeError / AssertionError)
        text = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {text[0] if text else ''}"
    return None


def refusal(setting: Any, *, cuda: Optional[bool] = None) -> Optional[str]:
    """The one line that stops a run asking for ``trainer.liger=true`` where it cannot run, else None. Call it
    before anything loads."""
    if setting_of(setting) != "true":
        return None
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda:
        return ("trainer.liger=true needs a CUDA GPU (liger-kernel's Triton kernels do not run on CPU): "
                "use trainer.liger=auto or false here")
    error = liger_import_error()
    if error is not None:
        return (f"trainer.liger=true but liger-kernel does not import ({error}): `pip install liger-kernel` on the GPU "
                "machine, or use trainer.liger=auto or false")
    return None


def apply_liger(model, setting: Any) -> dict:
    """Apply liger's kernels to ``model`` (a PreTrainedModel or a peft model around one) as ``setting`` says; returns
    the record for result.json's ``train.liger``: ``{setting, applied, kernels, reason}``. ``true`` where it cannot
    run raises ValueError (one line: :func:`refusal` should have caught it before loading)."""
    setting = setting_of(setting)
    leaf = hf_model(model)
    record = {"setting": setting, "applied": False, "kernels": [], "reason": ""}
    if setting == "false":
        return {**record, "reason": "trainer.liger=false"}
    try:
        device = next(leaf.parameters()).device
    except StopIteration:
        device = None
    cuda = device is not None and device.type == "cuda"
    problem = refusal("true", cuda=cuda)
    model_type = getattr(getattr(leaf, "config", None), "model_type", None)
    if problem is None and model_type not in APPLIERS:
        problem = (f"trainer.liger=true: no liger kernels wired for model type {model_type!r} (known: "
                   f"{', '.join(APPLIERS)}): use trainer.liger=auto or false")
    if problem is not None:
        if setting == "true":
            raise ValueError(problem)
        why = ("the model is not on CUDA" if not cuda else
               "liger-kernel is not installed" if liger_import_error() else f"model type {model_type!r} not wired")
        return {**record, "reason": f"auto: off ({why})"}
    import liger_kernel.transformers as liger

    getattr(liger, APPLIERS[model_type])(model=leaf, **KERNELS)
    applied = [name for name, on in KERNELS.items() if on]
    return {**record, "applied": True, "kernels": applied,
            "reason": f"{setting}: liger-kernel {_version()} on {model_type}"}


def _version() -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("liger-kernel")
    except PackageNotFoundError:
        return None

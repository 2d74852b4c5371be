"""The model under its wrappers: the one place that unwraps a DeepSpeed engine / DDP module and a peft model."""

from __future__ import annotations


def unwrapped(model):
    """The module a wrapper's forward calls (DeepSpeed engine / DDP ``.module``, repeatedly), else ``model``."""
    import torch  # here: modules that only name this one stay light to import

    while isinstance(getattr(model, "module", None), torch.nn.Module) and model.module is not model:
        model = model.module
    return model


def hf_model(model):
    """The transformers model under DeepSpeed / DDP and peft wrappers (a PeftModel's base model)."""
    model = unwrapped(model)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model

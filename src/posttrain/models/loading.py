"""Policy, tokenizer and reference: one loading path for embedded tiny bases, local directories and hub ids.

The embedded scales build (or reuse) their cached base and then load it through exactly the path a real
``Qwen/Qwen2.5-*-Instruct`` id or a local copy takes: ``AutoTokenizer`` on ``scale.tokenizer`` (default
``scale.model``), a round-trip probe, ``AutoModelForCausalLM``. ``trust_remote_code`` is off unless the user turns
it on. LoRA through peft wraps every linear layer when ``lora.enabled``.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

PROBE = "Question: Ann has 3 boxes with 4 pens in each. How many?\nAnswer: 3*4=12\n#### 12"


class ModelLoadError(RuntimeError):
    """A model or tokenizer that cannot be loaded; the message says what to do instead."""


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    model_id: str  # the configured model (hub id or directory; the embedded base's directory), for cache keys
    tokenizer_id: str


def resolve_model_paths(scale, mirror: str | None = None) -> tuple[str, str]:
    """``(model, tokenizer)`` locations for a scale config (building the embedded base when needed): a hub id is
    read from the mirror when the mirror holds it (posttrain.mirror); offline and absent, one line says what to do."""
    from posttrain.mirror import hub_offline, is_local_path, model_location, model_missing

    model = scale.get("model")
    tokenizer = scale.get("tokenizer")
    if model is None:
        if not scale.get("embedded"):
            raise ModelLoadError(f"scale {scale.name!r} names no model: set scale.model to an HF id or a local dir")
        from posttrain.embedded import ensure_tiny_base

        model_dir, tok_dir = ensure_tiny_base(dict(scale.build))
        model, tokenizer = str(model_dir), tokenizer or str(tok_dir)
    located = []
    for location in (str(model), str(tokenizer or model)):
        found = model_location(location, mirror)
        if found == location and not is_local_path(location) and hub_offline() and not _in_hf_cache(location):
            raise ModelLoadError(model_missing(location, mirror))
        located.append(found)
    return located[0], located[1]


def _in_hf_cache(model_id: str) -> bool:
    """The id is in the local HF hub cache (what an offline hub can still load)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model_id, "config.json"), str) or \
            isinstance(try_to_load_from_cache(model_id, "tokenizer_config.json"), str)
    except Exception:  # noqa: BLE001 - an unusual id or cache layout: let from_pretrained decide
        return True


def load_tokenizer(location: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(location, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - re-raised with the fix
        raise ModelLoadError(
            f"cannot load the tokenizer from {location!r} ({type(exc).__name__}: {_first_line(exc)}). "
            "Without the model hub, use a tiny scale (scale=tiny-s) or point scale.model / scale.tokenizer at a "
            "local directory.") from exc
    ids = tok(PROBE, add_special_tokens=False)["input_ids"]
    back = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    if back != PROBE:
        raise ModelLoadError(
            f"the tokenizer at {location!r} ({type(tok).__name__}) does not round-trip text: {PROBE!r} came back "
            f"as {back!r}. Point scale.tokenizer at the directory that holds the model's own tokenizer files "
            "(a character tokenizer saved beside a Qwen2 model reloads as Qwen2Tokenizer).")
    if tok.eos_token_id is None:
        raise ModelLoadError(
            f"the tokenizer at {location!r} has no EOS token: completions could not end. Use the model's own tokenizer "
            "(scale.tokenizer), or set eos_token in its tokenizer_config.json (Qwen2.5-Instruct: <|im_end|>)")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def load_policy(scale, lora, *, trust_remote_code: bool = False, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, mirror: str | None = None) -> Loaded:
    """Tokenizer and model of a scale; ``dtype`` is what the weights are held in (``Precision.load_dtype``: float32
    master weights for bf16-mixed, whatever the checkpoint's own dtype on disk)."""
    from transformers import AutoModelForCausalLM

    model_loc, tok_loc = resolve_model_paths(scale, mirror)
    tokenizer = load_tokenizer(tok_loc, trust_remote_code=trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_loc, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(
            f"cannot load the model {model_loc!r} ({type(exc).__name__}: {_first_line(exc)}). Without the model "
            "hub, use a tiny scale (scale=tiny-s) or set scale.model to a local directory in HF format.") from exc
    model.to(device)
    disable_dropout(model)
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if lora.enabled:
        model = add_lora(model, lora)
    # the id recorded and used in cache keys is the configured one (a hub id stays a hub id wherever a mirror keeps
    # it), so moving a mirror or resolving through the HF cache never makes other self-play data or base scores
    model_id = str(scale.get("model") or model_loc)
    tokenizer_id = str(scale.get("tokenizer") or scale.get("model") or tok_loc)
    return Loaded(model, tokenizer, model_id, tokenizer_id)


def add_lora(model, lora):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off everywhere (docs/algorithms.md 6.3): policy and reference must see the same network."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


class Reference:
    """The reference: a copy of the initial policy (frozen, unless SPIN / TR-DPO move it: algorithms/reference_sync),
    or with LoRA the same network with adapters disabled.

    ``with reference.active() as ref_model:`` gives the module to run a no-grad forward on. A reference-free
    algorithm gets ``Reference(None)`` and never runs a reference forward (``calls`` counts them).
    """

    def __init__(self, policy: torch.nn.Module | None, *, lora: bool = False):
        self.calls = 0
        self._lora = lora
        self._policy = policy if lora else None
        self._copy = None
        if policy is not None and not lora:
            self._copy = copy.deepcopy(policy).eval()
            self._copy.requires_grad_(False)

    @property
    def enabled(self) -> bool:
        return self._copy is not None or self._policy is not None

    @property
    def has_model(self) -> bool:
        """A network to run (a :class:`~posttrain.algorithms.reference_cache.CachedReference` has none)."""
        return self.enabled

    @property
    def movable(self) -> bool:
        """A separate copy whose weights may be updated (SPIN / TR-DPO reference sync); not a LoRA reference."""
        return self._copy is not None

    @property
    def module(self) -> torch.nn.Module:
        """The reference copy itself (for syncing and checkpointing it; forwards go through ``active()``)."""
        if self._copy is None:
            raise RuntimeError("only a separate reference copy (lora=off) can be moved")
        return self._copy

    @contextmanager
    def active(self):
        if not self.enabled:
            raise RuntimeError("this algorithm is reference-free: no reference forward may run")
        self.calls += 1
        if self._copy is not None:
            with torch.no_grad():
                yield self._copy
            return
        was_training = self._policy.training
        self._policy.eval()  # dropout is off anyway; eval keeps any other train-time behaviour out
        try:
            with torch.no_grad(), self._policy.disable_adapter():
                yield self._policy
        finally:
            self._policy.train(was_training)


def save_model(model, tokenizer, out_dir: str | Path) -> None:
    """Save the trained policy (a LoRA run saves its adapter) and its tokenizer."""
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""



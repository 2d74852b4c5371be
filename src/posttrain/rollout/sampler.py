"""Sampling completions from a policy: the one sampler behind self-play pairs, online-RL rollouts and quick checks.

HF ``generate`` batched with left padding and a KV cache. Sampling is seeded per call (``torch.manual_seed(seed)``)
so the same model, prompts and seed give the same samples, which is what makes cached self-play data reproducible.
Under ZeRO-3 the caller gathers the weights first (``posttrain.models.engine.gathered``) and passes the bare module;
a ``peft.PeftModel`` works as well.

Sampling as configured, nothing else:

- **Stops.** A completion ends at the first token of ANY end-of-sequence id: the union of the tokenizer's
  ``eos_token_id`` and every id of the model's ``generation_config.eos_token_id`` (Qwen2.5-Instruct names both
  ``<|im_end|>`` and ``<|endoftext|>``; passing the tokenizer's alone, as TRL's and our earlier sampler did, lets a
  completion run on past ``<|endoftext|>``, and since that is also Qwen's pad token the continuation ended up in the
  text). The stop token is kept in ``completion_ids``, nothing after it. ``SamplingConfig.stop_strings`` end a
  completion where its decoded text first contains one of them, as lm-eval's ``until`` does: the text is cut before
  the string and the ids to the longest prefix that decodes inside the cut text (so ``completion == decode(ids)``).
  A completion that reached neither is ``truncated``.
- **Parameters.** ``generate`` gets an explicit :class:`transformers.GenerationConfig` (:func:`generation_config`)
  and, for the duration of the call, the model's own ``generation_config`` is replaced by an empty one:
  transformers fills every field a passed config leaves unset from the model's (Qwen's ships
  ``repetition_penalty`` 1.05, ``top_k`` 20, ``top_p`` 0.8, ``temperature`` 0.7), so without that a model's
  defaults would apply without being asked for. :func:`sampling_record` is what ran, as a plain dict for result.json.
- **Backend.** ``SamplingConfig.backend=vllm`` (``data.generation_backend``) samples the same settings with vLLM
  (posttrain.rollout.vllm_backend; docs/real-scales.md, "vLLM (optional)"); hf is the default and the tested path.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from posttrain.models.wrappers import hf_model


@dataclass(frozen=True)
class SamplingConfig:
    num_samples: int = 1
    temperature: float = 1.0  # 0 -> greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 128
    stop_strings: tuple[str, ...] = field(default=())  # lm-eval's ``until``: the text is cut before the first
    batch_size: int = 256  # sequences per generate() call
    backend: str = "hf"  # hf (generate) | vllm (posttrain.rollout.vllm_backend; data.generation_backend)


@dataclass
class Rollout:
    """Samples for one prompt: texts plus the token ids the policy produced (for log-prob recomputation)."""

    prompt: str
    completions: list[str]
    completion_ids: list[list[int]]
    truncated: list[bool]


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def stop_ids(model, tokenizer) -> list[int]:
    """Every end-of-sequence id: the tokenizer's, then the model generation config's (int or list), de-duplicated."""
    gen = getattr(model, "generation_config", None)
    out: list[int] = []
    for token in _ids(tokenizer.eos_token_id) + _ids(getattr(gen, "eos_token_id", None)):
        if token not in out:
            out.append(token)
    if not out:
        raise ValueError("the tokenizer has no eos_token and the model's generation_config names no eos_token_id; "
                         "set tokenizer.eos_token so completions can end")
    return out


def generation_config(cfg: SamplingConfig, stops: list[int], pad_id: int | None):
    """The explicit ``transformers.GenerationConfig`` of one sampling call: nothing but what ``cfg`` says.

    Neutral values are written out for every knob a model's own generation config may turn (repetition and length
    penalties, n-gram blocking, typical/epsilon/eta sampling, beams); greedy decoding (``temperature <= 0``) leaves
    the sampling-only knobs unset, they do not apply to it.
    """
    from transformers import GenerationConfig

    greedy = cfg.temperature <= 0
    sampling = {} if greedy else {"temperature": float(cfg.temperature), "top_p": float(cfg.top_p),
                                  "top_k": int(cfg.top_k), "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}
    return GenerationConfig(
        do_sample=not greedy, **sampling, max_new_tokens=int(cfg.max_new_tokens), min_length=0,
        num_beams=1, num_return_sequences=1, repetition_penalty=1.0, encoder_repetition_penalty=1.0,
        length_penalty=1.0, no_repeat_ngram_size=0, renormalize_logits=False, eos_token_id=list(stops),
        pad_token_id=stops[0] if pad_id is None else int(pad_id), use_cache=True,
        stop_strings=list(cfg.stop_strings) or None)


#: The GenerationConfig fields result.json records (what decides the samples).
RECORDED = ("do_sample", "temperature", "top_p", "top_k", "max_new_tokens", "repetition_penalty", "num_beams",
            "eos_token_id", "pad_token_id", "stop_strings")


def sampling_record(cfg: SamplingConfig, stops: list[int], pad_id: int | None = None) -> dict:
    """What a sampling call runs with, as a plain dict: the generation config's fields plus ``num_samples``."""
    gen = generation_config(cfg, stops, pad_id)
    return {"num_samples": int(cfg.num_samples), **{k: getattr(gen, k) for k in RECORDED}}


def model_generation_defaults(model) -> dict:
    """The model's own generation config as HF ``generate`` fills unset arguments from it (its non-default fields):
    what :func:`sample` hides, and what lm-eval's HF backend lets act (Qwen2.5's repetition_penalty 1.05)."""
    config = getattr(hf_model(model), "generation_config", None)
    if config is None:
        return {}
    return {k: v for k, v in config.to_diff_dict().items() if k != "transformers_version"}


@contextmanager
def _no_model_defaults(model):
    """Hide the model's own generation config for the duration (an empty one fills nothing in)."""
    from transformers import GenerationConfig

    leaf = hf_model(model)
    saved = getattr(leaf, "generation_config", None)
    leaf.generation_config = GenerationConfig()
    try:
        yield
    finally:
        leaf.generation_config = saved


def _cut_at_stop_string(tokenizer, ids: list[int], text: str, stop_strings) -> tuple[list[int], str, bool]:
    """Cut ``text`` before its first stop string and ``ids`` to the longest prefix that decodes inside the cut."""
    found = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
    if not found:
        return ids, text, False
    cut = min(found)
    end = len(ids)
    while end > 0 and len(tokenizer.decode(ids[:end], skip_special_tokens=True)) > cut:
        end -= 1
    ids = ids[:end]
    return ids, tokenizer.decode(ids, skip_special_tokens=True), True


def finish(tokenizer, row: list[int], stops: list[int], pad_id: int | None,
           stop_strings=()) -> tuple[list[int], str, bool]:
    """One generated row -> (completion ids, text, truncated): cut at the first stop id (kept), then at the first
    stop string; a row that reached neither keeps its sampled tokens (trailing padding dropped) and is truncated."""
    stop_set = set(stops)
    end = next((i for i, t in enumerate(row) if t in stop_set), None)
    if end is not None:
        ids = row[: end + 1]
    else:
        ids = list(row)
        while ids and pad_id is not None and ids[-1] == pad_id:  # padding after a stop-string finish
            ids.pop()
    text = tokenizer.decode(ids, skip_special_tokens=True)
    ids, text, stopped = _cut_at_stop_string(tokenizer, ids, text, stop_strings)
    return ids, text, end is None and not stopped


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], cfg: SamplingConfig, *, seed: int = 0,
           progress: bool = False, desc: str = "sampling") -> list[Rollout]:
    """Generate ``cfg.num_samples`` completions per prompt (in prompt order, samples grouped per prompt);
    ``cfg.backend=vllm`` samples the same settings with vLLM (posttrain.rollout.vllm_backend)."""
    if cfg.backend == "vllm":
        from posttrain.rollout.vllm_backend import sample_vllm

        return sample_vllm(model, tokenizer, prompts, cfg, seed=seed, progress=progress, desc=desc)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    flat = [p for p in prompts for _ in range(cfg.num_samples)]
    texts: list[str] = []
    ids_out: list[list[int]] = []
    truncated: list[bool] = []
    stops = stop_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id
    gen = generation_config(cfg, stops, pad_id)
    torch.manual_seed(seed)
    bar = tqdm(total=len(flat), desc=desc, disable=not progress, unit="seq", leave=False)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        with _no_model_defaults(model):
            for start in range(0, len(flat), cfg.batch_size):
                chunk = flat[start:start + cfg.batch_size]
                enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                out = model.generate(**enc, generation_config=gen,
                                     **({"tokenizer": tokenizer} if cfg.stop_strings else {}))
                for row in out[:, enc["input_ids"].shape[1]:].tolist():
                    ids, text, cut = finish(tokenizer, row, stops, pad_id, cfg.stop_strings)
                    ids_out.append(ids)
                    texts.append(text)
                    truncated.append(cut)
                bar.update(len(chunk))
    finally:
        tokenizer.padding_side = old_side
        bar.close()
        model.train(was_training)
    k = cfg.num_samples
    return [Rollout(p, texts[i * k:(i + 1) * k], ids_out[i * k:(i + 1) * k], truncated[i * k:(i + 1) * k])
            for i, p in enumerate(prompts)]

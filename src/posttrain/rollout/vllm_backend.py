"""vLLM as an optional generation backend (docs/real-scales.md, "vLLM (optional)"; docs/design.md, "Layers").

``data.generation_backend=vllm`` samples self-play data and online rollouts with vLLM instead of HF ``generate``;
``eval.backend=vllm`` scores with lm-eval's own ``vllm`` model type. HF stays the default and the tested path on
CPU; vLLM needs a CUDA GPU and ``pip install vllm``. Importing posttrain never imports vllm: every import of it is
inside a function here.

The same sampling, whichever backend:

- :func:`sampling_params` is the ONE translation of a :class:`posttrain.rollout.SamplingConfig` into
  ``vllm.SamplingParams`` (self-play and online rollouts both come through it): temperature, top_p, top_k,
  ``max_new_tokens`` -> ``max_tokens``, ``num_samples`` -> ``n``, the seed, ``stop_strings`` -> ``stop`` (cut before
  the string, as the HF path and lm-eval's ``until``), ``stop_token_ids`` = every EOS id of the tokenizer and the
  model's generation config (:func:`posttrain.rollout.sampler.stop_ids`; Qwen2.5 has two), and neutral values for
  every knob a model's own generation config may turn (repetition/presence/frequency penalties, min_p): an explicit
  SamplingParams means vLLM applies none of the model's defaults, as the HF path hides them.
- Seeds: prompt ``i`` gets seed ``seed + i * n`` and vLLM gives its ``j``-th sample ``seed + i * n + j``, so every
  sample has its own seed and the same call gives the same samples whatever vLLM batches together. The two backends
  draw different random numbers: the same seed gives the same samples within a backend, not across them (the
  self-play cache key names the backend when it is vllm).
- Completions are finished by the HF path's own :func:`posttrain.rollout.sampler.finish` (stop id kept, stop string
  cut, ``completion == decode(ids)``), so a :class:`~posttrain.rollout.Rollout` means the same from either backend.

The engine (:func:`engine_for`) is built once per (model directory, dtype, LoRA rank) from the directory the model
was loaded from, in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, as TRL's colocate mode), with the dtype the
run computes in (the autocast dtype under ``bf16-mixed``, else the weights'), and kept asleep (weights offloaded,
KV cache freed) between calls so training has the GPU. Every call samples from the model it is given: a full
model's current weights are loaded into the engine first (``LLM.apply_model`` -> ``model.load_weights``); a
``peft`` model's adapter is saved and applied by vLLM's LoRA support, unmerged (merging a small update into bf16
weights rounds most of it away, docs/real-scales.md). Only one-process runs build an engine (:data:`SEVERAL_RANKS`:
the per-scale preparation job is one process, so a 7b study's self-play can still use vLLM).
``POSTTRAIN_VLLM_GPU_MEMORY``
(default 0.3) is the share of the GPU's memory an engine may take.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import tempfile

from posttrain.models.wrappers import hf_model

BACKENDS = ("hf", "vllm")
GPU_MEMORY_ENV = "POSTTRAIN_VLLM_GPU_MEMORY"
DEFAULT_GPU_MEMORY = 0.3
INSTALL = "pip install vllm (a CUDA machine)"
_ENGINES: dict = {}


def unavailable(key: str) -> str | None:
    """One line saying why ``key=vllm`` cannot run here (vllm not importable, or no CUDA GPU); None when it can."""
    if importlib.util.find_spec("vllm") is None:
        return f"{key}=vllm but vllm is not installed here: {INSTALL}, or set {key}=hf"
    import torch

    if not torch.cuda.is_available():
        return f"{key}=vllm needs a CUDA GPU and none is visible here; set {key}=hf"
    return None


def sampling_params(cfg, stops: list[int], seed: int | None = None):
    """The ``vllm.SamplingParams`` of one prompt's sampling: nothing but what ``cfg`` (a SamplingConfig) says."""
    from vllm import SamplingParams

    greedy = cfg.temperature <= 0
    return SamplingParams(
        n=int(cfg.num_samples), temperature=0.0 if greedy else float(cfg.temperature),
        top_p=1.0 if greedy else float(cfg.top_p), top_k=0 if greedy else int(cfg.top_k), min_p=0.0,
        max_tokens=int(cfg.max_new_tokens), min_tokens=0, seed=None if seed is None else int(seed),
        stop=list(cfg.stop_strings), stop_token_ids=[int(t) for t in stops], include_stop_str_in_output=False,
        ignore_eos=False, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
        skip_special_tokens=True, detokenize=True)


def prompt_params(cfg, stops: list[int], seed: int, n_prompts: int) -> list:
    """One SamplingParams per prompt: prompt ``i`` gets seed ``seed + i * n`` (vLLM gives its sample ``j`` seed
    ``seed + i * n + j``), so every sample of a call has its own seed."""
    return [sampling_params(cfg, stops, int(seed) + i * int(cfg.num_samples)) for i in range(n_prompts)]


def engine_dtype(model, dtype=None) -> str:
    """What the engine computes in, as vLLM names it: ``dtype`` when given (a torch dtype: the run's autocast dtype),
    else the autocast dtype where the caller runs under autocast (bf16-mixed), else the weights' dtype."""
    import torch

    param = next(model.parameters())
    if dtype is None:
        dtype = param.dtype
        if torch.is_autocast_enabled(param.device.type):
            dtype = torch.get_autocast_dtype(param.device.type)
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]


def _lora_rank(model) -> int | None:
    """The adapter's rank of a peft model (None for a plain model)."""
    config = getattr(model, "peft_config", None)
    if not config:
        return None
    return max(int(getattr(c, "r", 0) or 0) for c in config.values())


def model_dir(model) -> str:
    """The directory (or hub id) the model was loaded from: what the engine loads its architecture and tokenizer
    from."""
    leaf = hf_model(model)
    path = getattr(leaf, "name_or_path", None) or getattr(leaf.config, "_name_or_path", None)
    if not path:
        raise ValueError("vllm needs the directory the model was loaded from, and this model names none "
                         "(config._name_or_path); use data.generation_backend=hf / eval.backend=hf")
    return str(path)


#: Why a run on several ranks does not build a vLLM engine (one line; run.py refuses such runs before they load).
SEVERAL_RANKS = ("vllm runs in one-process runs only: on several ranks the engines would be built one rank at a time "
                 "(self-play under the cache's lock, evaluation on rank 0) while vLLM sets up groups over all ranks, "
                 "and hang; build the scale's self-play data with vllm in its preparation job (Slurm) or a "
                 "one-process run, and set data.generation_backend=hf / eval.backend=hf for runs on several ranks")


def several_ranks_refusal(*, generation_backend: str, eval_backend: str, online: bool, ranks: int) -> str | None:
    """The one line that stops a run on ``ranks`` > 1 ranks that would build a vLLM engine: online rollouts or
    evaluation with vllm. Offline self-play with vllm is allowed: a preparation job (one process) builds it and the
    run reads the cache; if it has to build it itself, :func:`engine_kwargs` stops it with the same line."""
    if ranks > 1 and (eval_backend == "vllm" or (online and generation_backend == "vllm")):
        return f"{ranks} ranks: {SEVERAL_RANKS}"
    return None


def engine_kwargs(model, *, seed: int = 0, dtype=None) -> dict:
    """The ``vllm.LLM`` arguments for ``model`` (shared with lm-eval's vllm model type, :func:`lm_eval_model`);
    refused under a process group of several ranks (:data:`SEVERAL_RANKS`)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError(SEVERAL_RANKS)

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: weights go in directly
    rank = _lora_rank(model)
    kwargs = {"dtype": engine_dtype(model, dtype), "seed": int(seed), "enable_sleep_mode": True,
              "gpu_memory_utilization": float(os.environ.get(GPU_MEMORY_ENV, DEFAULT_GPU_MEMORY)),
              "trust_remote_code": bool(getattr(hf_model(model).config, "trust_remote_code", False))}
    if rank is not None:
        kwargs.update(enable_lora=True, max_lora_rank=rank)
    return kwargs


def engine_for(model):
    """The cached engine of ``model``'s directory, dtype and LoRA rank (built on first use)."""
    from vllm import LLM

    path, kwargs = model_dir(model), engine_kwargs(model)
    key = (path, kwargs["dtype"], kwargs.get("max_lora_rank"))
    if key not in _ENGINES:
        _ENGINES[key] = LLM(model=path, **kwargs)
        _ENGINES[key].sleep(level=1)  # asleep until a call wakes it
    return _ENGINES[key]


def release() -> None:
    """Drop every engine and give its GPU memory back (after self-play: training needs it)."""
    import torch

    _ENGINES.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def named_weights(model):
    """``(name, tensor)`` of a plain model's parameters under the checkpoint's names (what vLLM's ``load_weights``
    reads; a tied output embedding comes once, as the checkpoint has it)."""
    yield from hf_model(model).named_parameters()


def load_weights(llm, model) -> None:
    """Load ``model``'s current weights into the engine and drop its prefix cache (cached prompts were computed
    with the old weights)."""
    weights = list(named_weights(model))
    llm.apply_model(lambda vllm_model: vllm_model.load_weights(iter(weights)))
    llm.reset_prefix_cache()


_LORA_IDS = iter(range(1, 2**31))


def lora_request(model, directory: str):
    """Save ``model``'s adapter into ``directory`` and name it for vLLM (a new id each time: vLLM caches by id)."""
    from vllm.lora.request import LoRARequest

    model.save_pretrained(directory)
    lora_id = next(_LORA_IDS)
    return LoRARequest(f"policy-{lora_id}", lora_id, directory)


def sample_vllm(model, tokenizer, prompts: list[str], cfg, *, seed: int = 0, progress: bool = False,
                desc: str = "sampling"):
    """:func:`posttrain.rollout.sample` on vLLM: ``cfg.num_samples`` completions per prompt from ``model`` as it is
    now, in prompt order, finished exactly as the HF path finishes them."""
    from vllm import TokensPrompt

    from posttrain.rollout.sampler import stop_ids

    stops = stop_ids(model, tokenizer)
    llm = engine_for(model)
    encoded = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    params = prompt_params(cfg, stops, seed, len(prompts))
    llm.wake_up()
    try:
        with tempfile.TemporaryDirectory(prefix="posttrain-vllm-lora-") as tmp:
            lora = lora_request(model, tmp) if _lora_rank(model) is not None else None
            if lora is None:
                load_weights(llm, model)
            outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in encoded], params,
                                   use_tqdm=progress, lora_request=lora)
    finally:
        llm.sleep(level=1)
    return rollouts(tokenizer, prompts, outputs, stops, cfg.stop_strings)


def rollouts(tokenizer, prompts: list[str], outputs, stops: list[int], stop_strings=()) -> list:
    """vLLM's ``RequestOutput`` per prompt -> :class:`~posttrain.rollout.Rollout`, each completion finished by the HF
    path's :func:`~posttrain.rollout.sampler.finish` (stop id kept, text cut before a stop string); truncated = vLLM
    stopped at ``max_tokens``."""
    from posttrain.rollout.sampler import Rollout, finish

    out = []
    for prompt, output in zip(prompts, outputs):
        texts, ids_out, truncated = [], [], []
        for completion in sorted(output.outputs, key=lambda c: c.index):
            ids, text, _ = finish(tokenizer, list(completion.token_ids), stops, None, stop_strings)
            ids_out.append(ids)
            texts.append(text)
            truncated.append(completion.finish_reason == "length")
        out.append(Rollout(prompt, texts, ids_out, truncated))
    return out


def lm_eval_model(model, tokenizer, eval_cfg, *, seed: int, dtype=None, adapter_dir: str | None = None):
    """lm-eval's own ``vllm`` model type for ``model``: built from its directory with the engine arguments of
    :func:`engine_kwargs` (``dtype``: the run's autocast dtype) and ``eval.max_gen_toks``, then given the model's
    current weights (a peft model: its adapter, saved into ``adapter_dir``, applied unmerged). One process (rank 0)
    evaluates: the engine is not built collectively."""
    from lm_eval.models.vllm_causallms import VLLM

    kwargs = engine_kwargs(model, seed=seed, dtype=dtype)
    kwargs.pop("seed")
    kwargs.pop("enable_sleep_mode")
    rank = kwargs.pop("max_lora_rank", None)
    kwargs.pop("enable_lora", None)
    extra = {}
    if rank is not None:
        if adapter_dir is None:
            raise ValueError("evaluating a LoRA policy with vllm needs a directory for its adapter")
        model.save_pretrained(adapter_dir)
        extra = {"lora_local_path": adapter_dir, "max_lora_rank": rank}
    lm = VLLM(pretrained=model_dir(model), tokenizer=getattr(tokenizer, "name_or_path", None) or None,
              batch_size="auto", seed=int(seed), max_gen_toks=int(eval_cfg.max_gen_toks), **extra, **kwargs)
    if rank is None:
        load_weights(lm.model, model)
    return lm

"""What a scale's runs share, built once: the base model, its scores, the self-play data, the reference log-probs.

Every algorithm and seed at a scale (base model + data settings) starts from the same base, trains on the same
self-play data and, offline, measures itself against the same reference: these belong to the scale, not to a run,
and are cached per scale under ``POSTTRAIN_CACHE`` (posttrain.cache). A run builds what is missing itself (the
first run of a scale pays, the others read), under a file lock. On Slurm the launcher submits one *preparation job*
per scale before the cells, and the scale's cells depend on it (``afterok``, posttrain.sweep.preparation), so no
cell holds its GPUs idle while another builds the scale's data under the lock.

``run.train_and_evaluate`` uses :func:`load_base`, :func:`training_examples` and :func:`reference_logps`; the
preparation job (``prepare={algos: [...], lora: [...]}`` in the task config, posttrain.run.main) runs
:func:`prepare_scale`, which calls the same three for every data kind and LoRA setting its cells need.
"""

from __future__ import annotations

import time

from omegaconf import DictConfig, OmegaConf


def load_base(cfg: DictConfig, *, lora: bool, precision, device):
    """The scale's base model and tokenizer, in the dtype a run with ``lora`` trains it in."""
    from posttrain.models.loading import load_policy

    return load_policy(cfg.scale, OmegaConf.create({"enabled": False}), trust_remote_code=bool(cfg.trust_remote_code),
                       device=device, dtype=precision.load_dtype(lora=lora), mirror=cfg.get("mirror"))


def training_examples(cfg: DictConfig, kind: str, loaded, precision, device, report: dict, *,
                      announce: bool = True) -> list[dict]:
    """The training examples of data ``kind``: the prompts (online methods sample for themselves) or the scale's
    self-play samples (cached per base and data settings) made into pairs / unpaired rows / SFT targets. ``report``
    receives result.json's ``data`` block (the yield manifest)."""
    from posttrain.data.selfplay import (check_lengths, generation_backend, load_records, low_yield_line,
                                         make_examples, prompt_format, selfplay_report, selfplay_samples,
                                         stop_strings, training_prompts)

    prompts = training_prompts(cfg.data)  # data.prompt_format: the one source of prompts, self-play and online
    longest = check_lengths(loaded.tokenizer, [p.prompt for p in prompts], int(cfg.data.max_length),
                            int(cfg.data.max_new_tokens))  # before any sampling: a prompt that cannot fit stops here
    if kind == "prompts":
        records = [{"prompt": p.prompt, "answer": p.answer} for p in prompts]
        report.update({"prompts": len(records), "prompt_format": prompt_format(cfg.data)})
    else:
        with precision.autocast(device):  # sampled as the run computes: bf16 for bf16-mixed
            samples = selfplay_samples(loaded.model, loaded.tokenizer, loaded.model_id, cfg.data,
                                       precision=precision.name)
        records = load_records(samples)
        report.update(selfplay_report(samples))  # the yield manifest: pairs, strict/flexible accuracy, sampling
        warning = low_yield_line(report, float(cfg.data.min_pair_yield))
        if warning and announce:
            print(warning, flush=True)
    report["longest_prompt_tokens"] = longest
    return make_examples(records, kind, seed=int(cfg.data.seed), sft_source=str(cfg.data.sft_source),
                         stop_strings=stop_strings(cfg.data), generation_backend=generation_backend(cfg.data))


def reference_logps(loaded, cfg: DictConfig, kind: str, examples: list, precision, device, *,
                    progress: bool = True) -> list:
    """``examples`` with their rows' reference log-probs from the per-scale cache (computed here the first time;
    posttrain.algorithms.reference_cache). ``loaded`` must be the untouched base: the reference."""
    from posttrain.algorithms import reference_cache

    table = reference_cache.reference_table(
        loaded.model, loaded.tokenizer, kind, examples, model_id=loaded.model_id, tokenizer_id=loaded.tokenizer_id,
        load_dtype=str(next(loaded.model.parameters()).dtype), precision=precision.name,
        max_length=int(cfg.data.max_length), batch_size=2 * int(cfg.trainer.micro_batch_size),
        autocast=lambda: precision.autocast(device), progress=progress)
    return reference_cache.attach(kind, examples, table)


def prepare_scale(cfg: DictConfig) -> dict:
    """The preparation job: base scores, self-play data and reference log-probs of the scale, for the algorithms
    ``cfg.prepare.algos`` under each LoRA setting of ``cfg.prepare.lora``; prints one line, returns a summary."""
    import torch

    from posttrain.algorithms import registry
    from posttrain.cache import CACHE_EVENTS
    from posttrain.models import kernels
    from posttrain.models.engine import deepspeed_enabled
    from posttrain.models.precision import Precision
    from posttrain.run import base_scores, quiet_libraries

    quiet_libraries()
    started = time.perf_counter()
    algos = [registry.get(str(name)) for name in cfg.prepare.algos]
    flags = sorted({bool(flag) for flag in cfg.prepare.get("lora") or [bool(cfg.lora.enabled)]})
    kinds = sorted({a.data for a in algos})
    cached = sorted({a.data for a in algos if bool(cfg.trainer.reference_cache) and a.reference_cacheable({})})
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    precision = Precision.from_config(cfg.trainer.precision, deepspeed=deepspeed_enabled(cfg.deepspeed))
    CACHE_EVENTS.clear()
    report: dict = {}
    # one load per weight dtype: LoRA and full fine-tuning that load the base alike (fp32, DeepSpeed's bf16) read the
    # same cache entries, so the second load would only find them built
    loads = {precision.load_dtype(lora=lora): lora for lora in reversed(flags)}
    for i, lora in enumerate(sorted(loads.values())):
        loaded = load_base(cfg, lora=lora, precision=precision, device=device)
        kernels.apply_liger(loaded.model, cfg.trainer.get("liger", "auto"))  # as the runs will compute
        if i == 0 and cfg.eval.base_scores:
            base_scores(loaded, cfg, precision)
        for kind in kinds:
            examples = training_examples(cfg, kind, loaded, precision, device, report)
            if kind in cached:
                reference_logps(loaded, cfg, kind, examples, precision, device)
        del loaded
    built = sorted(k.split("/")[0] for k, hit in CACHE_EVENTS.items() if not hit)
    summary = {"status": "prepared", "scale": str(cfg.scale.name), "kinds": kinds, "reference_cached": cached,
               "lora": flags, "built": built, "seconds": round(time.perf_counter() - started, 1)}
    print(f"[prepared] {cfg.scale.name}: data {', '.join(kinds)}; reference log-probs "
          f"{', '.join(cached) or 'none needed'} (lora {', '.join('on' if f else 'off' for f in flags)}); "
          f"built {', '.join(built) or 'nothing (all cached)'} in {summary['seconds']} s", flush=True)
    return summary

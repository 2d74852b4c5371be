"""Evaluation through lm-eval: the embedded tasks and the study's real ones, one code path (HFLM in memory).

The embedded tasks ship as YAMLs in ``evaluate/tasks``; their data are generated deterministically, written with
resolved YAMLs under the cache root (lm-eval's json loader needs real paths) and loaded through
``TaskManager(include_path=...)``. Real tasks (gsm8k, minerva_math, arc_challenge, hellaswag, winogrande) are
lm-eval's own task definitions (posttrain.evaluate.lm_eval_tasks), reading their datasets from the mirror when the
mirror holds them (README.md, "Mirror"), else from the hub as lm-eval does. minerva_math is scored by lm-eval's
own code inside posttrain.evaluate.math_runtime's antlr4 4.11 window (its docstring gives the decision).

Generation settings: ``eval.max_gen_toks`` reaches every generate_until task through ``simple_evaluate``'s
``gen_kwargs`` (lm-eval's real tasks otherwise use HFLM's default of 256 tokens), and the generation kwargs each
task ran with are handed back (``generation=``) so result.json records what ran, not what was asked for.

``eval.backend=vllm`` runs lm-eval's own ``vllm`` model type instead of HFLM, same tasks and generation kwargs
(posttrain.rollout.vllm_backend.lm_eval_model; docs/real-scales.md, "vLLM (optional)").

Metrics are returned exactly as lm-eval names them (``exact_match,strict-match``, ``acc_norm,none``, ...),
non-numeric entries (``N/A``) dropped.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from contextlib import nullcontext
from pathlib import Path

from posttrain.cache import cache_root, cached_dir, stable_hash
from posttrain.data import synth
from posttrain.evaluate import lm_eval_tasks, math_runtime
from posttrain.evaluate.lm_eval_tasks import lm_eval_version  # noqa: F401 - re-exported (run.py)

TASK_DIR = Path(__file__).parent / "tasks"
EMBEDDED = {"synth_gsm8k", "synth_math", "synth_mc"}
EMBEDDED_SIZES = {"test": 500, "fewshot": 50}  # documents per split of each embedded task
EMBEDDED_VERSION = 1


def _write_embedded(tmp: Path, final: Path, max_gen_toks: int) -> None:
    """Write the data files into ``tmp`` and YAMLs that point at ``final`` (where ``tmp`` is renamed to)."""
    for split, n in EMBEDDED_SIZES.items():
        rows = {
            "synth_gsm8k": [p.to_json() for p in synth.problems(split, n)],
            "synth_math": [p.to_json() for p in synth.problems(split, n, hard=True)],
            "synth_mc": synth.mc_items(split, n),
        }
        for task, docs in rows.items():
            with open(tmp / f"{task}_{split}.jsonl", "w") as handle:
                for doc in docs:
                    handle.write(json.dumps(doc) + "\n")
    for task in EMBEDDED:
        text = (TASK_DIR / f"{task}.yaml").read_text()
        text = text.replace("__DATA__", str(final)).replace("__MAX_GEN_TOKS__", str(max_gen_toks))
        (tmp / f"{task}.yaml").write_text(text)


def embedded_task_dir(max_gen_toks: int) -> Path:
    """Directory holding the embedded tasks' data and resolved YAMLs (built once per settings, cached)."""
    key = f"v{EMBEDDED_VERSION}-{stable_hash({'sizes': EMBEDDED_SIZES, 'gen': max_gen_toks})}"
    final = cache_root() / "tasks" / key
    return cached_dir("tasks", key, lambda tmp: _write_embedded(tmp, final, max_gen_toks))


def _fewshot_groups(tasks: list[str], num_fewshot) -> dict[int | None, list[str]]:
    groups: dict[int | None, list[str]] = {}
    for task in tasks:
        n = num_fewshot.get(task) if hasattr(num_fewshot, "get") else num_fewshot
        groups.setdefault(None if n is None else int(n), []).append(task)
    return groups


def _numeric(metrics: dict) -> dict:
    out = {}
    for key, value in metrics.items():
        if key == "alias" or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
            out[key] = float(value)
    return out


def evaluate(model, tokenizer, eval_cfg, *, seed: int = 0, mirror: str | None = None,
             generation: dict | None = None, autocast_dtype=None) -> dict[str, dict[str, float]]:
    """Run lm-eval on ``eval_cfg.tasks`` for an in-memory HF model; ``{task: {metric: value}}``.

    ``mirror``: the local mirror directory (config key ``mirror``); ``generation``: filled with
    ``{task: generation kwargs as run}`` for the generate_until tasks; ``autocast_dtype``: HFLM's
    ``mixed_precision_dtype`` (bf16 forwards over float32 weights, as the run trained; None: the weights' dtype).

    Collective under a process group of N > 1 ranks: every rank calls it with its own copy of the model and
    evaluates its share of the documents (posttrain.evaluate.data_parallel); rank 0 returns the metrics one process
    would compute, the other ranks ``{}``. Where ``eval.limit`` leaves fewer documents than ranks, rank 0 evaluates
    alone and the others return ``{}`` at once.

    ``eval.backend=vllm``: lm-eval's own ``vllm`` model type with the same task generation kwargs, built from the
    model's directory and given its current weights (posttrain.rollout.vllm_backend.lm_eval_model); rank 0 alone."""
    if eval_backend(eval_cfg) == "vllm":
        return _evaluate_vllm(model, tokenizer, eval_cfg, seed=seed, mirror=mirror, generation=generation,
                              autocast_dtype=autocast_dtype)
    from lm_eval.models.huggingface import HFLM

    from posttrain.evaluate.data_parallel import DataParallelHFLM, eval_world_size
    from posttrain.models.distributed import is_main_process

    sharded = eval_world_size(eval_cfg.limit) > 1
    if not sharded and not is_main_process():
        return {}
    was_training = model.training
    model.eval()
    try:
        lm_class = DataParallelHFLM if sharded else HFLM
        lm = lm_class(pretrained=model, tokenizer=tokenizer, batch_size=int(eval_cfg.batch_size),
                  device=str(next(model.parameters()).device),
                  max_length=getattr(model.config, "max_position_embeddings", 2048),
                  mixed_precision_dtype=autocast_dtype)
        return evaluate_lm(lm, eval_cfg, seed=seed, mirror=mirror, generation=generation)
    finally:
        model.train(was_training)


def eval_backend(eval_cfg) -> str:
    """``eval.backend``: hf (HFLM, the default) or vllm; what result.json's ``eval.backend`` records."""
    return str(eval_cfg.get("backend") or "hf")


def _evaluate_vllm(model, tokenizer, eval_cfg, *, seed, mirror, generation, autocast_dtype):
    from posttrain.models.distributed import is_main_process
    from posttrain.rollout import vllm_backend

    if not is_main_process():
        return {}
    with tempfile.TemporaryDirectory(prefix="posttrain-eval-adapter-") as adapter_dir:
        lm = vllm_backend.lm_eval_model(model, tokenizer, eval_cfg, seed=seed, dtype=autocast_dtype,
                                        adapter_dir=adapter_dir)
        try:
            return evaluate_lm(lm, eval_cfg, seed=seed, mirror=mirror, generation=generation)
        finally:
            del lm
            vllm_backend.release()


def evaluate_lm(lm, eval_cfg, *, seed: int = 0, mirror: str | None = None,
                generation: dict | None = None) -> dict[str, dict[str, float]]:
    """Run lm-eval's ``simple_evaluate`` with any lm-eval ``LM`` (HFLM, or a test oracle); see :func:`evaluate`."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from posttrain.evaluate.data_parallel import ShardedTaskManager

    tasks = list(eval_cfg.tasks)
    unknown_embedded = [t for t in tasks if t.startswith("synth_") and t not in EMBEDDED]
    if unknown_embedded:
        raise ValueError(f"unknown embedded task(s) {unknown_embedded}; known: {sorted(EMBEDDED)}")
    max_gen_toks = eval_cfg.get("max_gen_toks")
    gen_kwargs = {"max_gen_toks": int(max_gen_toks)} if max_gen_toks is not None else None
    for name in ("lm_eval", "lm-eval"):  # its "model is not a str" warnings are expected for in-memory models
        logging.getLogger(name).setLevel(logging.ERROR)
    real = [t for t in tasks if t not in EMBEDDED]
    dirs = lm_eval_tasks.index_dirs(real) if real else []
    index = lm_eval_tasks.build_index(dirs) if real else {}
    leaves = lm_eval_tasks.leaf_tasks(real, index)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="posttrain-mirror-tasks-") as overrides:
        if mirror and leaves:
            lm_eval_tasks.write_mirror_overrides(leaves, str(mirror), Path(overrides))
        include = [str(d) for d in dirs or []]
        if set(tasks) & EMBEDDED:
            include.append(str(embedded_task_dir(int(eval_cfg.max_gen_toks))))
        include.append(overrides)
        manager = ShardedTaskManager if lm.world_size > 1 else TaskManager  # data_parallel: one-process prompts
        task_manager = manager(include_path=include, include_defaults=dirs is None)
        for shots, group in _fewshot_groups(tasks, eval_cfg.num_fewshot).items():
            needs_math = any(leaf.lm_eval_dir in math_runtime.TASK_DIRS
                             for leaf in lm_eval_tasks.leaf_tasks([t for t in group if t not in EMBEDDED], index))
            with math_runtime.scoring(mirror) if needs_math else nullcontext():
                out = lm_eval.simple_evaluate(
                    model=lm, tasks=group, num_fewshot=shots, limit=eval_cfg.limit, task_manager=task_manager,
                    apply_chat_template=bool(eval_cfg.apply_chat_template), log_samples=False,
                    bootstrap_iters=1000, gen_kwargs=gen_kwargs, random_seed=seed, numpy_random_seed=seed,
                    torch_random_seed=seed, fewshot_random_seed=seed, verbosity="ERROR")
            if out is None:  # a rank > 0 of a data-parallel evaluation: rank 0 holds the gathered metrics
                continue
            for task, metrics in out["results"].items():
                results[task] = _numeric(metrics)
            if generation is not None:
                for task, config in (out.get("configs") or {}).items():
                    if config.get("output_type") == "generate_until":
                        generation[task] = dict(config.get("generation_kwargs") or {})
    return results


"""Evaluation through lm-eval: the embedded tasks and the study's real ones, one code path (HFLM in memory).

The embedded tasks ship as YAMLs in ``evaluate/tasks``; their data are generated deterministically, written with
resolved YAMLs under the cache root (lm-eval's json loader needs real paths) and loaded through
``TaskManager(include_path=...)``. Real tasks (gsm8k, minerva_math, arc_challenge, hellaswag, winogrande) are
lm-eval's own, which need their datasets (hub or HF_DATASETS_CACHE).

Metrics are returned exactly as lm-eval names them (``exact_match,strict-match``, ``acc_norm,none``, ...),
non-numeric entries (``N/A``) dropped.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from posttrain.cache import cache_root, cached_dir, stable_hash
from posttrain.data import synth

TASK_DIR = Path(__file__).parent / "tasks"
EMBEDDED = {"synth_gsm8k", "synth_math", "synth_mc"}
EMBEDDED_SIZES = {"test": 500, "fewshot": 50}  # documents per split of each embedded task
EMBEDDED_VERSION = 1


def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


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


def evaluate(model, tokenizer, eval_cfg, *, seed: int = 0) -> dict[str, dict[str, float]]:
    """Run lm-eval on ``eval_cfg.tasks`` for an in-memory HF model; ``{task: {metric: value}}``."""
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=int(eval_cfg.batch_size),
                  device=str(next(model.parameters()).device),
                  max_length=getattr(model.config, "max_position_embeddings", 2048))
        return evaluate_lm(lm, eval_cfg, seed=seed)
    finally:
        model.train(was_training)


def evaluate_lm(lm, eval_cfg, *, seed: int = 0) -> dict[str, dict[str, float]]:
    """Run lm-eval's ``simple_evaluate`` with any lm-eval ``LM`` (HFLM, or a test oracle)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = list(eval_cfg.tasks)
    unknown_embedded = [t for t in tasks if t.startswith("synth_") and t not in EMBEDDED]
    if unknown_embedded:
        raise ValueError(f"unknown embedded task(s) {unknown_embedded}; known: {sorted(EMBEDDED)}")
    include = [str(embedded_task_dir(int(eval_cfg.max_gen_toks)))] if set(tasks) & EMBEDDED else None
    task_manager = TaskManager(include_path=include, include_defaults=bool(set(tasks) - EMBEDDED))
    for name in ("lm_eval", "lm-eval"):  # its "model is not a str" warnings are expected for in-memory models
        logging.getLogger(name).setLevel(logging.ERROR)
    results: dict[str, dict[str, float]] = {}
    for shots, group in _fewshot_groups(tasks, eval_cfg.num_fewshot).items():
        out = lm_eval.simple_evaluate(
            model=lm, tasks=group, num_fewshot=shots, limit=eval_cfg.limit, task_manager=task_manager,
            apply_chat_template=bool(eval_cfg.apply_chat_template), log_samples=False, bootstrap_iters=1000,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed,
            verbosity="WARNING")
        for task, metrics in out["results"].items():
            results[task] = _numeric(metrics)
    return results

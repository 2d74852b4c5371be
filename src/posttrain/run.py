"""One run = one pipeline, the only place that knows the order (docs/design.md, "Layers"):

identity -> skip if done -> model -> data -> train -> evaluate -> result.json.

``result.json`` is written atomically at the end of every run, completed, failed or cancelled (Ctrl-C, SIGTERM: the
steps done are recorded, the checkpoint kept, exit status 130 / 143); a completed result is never
overwritten: a relaunch with the same config hash skips the cell, one with another hash (the code's defaults
changed) moves the old directory aside to ``<dir>.<old hash>`` and runs again.
"""

from __future__ import annotations

import os
import platform
import random
import shutil
import signal
import subprocess
import sys

import traceback
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from filelock import FileLock, Timeout
from omegaconf import DictConfig, OmegaConf

from posttrain import results
from posttrain.cache import CACHE_EVENTS, stable_hash
from posttrain.cell import cell_of, completed_hash, config_hash, is_done, override_key, ranks_refusal
from posttrain.config_schema import ConfigError, check_run_config
from posttrain.preemption import cancellation, signal_of
from posttrain.sweep.manifest import running

PACKAGES = ("torch", "transformers", "peft", "deepspeed", "lm_eval", "trl", "datasets", "hydra-core", "wandb",
            "submitit", "posttrain")
EVAL_SEED = 1234  # lm-eval's own default: every run (and the base) sees the same few-shot examples


class UserError(Exception):
    """A mistake in the command or config: printed as one line, never as a traceback."""


def cell_identity(cfg: DictConfig, overrides: list[str], hydra_node=None) -> tuple[str, str]:
    """(variant, cell directory relative to the sweep directory) of a composed config (posttrain.cell); with the
    job's Hydra node, overrides equal to the config's default name no variant (as in ``hydra.sweep.subdir``)."""
    from posttrain.sweep.cells import composed_is_default

    return cell_of(cfg, overrides, composed_is_default(hydra_node) if hydra_node is not None else None)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _versions() -> dict:
    out = {}
    for pkg in PACKAGES:
        try:
            out[pkg.replace("-", "_")] = version(pkg)
        except PackageNotFoundError:
            out[pkg.replace("-", "_")] = None
    return out


def _git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, text=True,
                              capture_output=True, timeout=5, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _hardware(threads: int) -> dict:
    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "torch_threads": threads, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpus"] = torch.cuda.device_count()
    return info


def available_cpus() -> int:
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    if slurm and slurm.isdigit():
        return int(slurm)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _hparams(cfg: DictConfig) -> dict:
    algo = OmegaConf.to_container(cfg.algo, resolve=True)
    algo.pop("name", None)
    return algo


def _empty_result(cfg, algo_meta, name, chash, started) -> dict:
    versions = _versions()
    return {
        "status": results.FAILED, "algo": str(cfg.algo.name), "variant": name, "scale": str(cfg.scale.name),
        "seed": int(cfg.seed), "lora": bool(cfg.lora.enabled), "config_hash": chash,
        "config": _scrubbed_config(cfg), "algo_meta": algo_meta, "metrics": {},
        "eval": {"tasks": list(cfg.eval.tasks), "num_fewshot": OmegaConf.to_container(cfg.eval, resolve=True)[
            "num_fewshot"], "chat_template": bool(cfg.eval.apply_chat_template), "limit": cfg.eval.limit,
            "lm_eval_version": versions["lm_eval"], "base_metrics": {}},
        "train": {"steps": 0, "examples": 0, "tokens": 0, "seconds": 0.0, "tokens_per_s": 0.0, "final_loss": None,
                  "loss_curve": [], "reward_curve": []},
        "provenance": {"git_sha": _git_sha(), "versions": versions, "hardware": {}, "started": started,
                       "finished": None, "cache_hits": {}},
        "error": None,
    }


def _scrubbed_config(cfg: DictConfig) -> dict:
    from posttrain.tracker import scrub

    return scrub(OmegaConf.to_container(cfg, resolve=True))


def quiet_libraries() -> None:
    """Keep a run's output to our progress bars and summary: no per-shard bars or known-harmless warnings."""
    import logging

    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    for name in ("lm_eval", "lm-eval", "datasets", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def base_scores(loaded, cfg: DictConfig, precision) -> dict:
    """lm-eval scores of the untrained base, cached per (base, eval settings, compute precision). Under a process
    group every rank calls it: the ranks score their shares together, rank 0 writes the cache, all get the scores."""
    from posttrain.cache import cached_json_on_all_ranks
    from posttrain.evaluate.harness import evaluate, lm_eval_version

    settings = OmegaConf.to_container(cfg.eval, resolve=True)
    settings.pop("profiles", None)
    settings.pop("batch_size", None)
    if settings.get("backend") == "hf":  # the default since eval.backend exists: cached scores keep their key
        settings.pop("backend")
    fields = {"v": 2, "model": loaded.model_id, "tokenizer": loaded.tokenizer_id, "eval": settings,
              "lm_eval": lm_eval_version(), "seed": EVAL_SEED, "precision": precision.name}
    return cached_json_on_all_ranks("base_scores", stable_hash(fields), lambda: evaluate(
        loaded.model, loaded.tokenizer, cfg.eval, seed=EVAL_SEED, mirror=cfg.get("mirror"),
        autocast_dtype=precision.autocast_dtype))


def train_and_evaluate(cfg: DictConfig, algo, cell_dir: Path, tracker, result: dict) -> None:
    """The heavy part of a run; fills ``result`` in place so a failure keeps what was done."""
    import numpy as np
    import torch

    from posttrain.algorithms.reference_cache import CachedReference
    from posttrain.evaluate.harness import eval_backend, evaluate
    from posttrain.models.distributed import is_main_process
    from posttrain.models import kernels, memory_plan
    from posttrain.models.engine import deepspeed_enabled, gathered
    from posttrain.models.loading import Reference, add_lora, save_model
    from posttrain.models.precision import PURE_BF16_COST, Precision
    from posttrain.prepare import load_base, reference_logps, training_examples
    from posttrain.rollout.sampler import model_generation_defaults
    from posttrain.train import train

    quiet_libraries()
    seed = int(cfg.seed)
    main = is_main_process()
    device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
    precision = Precision.from_config(cfg.trainer.precision, deepspeed=deepspeed_enabled(cfg.deepspeed))
    if precision.name == "bf16-pure" and main:
        print(PURE_BF16_COST, flush=True)
    mirror = cfg.get("mirror")
    loaded = load_base(cfg, lora=bool(cfg.lora.enabled), precision=precision, device=device)
    liger = kernels.apply_liger(loaded.model, cfg.trainer.get("liger", "auto"))  # first: every forward uses them
    if cfg.eval.base_scores:  # every rank: all score their shares of the documents (or read the cache) together
        result["eval"]["base_metrics"] = base_scores(loaded, cfg, precision)
    result["data"] = {}
    examples = training_examples(cfg, algo.data, loaded, precision, device, result["data"], announce=main)

    hparams = _hparams(cfg)
    cached_reference = bool(cfg.trainer.reference_cache) and algo.reference_cacheable(hparams)
    if cached_reference:  # before LoRA: the loaded base is the reference (posttrain.algorithms.reference_cache)
        examples = reference_logps(loaded, cfg, algo.data, examples, precision, device, progress=main)

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    policy = add_lora(loaded.model, cfg.lora) if cfg.lora.enabled else loaded.model
    reference = CachedReference() if cached_reference else \
        Reference(policy if algo.needs_reference(hparams) else None, lora=bool(cfg.lora.enabled))
    checkpointing = memory_plan.plan_run(policy, cfg, algo, hparams, reference_copy=reference.movable)
    with memory_plan.applied(policy, checkpointing):  # recompute activations only when memory requires it
        state = train(policy, reference, loaded.tokenizer, algo, hparams, examples, cfg.trainer,
                      max_length=int(cfg.data.max_length), seed=seed, log=tracker.log,
                      checkpoint_dir=cell_dir / "checkpoint", progress=main, fingerprint=result["config_hash"],
                      deepspeed=cfg.deepspeed if deepspeed_enabled(cfg.deepspeed) else None)
    result["train"] = {**train_record(state), "reference_forwards": reference.calls, "dataset_size": len(examples),
                       "precision": precision.record(policy), "reference_cache": cached_reference,
                       "gradient_checkpointing": checkpointing.record(), "liger": liger}
    with gathered(policy) as bare:  # ZeRO-3: every rank gathers the weights; rank 0 alone saves; every rank
        # evaluates its share of the documents and rank 0 gets the metrics (posttrain.evaluate.data_parallel)
        if main and cfg.get("save_model"):
            save_model(bare, loaded.tokenizer, cell_dir / "model")
        # LoRA is evaluated unmerged, exactly as it trained (base + adapter path under the same precision): merging
        # a small update into bf16 base weights rounds most of it away (measured: 32% of it survived).
        generation: dict = {}
        metrics = evaluate(bare, loaded.tokenizer, cfg.eval, seed=EVAL_SEED, mirror=mirror, generation=generation,
                           autocast_dtype=precision.autocast_dtype)
        if not main:
            return
        result["metrics"] = metrics
        result["eval"]["backend"] = eval_backend(cfg.eval)
        result["eval"]["generation"] = generation  # the generation kwargs each task ran with, and what HF generate
        # adds to them from the model's own generation config (lm-eval's HF backend applies it: Qwen2.5's
        # repetition_penalty 1.05 acts on greedy decoding too, as for every lm-eval user of these models)
        result["eval"]["model_generation_config"] = model_generation_defaults(bare)
    tracker.log({f"eval/{task}/{metric}": value for task, metrics in result["metrics"].items()
                 for metric, value in metrics.items()}, state.step)


def train_record(state) -> dict:
    """result.json's ``train`` block from the loop's TrainState (also a cancelled run's: the steps it did)."""
    return {
        "steps": state.step, "examples": state.examples, "tokens": state.tokens, "seconds": round(state.seconds, 3),
        "tokens_per_s": round(state.tokens / state.seconds, 1) if state.seconds else 0.0,
        "prepare_seconds": round(state.prepare_seconds, 3),  # online: the rollout phases (generation and scoring)
        "final_loss": state.loss_curve[-1][1] if state.loss_curve else None, "loss_curve": state.loss_curve,
        "reward_curve": state.reward_curve, "resumed_from": state.resumed_from,
        "shared_prompt": state.shared_prompt}  # rows sharing a prompt packed behind one copy (models/shared_prompt.py)


def summary_line(result: dict, cell_dir: Path) -> str:
    parts = []
    for task, metrics in result["metrics"].items():
        key = next((k for k in ("exact_match,strict-match", "acc_norm,none", "acc,none") if k in metrics), None)
        if key is None:
            continue
        base = result["eval"]["base_metrics"].get(task, {}).get(key)
        shown = f"{100 * metrics[key]:.1f}%" if base is None else f"{100 * base:.1f}% -> {100 * metrics[key]:.1f}%"
        parts.append(f"{task} {key.split(',')[0]}{'/' + key.split(',')[1] if ',' in key else ''} {shown}")
    tps = result["train"].get("tokens_per_s") or 0.0
    return (f"[{result['status']}] {result['variant']} {result['scale']} lora-{'on' if result['lora'] else 'off'} "
            f"seed-{result['seed']}: " + " | ".join(parts) + f" | {tps:,.0f} tok/s | {cell_dir}")


def run_cell(cfg: DictConfig, cell_dir: Path, *, variant_name: str, cell: str, sweep: str) -> dict:
    """Run (or skip) one cell; returns ``{"status", "cell", "run_dir"}`` with status completed|failed|skipped|locked."""
    from posttrain.algorithms import registry

    from posttrain.models.distributed import setup_distributed
    from posttrain.models.engine import deepspeed_enabled

    outcome = {"cell": cell, "run_dir": str(cell_dir)}
    if deepspeed_enabled(cfg.deepspeed):  # ranks from Slurm/submitit, torchrun, or a single process
        setup_distributed()
    else:
        ranks = int(os.environ.get("WORLD_SIZE", "1") or 1)
        refusal = ranks_refusal(ranks, cfg.deepspeed, f"{ranks} processes (torchrun)")
        if refusal:
            raise UserError(refusal)
    try:
        algo = registry.get(str(cfg.algo.name))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    from posttrain.models.distributed import world_size
    from posttrain.rollout.vllm_backend import several_ranks_refusal

    refusal = several_ranks_refusal(generation_backend=str(cfg.data.get("generation_backend", "hf")),
                                    eval_backend=str(cfg.eval.get("backend", "hf")),
                                    online=algo.traits.reported == "online", ranks=world_size())
    if refusal:
        raise UserError(refusal)
    chash = config_hash(cfg)
    if is_done(cell_dir, chash):  # posttrain.cell: completed with the same config hash
        print(f"[skipped] {cell}: already completed (config {chash})", flush=True)
        return {**outcome, "status": "skipped"}
    recorded = completed_hash(cell_dir)
    if recorded is not None:  # completed under another config: kept aside, then run again
        archive = Path(f"{cell_dir}.{recorded or 'old'}")
        print(f"[rerun] {cell}: completed with config {recorded or None}, now {chash}; "
              f"keeping the old run as {archive.name}", flush=True)
        if archive.exists():
            shutil.rmtree(archive)
        shutil.copytree(cell_dir, archive)
        (cell_dir / results.RESULT_FILE).unlink()
    cell_dir.mkdir(parents=True, exist_ok=True)
    from posttrain.models.distributed import is_main_process

    if not is_main_process():  # rank > 0 of a DeepSpeed job: trains its shard, writes nothing
        return {**outcome, "status": _run_locked(cfg, algo, cell_dir, variant_name, cell, sweep, chash)}
    lock = FileLock(str(cell_dir / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"[locked] {cell}: running in another process; not started twice", flush=True)
        return {**outcome, "status": "locked"}
    try:
        with running(cell_dir):  # .running.json: status tells a live run from one killed without a record
            return {**outcome, "status": _run_locked(cfg, algo, cell_dir, variant_name, cell, sweep, chash)}
    finally:
        lock.release()


def _run_locked(cfg, algo, cell_dir: Path, variant_name: str, cell: str, sweep: str, chash: str) -> str:
    import torch

    from posttrain.tracker import NullTracker, make_tracker, result_summary

    threads = int(cfg.trainer.threads or available_cpus())
    torch.set_num_threads(threads)
    CACHE_EVENTS.clear()
    result = _empty_result(cfg, algo.meta(), variant_name, chash, _now())
    result["provenance"]["hardware"] = _hardware(threads)
    from posttrain.models.distributed import is_main_process

    main = is_main_process()
    tracker = NullTracker()
    interrupted = None
    try:
        tracker = NullTracker() if not main else make_tracker(  # id/group/config/summary: posttrain.tracker
            cfg.logger, sweep=sweep, cell=cell, run_dir=cell_dir, result=result)
        with cancellation():  # SIGTERM unwinds like Ctrl-C (posttrain.preemption), so both leave a record
            train_and_evaluate(cfg, algo, cell_dir, tracker, result)
        result["status"] = results.COMPLETED
    except BaseException as exc:  # noqa: BLE001 - every failure is recorded; interrupts re-raised below
        result["error"] = {"type": type(exc).__name__, "message": str(exc) or type(exc).__name__,
                           "traceback": traceback.format_exc()}
        if getattr(exc, "train_state", None) is not None and not result["train"].get("steps"):
            result["train"].update(train_record(exc.train_state))  # the steps done before it stopped
        if isinstance(exc, KeyboardInterrupt):  # Ctrl-C, or SIGTERM (preemption.Cancelled)
            result["status"] = results.CANCELLED
            result["error"]["message"] = f"{signal.Signals(signal_of(exc)).name} after {result['train']['steps']} steps"
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            interrupted = exc
    finally:
        result["provenance"]["finished"] = _now()
        result["provenance"]["cache_hits"] = dict(CACHE_EVENTS)
        if main:
            results.write_result(cell_dir, result)
    tracker.summary(result_summary(result))
    tracker.finish(failed=result["status"] != results.COMPLETED)
    if interrupted is not None:
        if main and result["status"] == results.CANCELLED:
            kept = cell_dir / "checkpoint"
            print(f"[cancelled] {cell}: {result['error']['message']}; "
                  + (f"checkpoint kept in {kept}, a relaunch resumes from it" if kept.exists() else "no checkpoint yet")
                  + f" ({cell_dir / results.RESULT_FILE})", file=sys.stderr, flush=True)
        raise interrupted
    if not main:
        return result["status"]
    if result["status"] == results.COMPLETED and not cfg.keep_checkpoints:
        shutil.rmtree(cell_dir / "checkpoint", ignore_errors=True)
    if result["status"] == results.COMPLETED:
        print(summary_line(result, cell_dir), flush=True)
    else:
        print(f"[failed] {cell}: {result['error']['type']}: {result['error']['message'].splitlines()[0]} "
              f"(details in {cell_dir / results.RESULT_FILE})", file=sys.stderr, flush=True)
    return result["status"]


def main(cfg: DictConfig) -> dict:
    """Hydra task function body: work out the cell from Hydra's runtime, then run it."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    # Before any model, data or tokenizer loads: the schema, and the algorithm's hyperparameters (in a dry run only
    # when overridden: hparams.validate imports torch, and the algorithms' own yaml files are tested valid).
    try:
        check_run_config(cfg, algo_too=not cfg.dry_run or any(override_key(o).startswith("algo.") for o in overrides))
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    if cfg.get("prepare") is not None:  # a scale's preparation job (posttrain.prepare), submitted by the launcher
        from posttrain.prepare import prepare_scale

        return prepare_scale(cfg)
    name, cell = cell_identity(cfg, overrides, hc)
    multirun = hc.mode == RunMode.MULTIRUN
    cell_dir = Path(hc.runtime.output_dir) if multirun else Path(hc.runtime.output_dir) / cell
    if cfg.dry_run:
        print(f"{cell}  {' '.join(overrides)}", flush=True)
        return {"status": "dry_run", "cell": cell, "run_dir": str(cell_dir)}
    from posttrain.models.kernels import refusal as liger_refusal

    problem = liger_refusal(cfg.trainer.get("liger", "auto"))  # before anything loads (not in a dry run: a CPU
    if problem:  # login node lists the cells of a GPU study)
        raise UserError(problem)
    return run_cell(cfg, cell_dir.resolve(), variant_name=name, cell=cell,
                    sweep=str(cfg.sweep_name) if multirun else "run")



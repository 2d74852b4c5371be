"""Shared fixtures: one session-scoped tiny base (built once, cached), a small self-play data block, helpers
to run ``launch.py`` as a user would, and skips for optional hardware (slurm, gpu)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Overrides that keep an end-to-end tiny run to seconds once the base is cached (documented in the README).
FAST = ["logger=none", "data.num_prompts=64", "trainer.max_steps=4", "eval.limit=20"]


def pytest_collection_modifyitems(config, items):
    import torch

    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs CUDA (no GPU on this machine)"))


@pytest.fixture(scope="session")
def tiny_base():
    """(model_dir, tokenizer_dir) of the tiny-s base: built once per cache root, then reused."""
    from omegaconf import OmegaConf

    from posttrain.models.tiny import ensure_tiny_base

    build = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/scale/tiny-s.yaml").build)
    return ensure_tiny_base(build)


def launch(args: list[str], cwd: Path, env: dict | None = None, check: bool = False,
           timeout: int = 900) -> subprocess.CompletedProcess:
    """Run ``python launch.py ARGS`` from ``cwd`` (outputs land under cwd/outputs)."""
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), *args, f"output_root={cwd}/outputs"],
                          cwd=cwd, env=full_env, text=True, capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"launch.py {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def qwen_like_char_tokenizer(directory: Path):
    """A character tokenizer laid out as Qwen2.5-Instruct's: eos ``<|im_end|>``, pad ``<|endoftext|>``."""
    from posttrain.data.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer(directory)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>", "<|endoftext|>"]})
    tok.eos_token, tok.pad_token = "<|im_end|>", "<|endoftext|>"
    return tok


def random_qwen2(vocab_size: int, seed: int = 0):
    """A randomly initialised 1-layer Qwen2 (hidden 32) for fast loop and rollout tests."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, intermediate_size=64,
                                        max_position_embeddings=128, tie_word_embeddings=True))


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


class Preempted(Exception):
    """Raised by :func:`cut_at`'s log callback: the run is killed during that step (after its last checkpoint)."""


def cut_at(step: int):
    """A ``train(log=...)`` callback that kills the run at optimizer step ``step`` (``pytest.raises(Preempted)``)."""
    def log(metrics, at):
        if at == step:
            raise Preempted
    return log


def spawn_ranks(script: str, out: Path, world_size: int, timeout: float) -> list[dict]:
    """Run ``python SCRIPT OUT`` as ``world_size`` ranks (the torch.distributed variables set as torchrun would, one
    torch thread each), logs in ``OUT/rank<r>.log``; a rank that fails or hangs fails the test with its log's tail.
    Returns each rank's ``OUT/rank<r>.json`` with its ``OUT/rank<r>.pt`` under ``weights``."""
    import torch

    from posttrain.models.distributed import free_port

    out.mkdir(parents=True, exist_ok=True)
    base = {k: v for k, v in os.environ.items()
            if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SUBMITIT_EXECUTOR")}
    base.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if world_size > 1:
        base.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world_size))
    procs = []
    for rank in range(world_size):
        env = dict(base, **({"RANK": str(rank), "LOCAL_RANK": str(rank)} if world_size > 1 else {}))
        log = open(out / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, script, str(out)], env=env, stdout=log,
                                       stderr=subprocess.STDOUT, cwd=ROOT), log))
    try:
        for proc, _ in procs:
            proc.wait(timeout=timeout)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()  # a hang: kill what this test started
            log.close()
    for rank, (proc, _) in enumerate(procs):
        if proc.returncode != 0:
            tail = (out / f"rank{rank}.log").read_text()[-4000:]
            raise AssertionError(f"rank {rank} of {world_size} exited {proc.returncode}:\n{tail}")
    return [json.loads((out / f"rank{r}.json").read_text()) | {"weights": torch.load(out / f"rank{r}.pt")}
            for r in range(world_size)]

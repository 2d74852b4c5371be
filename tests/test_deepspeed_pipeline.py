"""The whole pipeline on DeepSpeed: launch.py under torchrun with two CPU ranks (gloo, ZeRO-3) trains exactly as
the plain single-process path; both ranks evaluate (each its share of the documents), rank 0 alone reports and
writes result.json."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT, read_json

pytestmark = pytest.mark.slow
ARGS = ["logger=none", "data.num_prompts=64", "trainer.max_steps=4", "trainer.micro_batch_size=4",
        "trainer.grad_accum=2", "eval.limit=10"]


def _curve(tmp_path, deepspeed: str) -> dict:
    [path] = [p for p in (tmp_path / "outputs").rglob("result.json") if f"deepspeed={deepspeed}" in str(p)]
    return read_json(path)


def test_two_rank_zero3_run_equals_the_plain_run(tmp_path, tiny_base):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = f"output_root={tmp_path}/outputs"
    from posttrain.models.distributed import free_port

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port())]
    proc = subprocess.run([*torchrun, str(ROOT / "launch.py"), "deepspeed=zero3", *ARGS, out], cwd=tmp_path,
                          env=env, text=True, capture_output=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("[completed]") == 1, "one summary line: rank 0 alone reports"
    subprocess.run([sys.executable, str(ROOT / "launch.py"), "deepspeed=none", *ARGS, out], cwd=tmp_path,
                   env=env, text=True, capture_output=True, timeout=900, check=True)
    ds, plain = _curve(tmp_path, "zero3"), _curve(tmp_path, "none")
    assert ds["status"] == plain["status"] == "completed"
    assert ds["train"]["examples"] == plain["train"]["examples"] == 32
    for (s1, a), (s2, b) in zip(ds["train"]["loss_curve"], plain["train"]["loss_curve"]):
        assert s1 == s2 and a == pytest.approx(b, abs=1e-5)
    assert ds["metrics"]["synth_gsm8k"]["exact_match,strict-match"] == pytest.approx(
        plain["metrics"]["synth_gsm8k"]["exact_match,strict-match"])

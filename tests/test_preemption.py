"""Checkpoints for long runs: Slurm's requeue signal (USR2) checkpoints at the end of the step it arrives in and only
then reaches the handler that was there (submitit's requeue); a time interval checkpoints too. The resumed run equals
the uninterrupted one. (tests/test_slurm_pipeline.py sends the signal through the real local Slurm.)"""

from __future__ import annotations

import os
import signal

import pytest
import torch
from omegaconf import OmegaConf

from posttrain.algorithms import get
from posttrain.data.tokenizer import build_char_tokenizer
from posttrain.models.loading import Reference
from posttrain.preemption import Preemption
from posttrain.train import CHECKPOINT_FILE, train

from conftest import random_qwen2

SFT = [{"prompt": f"Question: {i}+{i}?\nAnswer:", "completion": f" {2 * i}\n#### {2 * i}"} for i in range(40)]


class Requeued(Exception):
    """What the previous handler (submitit's: requeue, exit) does in this test."""


def _trainer(**kw):
    base = dict(lr=1e-3, epochs=1, micro_batch_size=2, grad_accum=1, max_steps=None, warmup_ratio=0.1,
                schedule="cosine", betas=[0.9, 0.95], eps=1e-8, weight_decay=0.01, max_grad_norm=1.0,
                checkpoint_every=0, checkpoint_minutes=30, log_every=1)
    return OmegaConf.create({**base, **kw})


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_char_tokenizer(tmp_path_factory.mktemp("tok"))


def _run(tok, trainer, ckpt, log=None):
    model = random_qwen2(len(tok))
    state = train(model, Reference(None), tok, get("sft"), {}, SFT, trainer, max_length=48, seed=0, progress=False,
                  checkpoint_dir=ckpt, log=log)
    return model, state


def _signal_at(step: int):
    def log(metrics, at):
        if at == step:
            os.kill(os.getpid(), signal.SIGUSR2)  # Slurm's warning, in the middle of the epoch (20 steps)
    return log


def test_requeue_signal_checkpoints_that_step_then_requeues_and_the_resume_equals_the_full_run(tok, tmp_path):
    full_model, full = _run(tok, _trainer(), None)
    handed_over = []

    def submitit_like(signum, frame):
        handed_over.append(signum)
        raise Requeued

    previous = signal.signal(signal.SIGUSR2, submitit_like)
    try:
        with pytest.raises(Requeued):
            _run(tok, _trainer(), tmp_path, log=_signal_at(7))
        assert handed_over == [signal.SIGUSR2], "the previous handler got the signal, once, after the checkpoint"
        assert signal.getsignal(signal.SIGUSR2) is submitit_like, "the loop restored the handler it found"
        saved = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=False)
        assert saved["state"]["step"] == 7, "checkpointed at the step the signal came in, mid-epoch"
        resumed_model, resumed = _run(tok, _trainer(), tmp_path)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert resumed.resumed_from == 7 and resumed.step == full.step == 20
    assert [s for s, _ in resumed.loss_curve] == list(range(1, 21)), "one continuous loss curve"
    assert [v for _, v in resumed.loss_curve] == pytest.approx([v for _, v in full.loss_curve], abs=1e-6)
    for p, q in zip(full_model.parameters(), resumed_model.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_without_a_previous_handler_the_process_ends_as_the_signal_would_after_the_checkpoint(tok, tmp_path):
    previous = signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    try:
        with pytest.raises(SystemExit) as exit_info:
            _run(tok, _trainer(), tmp_path, log=_signal_at(3))
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert exit_info.value.code == 128 + signal.SIGUSR2
    assert torch.load(tmp_path / CHECKPOINT_FILE, weights_only=False)["state"]["step"] == 3


def test_time_interval_checkpoints_between_epoch_ends(tok, tmp_path):
    seen = []

    def log(metrics, at):
        if (tmp_path / CHECKPOINT_FILE).exists():
            seen.append(torch.load(tmp_path / CHECKPOINT_FILE, weights_only=False)["state"]["step"])
    _run(tok, _trainer(checkpoint_minutes=1e-9), tmp_path, log=log)  # due at every step boundary
    assert seen[:3] == [1, 2, 3], "a checkpoint at each step once the interval has passed"


def test_due_is_one_decision_over_ranks():
    p = Preemption(every_minutes=None)
    assert p.due(lambda v: v) == (False, False)
    assert p.due(lambda v: [1.0, 0.0]) == (True, True), "another rank got the signal: every rank stops"
    p.pending = (signal.SIGUSR2, None)
    assert p.due(lambda v: v) == (True, True)

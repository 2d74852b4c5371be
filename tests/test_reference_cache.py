"""Reference log-probs cached per scale (posttrain.algorithms.reference_cache): cached values equal the in-loop
reference forward, a run on them equals a run with a reference model, the cache key tracks what determines the
values, and only algorithms whose reference use the cache covers take it."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from posttrain import cache
from posttrain.algorithms import get, reference_cache
from posttrain.algorithms.reference_cache import CachedReference
from posttrain.data.collate import collate
from posttrain.data.tokenizer import build_char_tokenizer
from posttrain.models.loading import Reference
from posttrain.models.logps import token_logps
from posttrain.train import train

from conftest import random_qwen2, spawn_ranks

PAIRS = [{"prompt": f"Question: {i}+{i}?\nAnswer:", "chosen": f" {2 * i}\n#### {2 * i}" + " ok" * (i % 4),
          "rejected": f" {2 * i + 1}\n#### {2 * i + 1}"} for i in range(10)]
UNPAIRED = [{"prompt": p["prompt"], "completion": p[k], "desirable": k == "chosen"}
            for p in PAIRS for k in ("chosen", "rejected")]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return build_char_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture()
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    cache.CACHE_EVENTS.clear()
    return tmp_path / "cache"


def _trainer(**kw):
    return OmegaConf.create({**dict(lr=1e-3, epochs=2, micro_batch_size=4, grad_accum=1, max_steps=None,
                                    warmup_ratio=0.1, schedule="cosine", betas=[0.9, 0.95], eps=1e-8,
                                    weight_decay=0.01, max_grad_norm=1.0, checkpoint_every=0, log_every=1), **kw})


def _table(model, tok, kind, examples, *, max_length=64, batch_size=3):
    return reference_cache.reference_table(
        model, tok, kind, examples, model_id="random", tokenizer_id="char", load_dtype="torch.float32",
        precision="fp32", max_length=max_length, batch_size=batch_size, autocast=contextlib.nullcontext,
        progress=False)


def test_cached_reference_logps_equal_the_in_loop_reference_forward(tok, cache_root):
    model = random_qwen2(len(tok), seed=3).eval()
    table = _table(model, tok, "pairs", PAIRS)
    assert len(table) == 2 * len(PAIRS)
    batch = collate("pairs", tok, reference_cache.attach("pairs", PAIRS, table), 64)
    mask = batch["completion_mask"][:, 1:].float()
    with torch.no_grad():  # the loop's own reference computation (objectives.pairwise) on a batch of other rows
        fresh = (token_logps(model, batch["input_ids"], batch["attention_mask"], completion_mask=mask) * mask).sum(-1)
    assert batch["ref_seq_logps"].shape == fresh.shape
    torch.testing.assert_close(batch["ref_seq_logps"], fresh, atol=1e-5, rtol=1e-6)
    assert fresh.abs().min() > 1.0, "real log-probs, not zeros"


def test_a_run_on_cached_reference_logps_equals_a_run_with_the_reference_model(tok, cache_root):
    for algo, kind, examples in (("dpo", "pairs", PAIRS), ("bco_unpaired", "unpaired", UNPAIRED)):
        spec = get(algo)
        plain = random_qwen2(len(tok), seed=1)
        state_plain = train(plain, Reference(plain), tok, spec, {}, examples, _trainer(), max_length=64, seed=0,
                            progress=False)
        fast = random_qwen2(len(tok), seed=1)
        attached = reference_cache.attach(kind, examples, _table(fast, tok, kind, examples))
        state_fast = train(fast, CachedReference(), tok, spec, {}, attached, _trainer(), max_length=64, seed=0,
                           progress=False)
        assert len(state_fast.loss_curve) == len(state_plain.loss_curve) > 2
        for (_, a), (_, b) in zip(state_plain.loss_curve, state_fast.loss_curve):
            assert a == pytest.approx(b, abs=2e-5), algo
        for p, q in zip(plain.parameters(), fast.parameters()):
            torch.testing.assert_close(p, q, atol=1e-5, rtol=1e-4)


def test_the_cache_is_computed_once_and_keyed_by_what_determines_it(tok, cache_root):
    model = random_qwen2(len(tok), seed=3)
    first = _table(model, tok, "pairs", PAIRS)
    (key, hit), = cache.CACHE_EVENTS.items()
    assert key.startswith("reference_logps/") and hit is False
    cache.CACHE_EVENTS.clear()
    again = _table(random_qwen2(len(tok), seed=4), tok, "pairs", PAIRS)  # same key: read, not recomputed
    assert again == first and cache.CACHE_EVENTS == {key: True}
    cut = _table(model, tok, "pairs", PAIRS, max_length=24)  # truncation changes the values: another entry
    assert len(cache.CACHE_EVENTS) == 2 and cut != first
    fewer = _table(model, tok, "pairs", PAIRS[:5])
    assert len(cache.CACHE_EVENTS) == 3 and set(fewer) < set(first)
    assert all(fewer[k] == pytest.approx(first[k], abs=1e-5) for k in fewer), "batch composition only rounds"


def test_missing_rows_and_forwards_on_a_cached_reference_are_refused(tok, cache_root):
    table = _table(random_qwen2(len(tok)), tok, "pairs", PAIRS[:3])
    with pytest.raises(KeyError, match="no row"):
        reference_cache.attach("pairs", PAIRS, table)
    with pytest.raises(RuntimeError, match="per-scale cache"):
        CachedReference().active()
    assert "ref_seq_logps" not in collate("pairs", tok, PAIRS[:2], 64), "no cached values, no cached key"


@pytest.mark.parametrize("algo,hparams,cacheable", [
    ("dpo", {}, True), ("ipo", {}, True), ("bco_unpaired", {}, True), ("apo_zero_unpaired", {}, True),
    ("simpo", {}, False),  # reference-free
    ("kto", {}, False),  # z0 over mismatched rows drawn per step
    ("dpo", {"ld_alpha": 0.5}, False), ("dpo", {"ref_sync_steps": 4}, False),
    ("tdpo", {}, False), ("grpo", {}, False), ("sft", {}, False), ("spin", {}, False)])
def test_only_runs_whose_reference_use_the_cache_covers_take_it(algo, hparams, cacheable):
    assert get(algo).reference_cacheable(hparams) is cacheable


def _lock_worker(out: Path) -> None:
    """One rank of test_ranks_wait_for_another_job_s_build: the entry is being built by another job (the test holds
    the cache's lock); the ranks must wait it out and read that job's value."""
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    value = cache.cached_json_on_all_ranks("reference_logps", "held", lambda: {"built": "here"}, poll_s=0.2)
    (out / f"rank{rank}.json").write_text(json.dumps({"value": value, "events": cache.CACHE_EVENTS}))
    torch.save({}, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ranks_wait_for_another_job_s_build_without_hanging(cache_root, tmp_path):
    import threading

    from filelock import FileLock

    path = cache_root / "reference_logps" / "held.json"
    path.parent.mkdir(parents=True)
    lock = FileLock(str(path) + ".lock", thread_local=False)  # released by the thread below
    lock.acquire()

    def other_job():  # finishes its build 3 s after the ranks started waiting
        import time

        time.sleep(3)
        path.write_text(json.dumps({"built": "by the other job"}))
        lock.release()

    thread = threading.Thread(target=other_job)
    thread.start()
    ranks = spawn_ranks(__file__, tmp_path / "lock", 2, timeout=120)
    thread.join()
    for r in ranks:
        assert r["value"] == {"built": "by the other job"} and r["events"] == {"reference_logps/held": True}


def _two_rank_worker(out: Path) -> None:
    """One rank of test_ranks_share_the_reference_pass: the sharded pass on 5 rows, 2 per forward (rank 0: 2
    forwards, rank 1: 1 forward and 1 padding forward)."""
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    tok = build_char_tokenizer(out / f"tok{rank}")
    model = random_qwen2(len(tok), seed=3).eval()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    table = reference_cache.score_rows_on_all_ranks(model, tok, reference_cache.rows("pairs", PAIRS[:3])[:5],
                                                    max_length=64, batch_size=2, autocast=contextlib.nullcontext,
                                                    progress=False)
    (out / f"rank{rank}.json").write_text(json.dumps({"table": table, "forwards": len(calls)}))
    torch.save({}, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_ranks_share_the_reference_pass_and_all_get_the_whole_table(tok, tmp_path):
    ranks = spawn_ranks(__file__, tmp_path / "world2", 2, timeout=180)
    want = reference_cache.score_rows(random_qwen2(len(tok), seed=3).eval(), tok,
                                      reference_cache.rows("pairs", PAIRS[:3])[:5], max_length=64, batch_size=2,
                                      autocast=contextlib.nullcontext, progress=False)
    assert [r["forwards"] for r in ranks] == [2, 2], "every rank runs as many forwards (ZeRO-3 gathers in each)"
    for r in ranks:
        assert r["table"].keys() == want.keys()
        assert all(r["table"][k] == pytest.approx(want[k], abs=1e-5) for k in want)


if __name__ == "__main__":
    (_lock_worker if Path(sys.argv[1]).name == "lock" else _two_rank_worker)(Path(sys.argv[1]))

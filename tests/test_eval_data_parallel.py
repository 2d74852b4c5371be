"""Evaluation on all of a run's ranks (posttrain.evaluate.data_parallel): two CPU ranks (gloo) evaluating the tiny
base through lm-eval give rank 0 the single-process metrics, each rank running only its share of the documents;
the base-score cache is built by the ranks together and read back by all of them; few-shot prompts of a sharded
task are the single-process prompts (lm-eval's own sharding draws other few-shot examples).

The worker half of this file runs as ``python tests/test_eval_data_parallel.py OUT`` once per rank
(conftest.spawn_ranks), so no process group leaks into the pytest process.
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

LIMIT = 7  # uneven over two ranks: documents 0, 2, 4, 6 on rank 0 and 1, 3, 5 on rank 1 (lm-eval pads rank 1)
EVAL = {"tasks": ["synth_gsm8k", "synth_mc"], "num_fewshot": 0, "apply_chat_template": False, "limit": LIMIT,
        "batch_size": 4, "max_gen_toks": 48}
WORKER_TIMEOUT = 600


def _record_requests(seen: dict) -> None:
    """Instrument lm-eval's HFLM (and so DataParallelHFLM) to record which documents this rank's model ran."""
    from lm_eval.models.huggingface import HFLM

    for name in ("generate_until", "loglikelihood"):
        method = getattr(HFLM, name)

        def recording(self, requests, *args, _method=method, **kwargs):
            for req in requests:
                seen[req.task_name].add(req.doc_id)
            return _method(self, requests, *args, **kwargs)

        setattr(HFLM, name, recording)


def worker(out: Path) -> None:
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM

    from posttrain.cache import CACHE_EVENTS, cache_root
    from posttrain.cache import cached_json_on_all_ranks
    from posttrain.evaluate.harness import evaluate
    from posttrain.models.distributed import setup_distributed
    from posttrain.models.loading import load_tokenizer

    torch.set_num_threads(1)
    info = setup_distributed()
    setup = json.loads((out.parent / "setup.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(setup["model"])
    tokenizer = load_tokenizer(setup["tokenizer"])
    cfg = OmegaConf.create(EVAL)
    seen: dict = defaultdict(set)
    _record_requests(seen)
    generation: dict = {}
    start = time.perf_counter()
    metrics = evaluate(model, tokenizer, cfg, seed=1234, generation=generation)
    seconds = time.perf_counter() - start
    counted = {task: sorted(docs) for task, docs in seen.items()}
    seen.clear()
    key = f"world{info.world_size}"
    built = cached_json_on_all_ranks("dp_scores", key, lambda: evaluate(model, tokenizer, cfg, seed=1234))
    events = dict(CACHE_EVENTS)
    written = json.loads((cache_root() / "dp_scores" / f"{key}.json").read_text())
    seen.clear()
    again = cached_json_on_all_ranks("dp_scores", key, lambda: evaluate(model, tokenizer, cfg, seed=1234))
    result = {"rank": info.rank, "world_size": info.world_size, "metrics": metrics, "generation": generation,
              "seconds": seconds, "docs": counted, "cached": built, "cached_again": again, "cache_file": written,
              "first_event": events, "second_event": dict(CACHE_EVENTS), "after_cache_docs": len(seen)}
    (out / f"rank{info.rank}.json").write_text(json.dumps(result))
    torch.save({}, out / f"rank{info.rank}.pt")  # conftest.spawn_ranks reads one per rank


@pytest.fixture(scope="module")
def runs(tiny_base, tmp_path_factory, monkeypatch_module):
    from conftest import spawn_ranks

    root = tmp_path_factory.mktemp("eval_dp")
    model_dir, tok_dir = tiny_base
    (root / "setup.json").write_text(json.dumps({"model": str(model_dir), "tokenizer": str(tok_dir)}))
    monkeypatch_module.setenv("POSTTRAIN_CACHE", str(root / "cache"))  # the ranks' dp_scores cache: this test's
    return {world: spawn_ranks(__file__, root / f"world{world}", world, WORKER_TIMEOUT) for world in (1, 2)}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.mark.slow
def test_rank0_of_two_gets_the_single_process_metrics(runs):
    [single], (rank0, rank1) = runs[1], runs[2]
    print(f"\nevaluate(): 1 process {single['seconds']:.1f}s; 2 ranks {rank0['seconds']:.1f}s / "
          f"{rank1['seconds']:.1f}s")
    assert set(rank0["metrics"]) == {"synth_gsm8k", "synth_mc"}
    for task, metrics in single["metrics"].items():
        for name, value in metrics.items():
            if name.startswith(("exact_match", "acc")) and "stderr" not in name:  # 0/1 per document: exact
                assert rank0["metrics"][task][name] == value, (task, name)
            else:
                assert rank0["metrics"][task][name] == pytest.approx(value, rel=1e-9, abs=1e-12), (task, name)
    assert rank0["generation"] == single["generation"]
    assert rank1["metrics"] == {} and rank1["generation"] == {}, "rank 1 hands its values to rank 0"


@pytest.mark.slow
def test_each_rank_ran_only_its_share_of_the_documents(runs):
    [single], ranks = runs[1], runs[2]
    everything = list(range(LIMIT))
    assert single["docs"] == {"synth_gsm8k": everything, "synth_mc": everything}
    for rank, result in enumerate(ranks):
        share = [doc for doc in everything if doc % 2 == rank]
        assert result["docs"] == {"synth_gsm8k": share, "synth_mc": share}


@pytest.mark.slow
def test_base_scores_are_built_by_all_ranks_once_and_read_back_by_every_rank(runs):
    [single], ranks = runs[1], runs[2]
    for result in ranks:
        assert result["cached"] == result["cached_again"] == ranks[0]["metrics"], "every rank gets rank 0's scores"
        assert result["cache_file"] == ranks[0]["metrics"], "rank 0 wrote the file"
        assert result["first_event"]["dp_scores/world2"] is False, "built (posttrain.cache.CACHE_EVENTS)"
        assert result["second_event"]["dp_scores/world2"] is True, "read back"
        assert result["after_cache_docs"] == 0, "the second call reads the file: no model call on any rank"
    assert single["cached"] == single["metrics"]


def _task_manager_args(source: str, tmp_path: Path) -> dict:
    """TaskManager arguments as posttrain.evaluate.harness builds them: the embedded tasks, or lm-eval's own gsm8k
    reading a local mirror (tests/study_mirror.py)."""
    from posttrain.evaluate import lm_eval_tasks
    from posttrain.evaluate.harness import embedded_task_dir

    if source == "synth_gsm8k":
        return {"include_path": [str(embedded_task_dir(48))], "include_defaults": False}
    from study_mirror import write_study_datasets

    write_study_datasets(tmp_path / "mirror", rows=LIMIT)
    dirs = lm_eval_tasks.index_dirs(["gsm8k"])
    leaves = lm_eval_tasks.leaf_tasks(["gsm8k"], lm_eval_tasks.build_index(dirs))
    lm_eval_tasks.write_mirror_overrides(leaves, str(tmp_path / "mirror"), tmp_path)
    return {"include_path": [*map(str, dirs or []), str(tmp_path)], "include_defaults": dirs is None}


@pytest.mark.parametrize(("source", "shots"), [("synth_gsm8k", 3), ("gsm8k", 8)])
def test_sharded_tasks_keep_the_single_process_few_shot_prompts(tmp_path, monkeypatch, source, shots):
    """lm-eval draws random few-shot examples from one generator advanced document by document (gsm8k's 8 shots
    too): building only a rank's documents changes them. ShardedTaskManager's tasks build every prompt, then keep
    the rank's share."""
    from lm_eval.tasks import TaskManager

    from posttrain.evaluate.data_parallel import ShardedTaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    args = _task_manager_args(source, tmp_path)

    def prompts(manager_class, rank: int, world_size: int) -> dict[int, str]:
        [task] = manager_class(**args).load([source])["tasks"].values()
        task.set_config(key="num_fewshot", value=shots)
        task.set_fewshot_seed(seed=1234)
        task.build_all_requests(limit=LIMIT, rank=rank, world_size=world_size)
        return {inst.doc_id: inst.args[0] for inst in task.instances}

    one = prompts(TaskManager, 0, 1)
    assert sorted(one) == list(range(LIMIT)) and one[0].count("Question:") == shots + 1, "the shots + the question"
    shares = [prompts(ShardedTaskManager, rank, 2) for rank in (0, 1)]
    assert sorted(shares[0]) == [0, 2, 4, 6] and sorted(shares[1]) == [1, 3, 5]
    assert {**shares[0], **shares[1]} == one
    plain_rank1 = prompts(TaskManager, 1, 2)  # lm-eval's own split: same documents, other few-shot examples
    assert sorted(plain_rank1) == [1, 3, 5] and plain_rank1 != {doc: one[doc] for doc in (1, 3, 5)}


def test_a_task_with_fewer_documents_than_ranks_is_refused_in_one_line(tmp_path):
    from posttrain.evaluate.data_parallel import ShardedTaskManager

    [task] = ShardedTaskManager(**_task_manager_args("synth_gsm8k", tmp_path)).load(["synth_gsm8k"])["tasks"].values()
    with pytest.raises(ValueError, match=r"task synth_gsm8k has 1 document\(s\) for 2 ranks: raise eval.limit"):
        task.build_all_requests(limit=1, rank=1, world_size=2)


def test_a_limit_below_the_rank_count_evaluates_on_rank_0_alone():
    from posttrain.evaluate.data_parallel import eval_world_size

    assert eval_world_size(None) == eval_world_size(7) == 1  # no process group here: one process
    assert eval_world_size(None, ranks=8) == eval_world_size(8, ranks=8) == eval_world_size(0.5, ranks=8) == 8
    assert eval_world_size(7, ranks=8) == eval_world_size(1.0, ranks=2) == eval_world_size(1, ranks=2) == 1


if __name__ == "__main__":
    worker(Path(sys.argv[1]))

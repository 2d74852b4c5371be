"""End-to-end runs of launch.py on the tiny scale, as a user runs them: result.json, relaunch rules, failures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import FAST, launch, read_json
from posttrain.results import ALGO_META_KEYS, EVAL_KEYS, PROVENANCE_KEYS, REQUIRED_KEYS, TRAIN_KEYS

pytestmark = pytest.mark.slow
CELL = Path("outputs/run/dpo@data.num_prompts=64,eval.limit=20,trainer.max_steps=4/tiny-s/lora-off/seed-0")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_base):
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="module")
def first_run(workdir):
    proc = launch(FAST, workdir, check=True)
    return proc, workdir / CELL


def test_default_run_writes_a_complete_result(first_run):
    proc, cell = first_run
    result = read_json(cell / "result.json")
    assert set(REQUIRED_KEYS) <= set(result) and result["status"] == "completed" and result["error"] is None
    assert (result["algo"], result["scale"], result["seed"], result["lora"]) == ("dpo", "tiny-s", 0, False)
    assert result["variant"] == CELL.parts[2]
    assert set(ALGO_META_KEYS) <= set(result["algo_meta"])
    assert result["algo_meta"] == {"family": "pairwise", "category": "vanilla", "reference_free": False,
                                   "length_normalized": False}
    assert set(EVAL_KEYS) <= set(result["eval"]) and result["eval"]["limit"] == 20
    assert result["eval"]["num_fewshot"] == 0 and result["eval"]["chat_template"] is False
    assert set(TRAIN_KEYS) <= set(result["train"]) and set(PROVENANCE_KEYS) <= set(result["provenance"])
    for task in ("synth_gsm8k", "synth_math", "synth_mc"):
        assert task in result["metrics"] and task in result["eval"]["base_metrics"]
    for key in ("exact_match,strict-match", "exact_match,flexible-extract", "exact_match_stderr,strict-match"):
        assert 0.0 <= result["metrics"]["synth_gsm8k"][key] <= 1.0
    assert "acc_norm,none" in result["metrics"]["synth_mc"]
    train = result["train"]
    assert train["steps"] == 4 and train["examples"] == 32 and len(train["loss_curve"]) == 4
    assert [s for s, _ in train["loss_curve"]] == [1, 2, 3, 4] and train["tokens_per_s"] > 0
    assert train["reference_forwards"] == 0 and train["reference_cache"] is True, \
        "DPO reads its reference log-probs from the per-scale cache: no reference forward in the loop"
    assert train["shared_prompt"] is True, "pairs run behind one prompt copy (sdpa attention: trainer.shared_prompt=auto)"
    hits = result["provenance"]["cache_hits"]
    assert [k for k in hits if k.startswith("reference_logps/")], "the cache entry is recorded in the provenance"
    assert result["config"]["algo"]["beta"] == 0.1 and result["provenance"]["versions"]["torch"]
    assert "[completed] dpo@" in proc.stdout and "synth_gsm8k exact_match/strict-match" in proc.stdout
    assert not (cell / "checkpoint").exists(), "checkpoints are removed once the run completed"


def test_relaunch_skips_a_completed_cell_and_reruns_a_failed_one(first_run, workdir):
    _, cell = first_run
    before = read_json(cell / "result.json")
    proc = launch(FAST, workdir, check=True)
    assert "[skipped]" in proc.stdout and "already completed" in proc.stdout
    assert read_json(cell / "result.json") == before
    failed = dict(before, status="failed", error={"type": "X", "message": "boom", "traceback": ""})
    (cell / "result.json").write_text(json.dumps(failed))
    proc = launch(FAST, workdir, check=True)
    assert "[completed]" in proc.stdout
    assert read_json(cell / "result.json")["status"] == "completed"


def test_completed_cell_with_another_config_hash_is_archived_not_overwritten(first_run, workdir):
    _, cell = first_run
    result = read_json(cell / "result.json")
    result["config_hash"] = "0123456789ab"
    (cell / "result.json").write_text(json.dumps(result))
    launch(FAST, workdir, check=True)
    archive = cell.parent / "seed-0.0123456789ab"
    assert read_json(archive / "result.json")["config_hash"] == "0123456789ab"
    assert read_json(cell / "result.json")["config_hash"] != "0123456789ab"
    from posttrain.results import iter_results

    assert [p.parent.name for p, _ in iter_results(workdir / "outputs/run")] == ["seed-0"], "readers skip archives"


def test_unloadable_model_fails_cleanly_and_other_cells_still_run(workdir):
    proc = launch(["-m", "scale.model=/nonexistent/model,null", *FAST], workdir)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "[failed]" in proc.stderr
    manifest = read_json(workdir / "outputs/grid/sweep.json")
    bad_cell = next(c for c in manifest["cells"] if "_nonexistent_model" in c["cell"])
    assert len(bad_cell["cell"].split("/")[0]) <= 80, "long variants end in a short hash"
    bad = read_json(Path(bad_cell["run_dir"]) / "result.json")
    assert bad["status"] == "failed" and bad["error"]["type"] == "ModelLoadError"
    assert "tiny scale" in bad["error"]["message"] and "local dir" in bad["error"]["message"]
    assert bad["metrics"] == {} and bad["train"]["steps"] == 0
    assert len(manifest["cells"]) == 2 and all(c["job_id"] is None for c in manifest["cells"])
    good = next(c for c in manifest["cells"] if c is not bad_cell)
    assert "scale.model" not in good["cell"], "scale.model=null is tiny-s's default: it names no variant"
    assert read_json(Path(good["run_dir"]) / "result.json")["status"] == "completed"
    assert "1 completed, 1 failed" in proc.stdout
    again = launch(["-m", "scale.model=/nonexistent/model,null", *FAST], workdir)
    assert again.returncode == 1 and "1 skipped" in again.stdout and "1 failed" in again.stdout


@pytest.mark.parametrize("algo,refs", [("simpo", 0), ("kto", 4), ("sft", 0), ("gold_sft", 0)])
def test_algorithms_of_every_family_run_and_reference_free_ones_never_call_a_reference(workdir, algo, refs):
    launch([f"algo={algo}", *FAST], workdir, check=True)
    cell = next((workdir / "outputs/run").glob(f"{algo}@*/tiny-s/lora-off/seed-0"))
    result = read_json(cell / "result.json")
    assert result["status"] == "completed" and result["train"]["reference_forwards"] == refs
    assert result["train"]["reference_cache"] is False
    assert result["train"]["examples"] == 32


def test_without_the_reference_cache_dpo_runs_its_reference_and_trains_the_same(first_run, workdir):
    (workdir / "nocache").mkdir()
    launch(["trainer.reference_cache=false", *FAST], workdir / "nocache", check=True)
    result = read_json(workdir / "nocache" / CELL / "result.json")
    cached = read_json(first_run[1] / "result.json")
    assert result["config_hash"] == cached["config_hash"], "the cache is not part of a cell's identity"
    assert result["train"]["reference_forwards"] == 4 and result["train"]["reference_cache"] is False
    for (_, a), (_, b) in zip(result["train"]["loss_curve"], cached["train"]["loss_curve"]):
        assert a == pytest.approx(b, abs=1e-4)


def test_sft_and_gold_sft_train_on_the_same_number_of_examples(workdir):
    sizes = {a: read_json(next((workdir / "outputs/run").glob(f"{a}@*/tiny-s/lora-off/seed-0")) / "result.json")
             ["train"]["dataset_size"] for a in ("sft", "gold_sft")}
    assert sizes["sft"] == sizes["gold_sft"] > 0


def test_lora_run_uses_the_adapter_disabled_base_as_reference(workdir):
    launch(["lora=on", *FAST], workdir, check=True)
    result = read_json(workdir / "outputs/run" / CELL.parts[2] / "tiny-s/lora-on/seed-0/result.json")
    assert result["status"] == "completed" and result["lora"] is True
    assert result["train"]["reference_cache"] is True and result["config"]["lora"]["r"] == 16
    # LoRA at init is the identity: the first DPO step sees zero margin, loss log(2) (the cached reference
    # log-probs of the base equal the policy's own)
    assert abs(result["train"]["loss_curve"][0][1] - 0.693147) < 1e-4


def test_local_model_directory_goes_through_the_real_loading_path(workdir, tiny_base):
    model_dir, tok_dir = tiny_base
    args = [f"scale.model={model_dir}", f"scale.tokenizer={tok_dir}", *FAST]
    launch(args, workdir, check=True)
    result = next(p for p in (workdir / "outputs/run").rglob("result.json") if "scale.model=" in str(p))
    assert read_json(result)["status"] == "completed"


def test_tokenizer_that_does_not_round_trip_is_refused_clearly(workdir, tiny_base, tmp_path):
    model_dir, tok_dir = tiny_base
    together = tmp_path / "model_with_tokenizer"
    shutil.copytree(model_dir, together)
    for f in Path(tok_dir).iterdir():
        shutil.copy(f, together / f.name)
    from posttrain.models.loading import ModelLoadError, load_tokenizer

    with pytest.raises(ModelLoadError, match="does not round-trip") as info:
        load_tokenizer(str(together))
    assert "scale.tokenizer" in str(info.value) and "Qwen2Tokenizer" in str(info.value)
    proc = launch([f"scale.model={together}", *FAST], workdir)
    assert proc.returncode == 1 and "does not round-trip" in proc.stderr and "Traceback" not in proc.stderr


def test_gsm8k_format_training_file_goes_through_the_real_data_path(workdir, tmp_path):
    from posttrain.data import synth

    path = tmp_path / "gsm8k_train.jsonl"
    path.write_text("".join(json.dumps(p.to_json()) + "\n" for p in synth.problems("train", 64, seed=7)))
    launch(["data.source=gsm8k", f"data.path={path}", *FAST], workdir, check=True)
    result = next(p for p in (workdir / "outputs/run").rglob("result.json") if "data.source=gsm8k" in str(p)
                  or "data.path" in str(p))
    data = read_json(result)
    assert data["status"] == "completed" and data["config"]["data"]["source"] == "gsm8k"
    assert data["train"]["dataset_size"] > 0


def test_a_cell_locked_by_another_launch_is_not_run_twice(workdir):
    from filelock import FileLock

    args = ["algo=sft", "seed=7", *FAST]
    cell = workdir / "outputs/run" / CELL.parts[2].replace("dpo@", "sft@") / "tiny-s/lora-off/seed-7"
    cell.mkdir(parents=True)
    with FileLock(str(cell / ".lock")):
        proc = launch(args, workdir, check=True)
    assert "[locked]" in proc.stdout and "not started twice" in proc.stdout
    assert not (cell / "result.json").exists()


def test_preparation_loads_the_base_once_when_lora_and_full_fine_tuning_load_it_alike(first_run, monkeypatch, capsys):
    """The scale's preparation job (what the Slurm launcher submits; here in process, after the first run filled the
    cache): fp32 loads the base in the same dtype for LoRA on and off, so one load serves both."""
    import posttrain.prepare as prepare
    from rehearsal_assets import compose_config

    loads = []
    real = prepare.load_base
    monkeypatch.setattr(prepare, "load_base", lambda cfg, **kw: loads.append(kw["lora"]) or real(cfg, **kw))
    cfg = compose_config(["algo=dpo", *FAST, "+prepare={algos:[dpo],lora:[false,true]}"])
    summary = prepare.prepare_scale(cfg)
    assert loads == [False], "one load for both LoRA settings"
    assert summary["lora"] == [False, True] and summary["reference_cached"] == ["pairs"]
    assert summary["built"] == [], "the first run already built the scale's data and reference log-probs"
    assert "[prepared] tiny-s" in capsys.readouterr().out

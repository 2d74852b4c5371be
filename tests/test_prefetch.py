"""The mirror and ``python -m posttrain.sweep prefetch``: with the hub unreachable it lists exactly what the cells
need (one line each, exit 1) and never hangs or prints a traceback; a complete mirror exits 0; runs read the
mirror's copies (models through ``model_location``, GSM8K train through ``load_gsm8k``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import ROOT
from posttrain import mirror as layout
from posttrain.data.gsm8k import load_gsm8k
from posttrain.evaluate import math_runtime
from posttrain.sweep.cells import config_hash
from posttrain.sweep.prefetch import Need, fetch_dataset, prefetch
from study_mirror import STUDY_DATASETS, write_study_datasets

MODELS = [f"Qwen/Qwen2.5-{s}-Instruct" for s in ("0.5B", "1.5B", "3B", "7B")]
RUNTIME = f"{math_runtime.DIST}=={math_runtime.VERSION}"


def _offline(monkeypatch, cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("POSTTRAIN_CACHE", str(cache))
    monkeypatch.delenv("POSTTRAIN_MIRROR", raising=False)


def _run(args):
    lines: list[str] = []
    return prefetch(args, out=lines.append), lines


def _fake_model(mirror, model_id):
    where = layout.model_dir(mirror, model_id)
    where.mkdir(parents=True)
    (where / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (where / "tokenizer_config.json").write_text("{}")


def test_hub_unreachable_lists_exactly_the_studys_needs_one_line_each(tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path / "cache")
    mirror = tmp_path / "mirror"
    code, lines = _run(["sweep=paper", f"mirror={mirror}"])
    assert code == 1
    missing = [line for line in lines if line.startswith("missing")]
    assert len(missing) == len(lines) - 1 == 4 + len(STUDY_DATASETS) + 1
    idents = [line.split("  -> ")[0].split(None, 2)[2] for line in missing]
    datasets = [f"{path} ({name or 'default'})" for path, name, _ in STUDY_DATASETS]
    assert sorted(idents) == sorted(MODELS + datasets + [RUNTIME])
    for model in MODELS:  # what, which id, where it should go, who needs it
        line = next(line for line in missing if f" {model} " in line)
        assert f"-> {mirror}/models/{model}/" in line and "(for scale " in line
    gsm8k = next(line for line in missing if "openai/gsm8k (main)" in line)
    assert f"{mirror}/datasets/openai/gsm8k/main/{{train.jsonl,test.jsonl}}" in gsm8k
    assert "self-play prompts" in gsm8k and "lm-eval gsm8k" in gsm8k
    arc = next(line for line in missing if "allenai/ai2_arc" in line)
    assert "{train.jsonl,validation.jsonl,test.jsonl}" in arc
    assert lines[-1].startswith(f"{len(missing)} of {len(missing)} needs of 220 cells missing from {mirror}")
    assert "HF_HUB_OFFLINE" in lines[-1]


def test_a_complete_mirror_exits_zero_and_the_runtime_is_copied_from_the_cache(tmp_path, monkeypatch):
    cached = math_runtime.ensure()  # the real runtime (PyPI once per machine), in the test session's cache
    _offline(monkeypatch, cached.parents[1])
    mirror = tmp_path / "mirror"
    write_study_datasets(mirror)
    for model in MODELS:
        _fake_model(mirror, model)
    code, lines = _run(["sweep=paper", f"mirror={mirror}"])
    assert code == 0, lines
    assert lines[0].startswith(f"fetched  python    {RUNTIME}") and f"copied from {cached}" in lines[0]
    assert math_runtime.installed(layout.python_dir(mirror, math_runtime.DIST, math_runtime.VERSION))
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "empty-cache"))  # the mirror alone is enough now
    monkeypatch.setenv("POSTTRAIN_MIRROR", str(mirror))
    code, lines = _run(["sweep=paper"])
    assert code == 0 and lines == [f"mirror {mirror} holds everything 220 cells need (4 models, 11 datasets, "
                                   f"1 python runtimes)"]
    assert math_runtime.locate(str(mirror)) == layout.python_dir(mirror, math_runtime.DIST, math_runtime.VERSION)


def test_cli_grid_with_ranges_and_local_model_directories(tmp_path, monkeypatch):
    _offline(monkeypatch, tmp_path / "cache")
    local = tmp_path / "my-qwen"
    local.mkdir()
    code, lines = _run(["algo=dpo,simpo", "scale=0.5b,7b", "seed=0-4", f"mirror={tmp_path / 'm'}"])
    assert code == 1 and "needs of 20 cells" in lines[-1]
    assert sum(line.startswith("missing  model") for line in lines) == 2
    # a local directory given as scale.model is used as is: nothing to fetch for it; a wrong path is named
    code, lines = _run(["scale=0.5b", f"scale.model={local}", "eval.tasks=[synth_gsm8k]", "eval.num_fewshot=0",
                        "data.path=" + str(tmp_path / "nope.jsonl"), f"mirror={tmp_path / 'm'}"])
    assert code == 1 and len(lines) == 2
    assert lines[0].startswith("missing  dataset") and "nope.jsonl" in lines[0] and "does not exist" in lines[0]


def test_embedded_cells_need_nothing_and_usage_errors_are_one_line(tmp_path, monkeypatch, capsys):
    _offline(monkeypatch, tmp_path / "cache")
    code, lines = _run(["algo=dpo,sft", f"mirror={tmp_path}"])
    assert code == 0 and lines == ["nothing to fetch: the 2 cells use embedded models and tasks only"]
    assert _run(["scale=0.5b"])[0] == 2
    assert capsys.readouterr().err.strip() == ("error: prefetch needs a mirror directory: give mirror=DIR or set "
                                               "POSTTRAIN_MIRROR")
    assert _run(["seed=4-0", f"mirror={tmp_path}"])[0] == 2
    assert "reversed range" in capsys.readouterr().err
    assert _run(["sweep=nope", f"mirror={tmp_path}"])[0] == 2
    assert "unknown sweep 'nope'" in capsys.readouterr().err
    assert _run(["scale=0.5b", "eval.tasks=[gsm8kx]", f"mirror={tmp_path}"])[0] == 2
    err = capsys.readouterr().err
    assert "gsm8kx" in err and err.count("\n") == 1 and "Traceback" not in err


def test_an_unreachable_hub_is_one_failed_attempt_not_a_hang_or_a_traceback(tmp_path):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "POSTTRAIN_CACHE": str(tmp_path / "cache")}
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "POSTTRAIN_MIRROR"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "posttrain.sweep", "prefetch", "algo=dpo", "scale=1.5b",
                           f"mirror={tmp_path / 'm'}"], cwd=ROOT, env=env, text=True, capture_output=True,
                          timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    out = proc.stdout.strip().splitlines()
    assert len(out) == 1 + 1 + 11 + 1  # model, datasets (gsm8k + 7 MATH + 3), runtime, summary
    assert "a download failed" in out[-1] and "Connection" in out[-1]
    assert not any(p.name.startswith(".") for p in (tmp_path / "m").rglob("*"))  # no partial download left


def test_fetch_writes_each_split_as_jsonl_in_the_datasets_own_schema(tmp_path, monkeypatch):
    # a dataset repository as the hub serves it (a README declaring its configs), read by datasets.load_dataset
    repo = tmp_path / "hub" / "allenai" / "ai2_arc"
    source = tmp_path / "source"
    write_study_datasets(source, rows=2)
    shutil.copytree(source / "datasets/allenai/ai2_arc/ARC-Challenge", repo / "ARC-Challenge")
    repo.joinpath("README.md").write_text(
        "---\nconfigs:\n- config_name: ARC-Challenge\n  data_files:\n"
        + "".join(f"  - split: {s}\n    path: ARC-Challenge/{s}.jsonl\n" for s in ("train", "validation", "test"))
        + "---\n")
    monkeypatch.chdir(tmp_path / "hub")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    mirror = tmp_path / "mirror"
    need = Need("dataset", "allenai/ai2_arc (ARC-Challenge)", layout.dataset_dir(mirror, "allenai/ai2_arc",
                "ARC-Challenge"), path="allenai/ai2_arc", name="ARC-Challenge", splits=["train", "test"],
                mirror=str(mirror))
    fetch_dataset(need, str(mirror))
    assert need.present()
    for split in ("train", "test"):
        got = [json.loads(line) for line in layout.split_file(mirror, "allenai/ai2_arc", "ARC-Challenge", split)
               .read_text().splitlines()]
        want = [json.loads(line) for line in (repo / f"ARC-Challenge/{split}.jsonl").read_text().splitlines()]
        assert got == want


def test_model_location_prefers_local_directories_then_the_mirror(tmp_path):
    mirror = tmp_path / "mirror"
    assert layout.model_location("Qwen/Qwen2.5-0.5B-Instruct", None) == "Qwen/Qwen2.5-0.5B-Instruct"
    assert layout.model_location("Qwen/Qwen2.5-0.5B-Instruct", str(mirror)) == "Qwen/Qwen2.5-0.5B-Instruct"
    _fake_model(mirror, "Qwen/Qwen2.5-0.5B-Instruct")
    assert layout.model_location("Qwen/Qwen2.5-0.5B-Instruct", str(mirror)) == \
        str(mirror / "models/Qwen/Qwen2.5-0.5B-Instruct")
    local = tmp_path / "Qwen" / "Qwen2.5-0.5B-Instruct"
    local.mkdir(parents=True)
    assert layout.model_location(str(local), str(mirror)) == str(local)
    with pytest.raises(ValueError, match="cannot name a mirror entry"):
        layout.model_dir(mirror, "../escape")
    assert layout.model_missing("Qwen/Qwen2.5-7B-Instruct", str(mirror)).startswith(
        f"model 'Qwen/Qwen2.5-7B-Instruct': not in the mirror (expected {mirror}/models/Qwen/Qwen2.5-7B-Instruct/) "
        "and the hub is offline; run `python -m posttrain.sweep prefetch`")


def test_gsm8k_train_comes_from_the_mirror_and_its_absence_offline_is_one_line(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    write_study_datasets(mirror, rows=3)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    problems = load_gsm8k("openai/gsm8k", "train", mirror=str(mirror))
    assert len(problems) == 10 and problems[0].answer == "12" and problems[0].prompt.startswith("Question: [train 0]")
    shutil.rmtree(mirror / "datasets/openai")
    with pytest.raises(layout.MirrorMissing) as info:
        load_gsm8k("openai/gsm8k", "train", mirror=str(mirror))
    assert str(info.value) == (f"GSM8K training prompts needs dataset openai/gsm8k (main) split 'train': expected "
                               f"{mirror}/datasets/openai/gsm8k/main/train.jsonl (run `python -m posttrain.sweep "
                               f"prefetch` where the hub is reachable)")


def test_the_mirror_location_does_not_change_the_config_hash():
    a = OmegaConf.create({"algo": {"name": "dpo"}, "mirror": "/a"})
    b = OmegaConf.create({"algo": {"name": "dpo"}, "mirror": None})
    assert config_hash(a) == config_hash(b)

"""Bad input on the real path: each one clear line naming the fix, the cell failed, the rest of the grid running,
nothing completed lost (a model id that cannot be had offline, a tokenizer that cannot end a completion, a precision
that cannot run)."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from conftest import FAST, launch, read_json
from posttrain.models.loading import ModelLoadError, load_tokenizer, resolve_model_paths
from posttrain.models.precision import Precision, PrecisionError


def test_a_hub_id_offline_and_not_in_the_mirror_is_one_line_naming_prefetch(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty HF cache
    scale = OmegaConf.create({"name": "0.5b", "model": "Qwen/Qwen2.5-0.5B-Instruct", "tokenizer": None})
    with pytest.raises(ModelLoadError) as err:
        resolve_model_paths(scale, str(tmp_path / "mirror"))
    line = str(err.value)
    assert "\n" not in line and "hub is offline" in line and "python -m posttrain.sweep prefetch" in line
    assert str(tmp_path / "mirror" / "models" / "Qwen" / "Qwen2.5-0.5B-Instruct") in line
    # a local directory is used as it is, the mirror's copy by its hub id when it holds one
    (tmp_path / "mirror/models/Qwen/Qwen2.5-0.5B-Instruct").mkdir(parents=True)
    for name in ("config.json", "tokenizer_config.json"):
        (tmp_path / "mirror/models/Qwen/Qwen2.5-0.5B-Instruct" / name).write_text("{}")
    model, tokenizer = resolve_model_paths(scale, str(tmp_path / "mirror"))
    assert model == tokenizer == str(tmp_path / "mirror/models/Qwen/Qwen2.5-0.5B-Instruct")


def test_a_tokenizer_without_an_eos_token_is_refused_with_the_fix(tmp_path, tiny_base):
    _, tok_dir = tiny_base
    broken = tmp_path / "tok"
    broken.mkdir()
    for f in tok_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    config = json.loads((broken / "tokenizer_config.json").read_text())
    config["eos_token"] = None
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="has no EOS token: completions could not end"):
        load_tokenizer(str(broken))


def test_a_precision_the_engine_cannot_do_is_one_line():
    with pytest.raises(PrecisionError) as err:
        Precision.from_config("bf16-pure", deepspeed=True)
    assert "\n" not in str(err.value) and "use bf16-mixed" in str(err.value)


@pytest.mark.slow
def test_a_bad_cell_fails_with_one_line_while_the_rest_of_the_grid_completes(tmp_path, tiny_base):
    proc = launch(["-m", "algo=sft", "scale=tiny-s", "scale.model=Org/not-mirrored,null", *FAST], tmp_path,
                  env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    failed = [line for line in proc.stderr.splitlines() if line.startswith("[failed]")]
    assert len(failed) == 1 and "'Org/not-mirrored'" in failed[0] and "prefetch" in failed[0], proc.stderr
    assert "Traceback" not in proc.stderr
    results = {p.parent.parent.parent.parent.name: read_json(p) for p in (tmp_path / "outputs").rglob("result.json")}
    statuses = sorted(r["status"] for r in results.values())
    assert statuses == ["completed", "failed"], statuses

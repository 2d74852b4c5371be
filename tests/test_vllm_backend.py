"""vLLM as an optional backend (posttrain.rollout.vllm_backend; docs/real-scales.md, "vLLM (optional)").

What runs on a CPU: the configuration reaches the REAL ``vllm.SamplingParams`` unchanged (vllm 0.33's wheel,
installed without its CUDA dependencies by ``scripts/setup.sh --dev``; skipped where vllm is not importable), it
agrees field by field with what the HF path samples with, vLLM's outputs become the same Rollouts the HF path makes,
the hf default leaves every config hash and self-play cache key as it was, and asking for vllm where it cannot run
is one line and exit 2 before anything loads. Generating with a vLLM engine needs a CUDA GPU: not tested here."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, launch, qwen_like_char_tokenizer, random_qwen2
from hydra import compose, initialize_config_dir
from transformers import GenerationConfig

from posttrain import cell as identity
from posttrain.config_schema import ConfigError, check_backends, check_value
from posttrain.data.selfplay import (LM_EVAL_GSM8K_UNTIL, _selfplay_key, generation_backend, make_examples,
                                     sampling_config, selfplay_record)
from posttrain.evaluate.harness import eval_backend
from posttrain.rollout import SamplingConfig, sampling_record, stop_ids
from posttrain.rollout import vllm_backend
from posttrain.rollout.groups import _backend
from posttrain.rollout.sampler import finish

IM_END, ENDOFTEXT = "<|im_end|>", "<|endoftext|>"
HAS_VLLM = importlib.util.find_spec("vllm") is not None
#: Where scripts/setup.sh --dev puts vllm's package, outside this Python's site-packages (see there why).
VLLM_SITE = Path(os.environ.get("POSTTRAIN_VLLM_SITE", Path.home() / ".cache/posttrain/vllm-site"))
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vllm not importable here: "
                                "test_the_vllm_tests_pass_against_vllms_own_package runs these with it")


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return qwen_like_char_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def qwen_like(tok):
    """A random Qwen2 whose generation config names both EOS ids and Qwen's sampling defaults."""
    model = random_qwen2(len(tok))
    model.generation_config = GenerationConfig(
        eos_token_id=[tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(ENDOFTEXT)],
        pad_token_id=tok.pad_token_id, do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# the configuration reaches vLLM's SamplingParams unchanged

@needs_vllm
def test_the_composed_config_reaches_vllms_sampling_params_unchanged(tok, qwen_like):
    cfg = _compose(["scale=0.5b", "data.generation_backend=vllm", "data.temperature=0.7", "data.top_p=0.9",
                    "data.samples_per_prompt=8", "data.max_new_tokens=77", "data.seed=5"])
    sampling = sampling_config(cfg.data)
    assert sampling.backend == "vllm"
    stops = stop_ids(qwen_like, tok)
    assert stops == [tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(ENDOFTEXT)]  # Qwen has two
    params = vllm_backend.sampling_params(sampling, stops, seed=int(cfg.data.seed))
    from vllm import SamplingParams

    assert type(params) is SamplingParams
    expected = dict(n=8, temperature=0.7, top_p=0.9, top_k=0, min_p=0.0, max_tokens=77, min_tokens=0, seed=5,
                    stop=list(LM_EVAL_GSM8K_UNTIL), stop_token_ids=stops, include_stop_str_in_output=False,
                    ignore_eos=False, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                    skip_special_tokens=True, detokenize=True, logprobs=None)
    assert {k: getattr(params, k) for k in expected} == expected
    # none of the model's own defaults (Qwen: temperature 0.7 comes from the config here, top_k 20, rep. 1.05) leak in
    assert params.top_k != qwen_like.generation_config.top_k
    assert params.repetition_penalty != qwen_like.generation_config.repetition_penalty


@needs_vllm
def test_hf_and_vllm_sample_with_the_same_settings(tok, qwen_like):
    cfg = SamplingConfig(num_samples=4, temperature=0.9, top_p=0.95, top_k=7, max_new_tokens=33,
                         stop_strings=("Question:",))
    stops = stop_ids(qwen_like, tok)
    hf = sampling_record(cfg, stops, tok.pad_token_id)
    vl = vllm_backend.sampling_params(cfg, stops, seed=0)
    assert (vl.n, vl.temperature, vl.top_p, vl.top_k, vl.max_tokens, vl.stop_token_ids, vl.stop,
            vl.repetition_penalty) == (hf["num_samples"], hf["temperature"], hf["top_p"], hf["top_k"],
                                       hf["max_new_tokens"], hf["eos_token_id"], hf["stop_strings"],
                                       hf["repetition_penalty"])


@needs_vllm
def test_greedy_is_greedy_and_every_sample_gets_its_own_seed(tok, qwen_like):
    from vllm.sampling_params import SamplingType

    stops = stop_ids(qwen_like, tok)
    greedy = vllm_backend.sampling_params(SamplingConfig(temperature=0.0, max_new_tokens=9), stops)
    assert greedy.sampling_type == SamplingType.GREEDY and greedy.temperature == 0.0 and greedy.seed is None
    params = vllm_backend.prompt_params(SamplingConfig(num_samples=8), stops, seed=5, n_prompts=3)
    assert [p.seed for p in params] == [5, 13, 21]  # vLLM gives sample j of prompt i seed + 8 i + j: all distinct


@needs_vllm
def test_vllm_outputs_become_the_rollouts_the_hf_path_makes(tok):
    from vllm.outputs import CompletionOutput, RequestOutput

    stops = [tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(ENDOFTEXT)]
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos_row = ids("12 #### 3") + [stops[0]] + ids("after")
    stop_row = ids("7 #### 7\n\nQuestion: next")
    long_row = ids("no end in sight")
    completions = [CompletionOutput(2, "", long_row, None, None, finish_reason="length"),
                   CompletionOutput(0, "", eos_row, None, None, finish_reason="stop"),
                   CompletionOutput(1, "", stop_row, None, None, finish_reason="stop", stop_reason="Question:")]
    output = RequestOutput("r0", "Q", ids("Q"), None, completions, finished=True)
    [rollout] = vllm_backend.rollouts(tok, ["Q"], [output], stops, ("Question:",))
    hf = [finish(tok, row, stops, None, ("Question:",)) for row in (eos_row, stop_row, long_row)]
    assert rollout.completion_ids == [h[0] for h in hf] and rollout.completions == [h[1] for h in hf]
    assert rollout.completions == ["12 #### 3", "7 #### 7\n\n", "no end in sight"]
    assert rollout.completion_ids[0][-1] == stops[0]  # the stop token is kept, nothing after it
    assert rollout.truncated == [False, False, True]


# ---------------------------------------------------------------------------------------------------------------------
# the engine's arguments (no engine is built: that needs CUDA)

def test_engine_arguments_follow_the_run(monkeypatch):
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    model = random_qwen2(40)
    kwargs = vllm_backend.engine_kwargs(model, seed=3)
    assert kwargs["dtype"] == "float32" and kwargs["seed"] == 3 and "enable_lora" not in kwargs
    assert "distributed_executor_backend" not in kwargs  # no process group
    import os

    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"  # in this process: the weights go in directly
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16-mixed: float32 weights, bf16 compute
        assert vllm_backend.engine_kwargs(model)["dtype"] == "bfloat16"
    assert vllm_backend.engine_kwargs(model, dtype=torch.bfloat16)["dtype"] == "bfloat16"
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(random_qwen2(40), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    kwargs = vllm_backend.engine_kwargs(lora)
    assert kwargs["enable_lora"] is True and kwargs["max_lora_rank"] == 4


def test_the_engine_loads_the_directory_the_model_came_from(tmp_path):
    model = random_qwen2(40)
    with pytest.raises(ValueError, match="names none"):
        vllm_backend.model_dir(model)
    model.save_pretrained(tmp_path / "m")
    from transformers import AutoModelForCausalLM

    assert vllm_backend.model_dir(AutoModelForCausalLM.from_pretrained(tmp_path / "m")) == str(tmp_path / "m")
    names = [name for name, _ in vllm_backend.named_weights(model)]
    assert names == [name for name, _ in model.named_parameters()] and "model.embed_tokens.weight" in names


def test_importing_posttrain_never_imports_vllm():
    code = ("import sys; import posttrain.run, posttrain.rollout.vllm_backend, posttrain.evaluate.harness, "
            "posttrain.data.selfplay, posttrain.rollout.groups, posttrain.config_schema; print('vllm' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == "False", proc.stderr


# ---------------------------------------------------------------------------------------------------------------------
# the hf default changes nothing; vllm is recorded where it changes the result

def test_the_hf_default_keeps_every_hash_and_vllm_changes_it():
    default = identity.config_hash(_compose([]))
    assert default == "d4ce6c6d3e88"  # tests/test_cell_identity.py's pinned hash of the default cell
    assert identity.config_hash(_compose(["data.generation_backend=hf", "eval.backend=hf"])) == default
    data = identity.config_hash(_compose(["data.generation_backend=vllm"]))
    evaluation = identity.config_hash(_compose(["eval.backend=vllm"]))
    assert len({default, data, evaluation}) == 3
    assert identity.config_hash(_compose(["algo=grpo", "scale=0.5b", "lora=on"])) == "6f7db9bb510e"


def test_the_selfplay_key_names_the_backend_only_when_it_is_vllm(tok, qwen_like):
    hf_cfg, vllm_cfg = (_compose([f"data.generation_backend={b}"]).data for b in ("hf", "vllm"))
    stops = stop_ids(qwen_like, tok)
    hf = selfplay_record(sampling_config(hf_cfg), stops, tok.pad_token_id)
    assert hf == sampling_record(sampling_config(hf_cfg), stops, tok.pad_token_id)  # as before: same cache key
    assert selfplay_record(sampling_config(hf_cfg), stops, tok.pad_token_id, "bf16-mixed") == \
        {**hf, "precision": "bf16-mixed"}
    vl = selfplay_record(sampling_config(vllm_cfg), stops, tok.pad_token_id)
    assert vl == {**hf, "backend": "vllm"}
    assert _selfplay_key("m", hf_cfg, hf) != _selfplay_key("m", vllm_cfg, vl)


def test_online_examples_carry_the_backend_to_the_rollouts():
    records = [{"prompt": "Q1", "answer": "1", "gold": " 1 #### 1", "samples": ["#### 1", "#### 2"],
                "correct": [True, False]}]
    assert make_examples(records, "prompts", generation_backend="hf") == make_examples(records, "prompts")
    examples = make_examples(records, "prompts", generation_backend="vllm")
    assert examples == [{"prompt": "Q1", "answer": "1", "generation_backend": "vllm"}]
    assert _backend(examples, [0]) == "vllm" and _backend(make_examples(records, "prompts"), [0]) == "hf"
    assert make_examples(records, "gold", generation_backend="vllm")[0]["generation_backend"] == "vllm"
    assert "generation_backend" not in make_examples(records, "pairs", generation_backend="vllm")[0]
    assert generation_backend(_compose([]).data) == "hf" and eval_backend(_compose([]).eval) == "hf"


# ---------------------------------------------------------------------------------------------------------------------
# asking for vllm where it cannot run: one line, exit 2, nothing loaded

def test_a_bad_backend_name_is_one_line():
    with pytest.raises(ConfigError, match=r"^data.generation_backend=vlm: must be one of hf, vllm$"):
        check_value("data.generation_backend", "vlm")
    with pytest.raises(ValueError, match="unknown data.generation_backend 'vlm'"):
        generation_backend({"generation_backend": "vlm"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="vllm can run on this machine")
@pytest.mark.parametrize("key", ["data.generation_backend", "eval.backend"])
def test_vllm_where_it_cannot_run_is_one_line(key):
    group, _, leaf = key.partition(".")
    with pytest.raises(ConfigError) as info:
        check_backends({group: {leaf: "vllm"}})
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{key}=vllm") and message.endswith(f"set {key}=hf")
    assert ("needs a CUDA GPU" if HAS_VLLM else "pip install vllm") in message
    check_backends({"data": {"generation_backend": "hf"}, "eval": {"backend": "hf"}})  # hf: nothing to check


@pytest.mark.skipif(torch.cuda.is_available(), reason="vllm can run on this machine")
def test_launching_with_vllm_here_exits_2_before_anything_loads(tmp_path):
    cache = tmp_path / "cache"
    proc = launch(["data.generation_backend=vllm", "logger=none"], tmp_path, env={"POSTTRAIN_CACHE": str(cache)},
                  timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: data.generation_backend=vllm"), proc.stderr
    assert "Traceback" not in proc.stderr and not cache.exists() and not (tmp_path / "outputs").exists()


def test_a_dry_run_lists_vllm_cells_without_needing_vllm(tmp_path):
    proc = launch(["-m", "data.generation_backend=vllm", "dry_run=true", "logger=none"], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "dpo@data.generation_backend=vllm/tiny-s/lora-off/seed-0" in proc.stdout


@pytest.mark.skipif(HAS_VLLM, reason="vllm is importable here: the tests above ran against it directly")
def test_the_vllm_tests_pass_against_vllms_own_package():
    """The tests marked ``needs_vllm``, in a subprocess with vllm 0.33's package on its path (scripts/setup.sh --dev):
    they must all run and pass, so the check that our config reaches vLLM's SamplingParams runs in CI."""
    if not (VLLM_SITE / ".complete").exists():
        pytest.fail(f"vllm's package is missing from {VLLM_SITE}: run bash scripts/setup.sh --dev")
    names = [name for name, fn in globals().items() if name.startswith("test_")
             and any(m.name == "skipif" and m.args == (not HAS_VLLM,) for m in getattr(fn, "pytestmark", []))]
    assert len(names) >= 4, names
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(VLLM_SITE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                           " or ".join(names)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and f"{len(names)} passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_runs_on_several_ranks_that_would_build_an_engine_are_refused_in_one_line():
    refuse = vllm_backend.several_ranks_refusal
    assert refuse(generation_backend="vllm", eval_backend="hf", online=True, ranks=8).startswith("8 ranks: vllm")
    assert refuse(generation_backend="hf", eval_backend="vllm", online=False, ranks=2) is not None
    assert refuse(generation_backend="vllm", eval_backend="hf", online=False, ranks=8) is None, \
        "offline: self-play comes from the preparation job's cache"
    assert refuse(generation_backend="vllm", eval_backend="vllm", online=True, ranks=1) is None
    assert "\n" not in vllm_backend.SEVERAL_RANKS

"""The real study's path rehearsed on CPU, one cell per real scale name, as a user runs it (``launch.py``).

Each cell uses a random-init model of that scale's published Qwen2.5-Instruct architecture cut to 2 layers (real
widths, heads, vocabulary, tied or untied embeddings, bf16 on disk, the hub's generation config with its two EOS ids
and sampling defaults), a byte-level BPE tokenizer with Qwen's special tokens and chat template, a GSM8K-format
training file, and a mirror holding a few rows of every study dataset in its real schema, with the hub offline
(tests/rehearsal_assets.py, tests/study_mirror.py). Self-play goes through the real sampler with a scripted answer
source (a random model never answers right, so it would yield no pairs); training runs the real scale's settings
(bf16-mixed, micro-batch 1, the study's optimiser; fewer steps); evaluation runs the study profile through lm-eval's
own task definitions (gsm8k strict/flexible, minerva_math with lm-eval's own scoring, arc_challenge, hellaswag,
winogrande) from the mirror. 0.5b loads its model from the mirror by its hub id; 7b runs with its study default,
LoRA, on ZeRO-3 over 2 CPU ranks.

What this cannot show (README, "Real scales"): that the models learn, GPU speed and memory, NCCL.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import rehearsal_assets as ra
from conftest import ROOT, read_json
from study_mirror import write_study_datasets

pytestmark = pytest.mark.slow

STUDY_TASKS = {"gsm8k", "minerva_math", "arc_challenge", "hellaswag", "winogrande"}
#: What every rehearsal cell shares: the study's data path with short prompts and generations (CPU budget).
COMMON = ["logger=none", "trainer.max_steps=1", "trainer.grad_accum=2", "data.fewshot=2",
          "data.samples_per_prompt=6", "eval.limit=1", "eval.max_gen_toks=8", "eval.batch_size=4"]
#: Per scale: the algorithm and what differs (the 8-shot/4-shot study prompts at 0.5b, 1-shot above to fit CPU time).
CELLS = {
    "0.5b": ["algo=kto", "trainer.grad_accum=4"],
    "1.5b": ["algo=dpo", "eval.num_fewshot={gsm8k:1,minerva_math:1,arc_challenge:0,hellaswag:0,winogrande:0}",
             "eval.base_scores=false"],
    "3b": ["algo=sgrpo", "algo.num_samples=2", "algo.max_new_tokens=6",
           "eval.num_fewshot={gsm8k:1,minerva_math:1,arc_challenge:0,hellaswag:0,winogrande:0}",
           "eval.base_scores=false"],
    "7b": ["algo=dpo", "eval.num_fewshot={gsm8k:1,minerva_math:1,arc_challenge:0,hellaswag:0,winogrande:0}",
           "eval.base_scores=false"],
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tokenizer, GSM8K file and a mirror with every study dataset (models are built per test: one in memory)."""
    from posttrain.cache import cache_root

    root = tmp_path_factory.mktemp("rehearsal")
    assets = cache_root() / "rehearsal-assets"
    mirror = root / "mirror"
    write_study_datasets(mirror, rows=3)
    gsm8k = ra.write_gsm8k_train(root / "gsm8k_train.jsonl", n=8)
    return {"root": root, "assets": assets, "mirror": mirror, "gsm8k": gsm8k,
            "tokenizer": ra.build_tokenizer(assets / "tokenizer")}


def _overrides(world, scale: str, model: str | None) -> list[str]:
    out = [f"scale={scale}", f"data.path={world['gsm8k']}", f"mirror={world['mirror']}", *COMMON, *CELLS[scale]]
    return out + ([f"scale.model={model}"] if model else [])


def _env() -> dict:
    """The hub is unreachable for the runs: everything comes from local directories and the mirror."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HYDRA_FULL_ERROR": "0"}


def _launch(world, overrides: list[str], ranks: int = 1) -> subprocess.CompletedProcess:
    out = f"output_root={world['root']}/outputs"
    prefix = [sys.executable]
    env = _env()
    if ranks > 1:
        from posttrain.models.distributed import free_port

        prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
                  "--master_port", str(free_port())]
        env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([*prefix, str(ROOT / "launch.py"), *overrides, out], cwd=world["root"], env=env, text=True,
                          capture_output=True, timeout=1800)


def _cell(world, scale: str, model: str | None, *, ranks: int = 1) -> dict:
    overrides = _overrides(world, scale, model)
    cfg = ra.compose_config(overrides)
    if cfg.algo.name != "sgrpo":  # online methods sample for themselves
        from posttrain.mirror import model_location

        where = model or model_location(str(cfg.scale.model), str(world["mirror"]))
        # the cache is keyed by the configured id (the hub id for a mirrored model) and the run's precision
        ra.scripted_selfplay(where, cfg.data, base_id=str(cfg.scale.model), precision=str(cfg.trainer.precision))
    proc = _launch(world, overrides, ranks)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
    assert proc.stdout.count("[completed]") == 1, proc.stdout[-3000:]
    [path] = list((world["root"] / "outputs/run").rglob(f"*/{scale}/*/seed-0/result.json"))
    result = read_json(path)
    _assert_study_cell(result, scale)
    return result


def _assert_study_cell(result: dict, scale: str) -> None:
    assert result["status"] == "completed" and result["error"] is None
    assert result["scale"] == scale
    assert result["train"]["steps"] == 1 and result["train"]["precision"]["name"] == "bf16-mixed"
    assert result["train"]["precision"]["master_weights"] == "float32"
    assert result["config"]["trainer"]["micro_batch_size"] == 1, "the real scales' micro-batch"
    metrics = result["metrics"]
    assert STUDY_TASKS <= set(metrics), sorted(metrics)
    assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(metrics["gsm8k"])
    assert "exact_match,none" in metrics["minerva_math"], metrics["minerva_math"]
    assert {"acc,none", "acc_norm,none"} <= set(metrics["arc_challenge"]) and "acc,none" in metrics["winogrande"]
    generation = result["eval"]["generation"]
    assert generation and all(kw.get("max_gen_toks") == 8 for kw in generation.values()), generation
    assert result["eval"]["model_generation_config"]["repetition_penalty"] == 1.05, "what HF generate adds: recorded"


def test_0_5b_kto_from_the_mirror_by_hub_id_with_the_study_prompts(world):
    """0.5b: the model comes from the mirror by its hub id (no scale.model), KTO at micro-batch 1, the full study
    profile (gsm8k 8-shot, minerva_math 4-shot) with base scores, self-play with the stop tokens and yield."""
    model = ra.build_model("0.5b", world["assets"] / "0.5b", world["tokenizer"])
    target = world["mirror"] / "models" / ra.QWEN25["0.5b"]["hf_id"]
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        target.symlink_to(model, target_is_directory=True)
    result = _cell(world, "0.5b", None)
    assert result["config"]["eval"]["num_fewshot"]["gsm8k"] == 8 and result["config"]["eval"]["num_fewshot"][
        "minerva_math"] == 4
    assert set(result["eval"]["base_metrics"]) >= STUDY_TASKS
    data = result["data"]
    assert data["prompt_format"] == "fewshot" and data["pairs"] >= 1
    assert sorted(data["sampling"]["eos_token_id"]) == [151643, 151645], "both of Qwen's EOS ids stop a sample"
    assert data["sampling"]["repetition_penalty"] == 1.0 and data["sampling"]["top_k"] == 0, "only as configured"


def test_1_5b_dpo_full_fine_tuning(world):
    model = ra.build_model("1.5b", world["assets"] / "1.5b", world["tokenizer"])
    result = _cell(world, "1.5b", str(model))
    assert result["lora"] is False and result["train"]["reference_cache"] is True
    assert result["train"]["shared_prompt"] is True  # bf16-mixed, micro-batch 1, pad = an EOS: one row per pair
    assert any(k.startswith("reference_logps/") for k in result["provenance"]["cache_hits"])


def test_3b_sgrpo_rolls_out_and_trains_on_zero3(world):
    model = ra.build_model("3b", world["assets"] / "3b", world["tokenizer"])
    result = _cell(world, "3b", str(model))
    assert result["train"]["reward_curve"], "a rollout was scored"


def test_7b_with_its_study_default_lora_on_zero3_over_two_ranks(world):
    model = ra.build_model("7b", world["assets"] / "7b", world["tokenizer"])
    result = _cell(world, "7b", str(model), ranks=2)
    assert result["lora"] is True, "7b trains with LoRA by default, as the study"
    assert result["config"]["deepspeed"]["stage"] == 3
    # DeepSpeed's bf16 mode, as on the GPUs: bf16 module (adapters included), float32 master copy in its optimizer
    assert result["train"]["precision"]["engine_mixing"] == "deepspeed_bf16"
    assert result["train"]["precision"]["trainable_weights"] == ["bfloat16"]
    assert result["train"]["shared_prompt"] is True  # packed pairs through ZeRO-3's partitioned head (plain path)

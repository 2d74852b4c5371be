"""The rehearsal assets (tests/rehearsal_assets.py): Qwen2.5-Instruct architectures cut to 2 layers load through the
project's real loader with their published widths, the locally built BPE tokenizer behaves as Qwen's (probe,
special ids, pad = an EOS, chat template), a GSM8K-format file loads, and scripted answers go through the real
self-play path into a cache the run then hits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import rehearsal_assets as ra
from conftest import ROOT

QWEN_CHAT = ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
             "<|im_start|>user\nWhat is 3*4?<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture(scope="session")
def assets_root() -> Path:
    """Built assets are reused across sessions under the cache root (7b alone is ~3 GB)."""
    from posttrain.cache import cache_root

    return cache_root() / "rehearsal-assets"


@pytest.fixture(scope="session")
def tokenizer_dir(assets_root) -> Path:
    return ra.build_tokenizer(assets_root / "tokenizer")


@pytest.fixture(scope="session")
def model_05b(assets_root, tokenizer_dir) -> Path:
    return ra.build_model("0.5b", assets_root / "0.5b", tokenizer_dir)


def scale_cfg(scale: str, model_dir: Path):
    return OmegaConf.merge(OmegaConf.load(ROOT / f"conf/scale/{scale}.yaml"), {"model": str(model_dir)})


def expected_parameters(arch: dict, layers: int) -> int:
    """Parameter count of a Qwen2 from its published widths (q/k/v carry biases, o_proj and the MLP do not)."""
    h, i, v = arch["hidden_size"], arch["intermediate_size"], arch["vocab_size"]
    kv = arch["num_key_value_heads"] * h // arch["num_attention_heads"]
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h
    return v * h * (1 if arch["tie_word_embeddings"] else 2) + layers * layer + h


def test_published_architectures_are_recorded():
    assert {s: (a["hidden_size"], a["intermediate_size"], a["num_attention_heads"], a["num_key_value_heads"],
                a["vocab_size"], a["tie_word_embeddings"]) for s, a in ra.QWEN25.items()} == {
        "0.5b": (896, 4864, 14, 2, 151936, True), "1.5b": (1536, 8960, 12, 2, 151936, True),
        "3b": (2048, 11008, 16, 2, 151936, True), "7b": (3584, 18944, 28, 4, 152064, False)}
    for scale in ra.QWEN25:  # the scale configs name the same models
        assert OmegaConf.load(ROOT / f"conf/scale/{scale}.yaml").model == ra.QWEN25[scale]["hf_id"]
    # at full depth the widths give Qwen2.5's published sizes (0.49B, 7.61B); cut to 2 layers, 7b still holds
    # 1.56B parameters (3.1 GB in bf16), most of it the two untied 152064 x 3584 embeddings
    assert expected_parameters(ra.QWEN25["0.5b"], ra.QWEN25["0.5b"]["layers"]) == 494_032_768
    assert expected_parameters(ra.QWEN25["7b"], ra.QWEN25["7b"]["layers"]) == 7_615_616_512
    assert expected_parameters(ra.QWEN25["7b"], 2) == 1_556_113_920


def test_tokenizer_is_laid_out_as_qwen25(tokenizer_dir):
    from tokenizers import Tokenizer

    from posttrain.models.loading import PROBE, load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))  # raises unless PROBE round-trips
    assert type(tok).__name__ == "Qwen2Tokenizer" and len(tok) == 151665
    assert [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|file_sep|>")] \
        == [151643, 151644, 151645, 151664]
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id, tok.bos_token) \
        == ("<|im_end|>", 151645, "<|endoftext|>", 151643, None)
    assert tok.pad_token_id in ra.GENERATION_CONFIG["eos_token_id"]
    learned = json.loads((tokenizer_dir / "rehearsal.json").read_text())["learned_vocab"]
    assert 256 < learned <= ra.BPE_VOCAB
    core = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))  # the trained pipeline itself
    for text in [PROBE, *ra.ROUND_TRIP_TEXTS]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids == core.encode(text, add_special_tokens=False).ids
        assert max(ids) < learned and len(ids) < len(text.encode())  # merges are used, bytes are the fallback
        assert tok.decode(ids, clean_up_tokenization_spaces=False) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 3*4?"}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == QWEN_CHAT
    ids = tok(chat, add_special_tokens=False)["input_ids"]
    assert ids[0] == 151644 and ids.count(151644) == 3 and ids.count(151645) == 2  # special tokens stay whole
    assert tok.decode(ids, skip_special_tokens=True).startswith("system\nYou are Qwen")
    # a random model emits ids past the tokenizer (151665..151935), as Qwen's: they decode to nothing
    assert tok.decode([151700, 151935]) == ""


def test_model_dir_reloads_the_same_tokenizer(model_05b, tokenizer_dir):
    """transformers reloads a tokenizer saved beside a Qwen2 model as Qwen2Tokenizer: here that is the same one."""
    from transformers import AutoTokenizer

    beside, alone = AutoTokenizer.from_pretrained(model_05b), AutoTokenizer.from_pretrained(tokenizer_dir)
    for text in [QWEN_CHAT + " 3*4 = <<3*4=12>>12\n#### 12<|im_end|>", *ra.ROUND_TRIP_TEXTS]:
        assert beside(text)["input_ids"] == alone(text)["input_ids"]
    assert beside.chat_template == alone.chat_template == ra.CHAT_TEMPLATE


@pytest.mark.parametrize("scale", ["0.5b", "1.5b", "3b", pytest.param("7b", marks=pytest.mark.slow)])
def test_built_model_loads_with_the_published_architecture(scale, assets_root, tokenizer_dir):
    from safetensors import safe_open

    from posttrain.models.loading import load_policy

    model_dir = ra.build_model(scale, assets_root / scale, tokenizer_dir, layers=2)
    arch = ra.QWEN25[scale]
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as handle:
        names = list(handle.keys())
        assert {handle.get_slice(n).get_dtype() for n in names} == {"BF16"}
    assert ("lm_head.weight" in names) == (not arch["tie_word_embeddings"])

    loaded = load_policy(scale_cfg(scale, model_dir), OmegaConf.create({"enabled": False}))
    model, config = loaded.model, loaded.model.config
    assert loaded.model_id == str(model_dir) and loaded.tokenizer_id == str(model_dir)
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads, config.num_key_value_heads,
            config.vocab_size, config.num_hidden_layers, config.tie_word_embeddings) == (
        arch["hidden_size"], arch["intermediate_size"], arch["num_attention_heads"], arch["num_key_value_heads"],
        arch["vocab_size"], 2, arch["tie_word_embeddings"])
    assert config.rope_parameters["rope_theta"] == 1e6 and config.max_position_embeddings == 32768
    assert config.rms_norm_eps == 1e-6 and (config.bos_token_id, config.eos_token_id) == (151643, 151645)
    assert len(model.model.layers) == 2 and model.get_output_embeddings().weight.shape == (arch["vocab_size"],
                                                                                           arch["hidden_size"])
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert tied == arch["tie_word_embeddings"]
    assert json.loads((model_dir / "config.json").read_text())["torch_dtype"] == "bfloat16"  # as the hub's
    assert sum(p.numel() for p in model.parameters()) == expected_parameters(arch, 2)
    gen = model.generation_config
    assert (list(gen.eos_token_id), gen.pad_token_id, gen.do_sample, gen.repetition_penalty, gen.temperature,
            gen.top_p, gen.top_k) == ([151645, 151643], 151643, True, 1.05, 0.7, 0.8, 20)
    assert loaded.tokenizer.pad_token_id == 151643 and loaded.tokenizer.padding_side == "left"
    with torch.no_grad():
        logits = model(**loaded.tokenizer(["#### 12"], return_tensors="pt")).logits
    assert logits.shape[-1] == arch["vocab_size"] and torch.isfinite(logits).all()


def test_build_model_reuses_what_is_built(model_05b, tokenizer_dir):
    before = (model_05b / "model.safetensors").stat().st_mtime_ns
    assert ra.build_model("0.5b", model_05b, tokenizer_dir) == model_05b
    assert (model_05b / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="unknown scale '14b'; known"):
        ra.build_model("14b", model_05b.parent / "14b", tokenizer_dir)


def test_gsm8k_train_file_loads_through_load_gsm8k(tmp_path):
    from posttrain.data.gsm8k import load_gsm8k

    path = ra.write_gsm8k_train(tmp_path / "gsm8k_train.jsonl", n=16)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    problems = load_gsm8k(str(path), "train")
    assert len(rows) == len(problems) == 16 and set(rows[0]) == {"question", "answer"}
    for row, problem in zip(rows, problems):
        last = row["answer"].splitlines()[-1]
        assert last == f"#### {problem.answer}" and "<<" in row["answer"]
        assert problem.prompt == f"Question: {row['question']}\nAnswer:"


# ------------------------------------------------------------------------------------------- scripted self-play


@pytest.fixture
def selfplay_run(tmp_path, monkeypatch, model_05b):
    """A fresh cache root, a 16-row GSM8K file and the composed config of a 0.5b cell on them."""
    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    data = ra.write_gsm8k_train(tmp_path / "gsm8k_train.jsonl", n=16)
    cfg = ra.compose_config(["scale=0.5b", f"scale.model={model_05b}", f"scale.data_path={data}",
                       "data.samples_per_prompt=6", "data.generation_batch_size=32"])
    return cfg, data


def test_scripted_generate_follows_hf_generate(model_05b):
    """Prompt ids then new ids; a row stops at the first id of the stop set, then holds pad; one that never meets
    a stop id runs to max_new_tokens."""
    from transformers import GenerationConfig

    from posttrain.models.loading import load_tokenizer

    tok = load_tokenizer(str(model_05b))
    rows = [{"question": "Ann has 2 pens. Then gets 3 more. How many pens does Ann have now?",
             "answer": "2+3 = <<2+3=5>>5\n#### 5"}]
    gen = ra.ScriptedGenerator(tok, rows)
    model = gen.load_model(model_05b)
    enc = tok(["Question: " + rows[0]["question"] + "\nAnswer:", "x\nQuestion: " + rows[0]["question"]],
              return_tensors="pt", padding=True)
    answer_ids = tok(" 2+3 = <<2+3=5>>5\n#### 5", add_special_tokens=False)["input_ids"]
    wrong_ids = tok(" 2+3 = <<2+3=5>>5\n#### 6", add_special_tokens=False)["input_ids"]
    both = GenerationConfig(eos_token_id=[151645, 151643], pad_token_id=151643, max_new_tokens=40, do_sample=False)
    out = model.generate(**enc, generation_config=both)
    width = enc["input_ids"].shape[1]
    assert out[:, :width].tolist() == enc["input_ids"].tolist()
    new = out[:, width:].tolist()
    assert new[0] == answer_ids + [151645] + [151643] * (len(new[0]) - len(answer_ids) - 1)  # k=0: right, <|im_end|>
    assert new[1][:len(wrong_ids) + 1] == wrong_ids + [151643]  # k=1: off by one, then <|endoftext|>
    assert gen.calls[-1]["eos_token_id"] == [151643, 151645] and gen.calls[-1]["repetition_penalty"] == 1.05
    # stopping only at <|im_end|> (the model's generation_config overridden by a kwarg): k=3 runs on with junk
    out = model.generate(**enc, eos_token_id=151645, max_new_tokens=40, do_sample=False)
    tail = out[1, width:].tolist()
    assert len(tail) == 40 and tail[:len(answer_ids) + 1] == answer_ids + [151643]
    assert "JUNK" in tok.decode(tail[len(answer_ids) + 1:])
    assert gen.seen[0] == 4


def test_scripted_selfplay_yields_pairs_and_the_run_hits_its_cache(selfplay_run):
    from posttrain.cache import CACHE_EVENTS
    from posttrain.data.selfplay import load_records, make_examples, selfplay_report, selfplay_samples
    from posttrain.models.loading import load_policy

    cfg, data = selfplay_run
    model_dir = cfg.scale.model
    path, gen = ra.scripted_selfplay(model_dir, cfg.data)
    records = load_records(path)
    assert len(records) == 16 and all(len(r["samples"]) == 6 for r in records)
    rows = [json.loads(line) for line in Path(data).read_text().splitlines()]
    by_question = {row["question"]: i for i, row in enumerate(rows)}
    for record in records:  # the real checker's verdicts are the scripted ones: the texts arrived intact
        assert record["prompt"].count("Question: ") == 1 + cfg.data.fewshot  # the study's few-shot format
        i = by_question[record["prompt"].rsplit("Question: ", 1)[1].removesuffix("\nAnswer:")]
        assert record["correct"] == [i % 4 != 3 and k % 3 == 0 for k in range(6)]
    pairs = make_examples(records, "pairs")
    assert len(pairs) == 12  # every problem but each 4th has a right and a wrong sample
    assert all(p["chosen"].rstrip().endswith(f"#### {r['answer']}") for p, r in
               zip(pairs, [r for r in records if any(r["correct"])]))
    assert sum(c["batch"] * c["num_return_sequences"] for c in gen.calls) == 16 * 6
    # the yield manifest, by hand: 12 of 16 prompts paired; 2 of 6 samples strict-right on those; "The answer is N."
    # (k % 3 == 2) is right for flexible-extract only, on every prompt
    manifest = selfplay_report(path)
    assert (manifest["pairs"], manifest["pair_yield"], manifest["strict_accuracy"], manifest["flexible_accuracy"],
            manifest["strict_flexible_agreement"], manifest["truncated"]) == (
        12, 0.75, 0.25, round(56 / 96, 6), round(64 / 96, 6), 0.0)
    # the run's own call (its loader, same base id, same data block) is a cache hit: nothing is generated
    loaded = load_policy(cfg.scale, OmegaConf.create({"enabled": False}))
    assert loaded.model_id == model_dir
    assert selfplay_samples(loaded.model, loaded.tokenizer, loaded.model_id, cfg.data) == path
    assert CACHE_EVENTS[f"selfplay/{path.parent.name}"] is True


def test_real_sampler_stops_at_both_eos_and_adds_no_unasked_sampling(selfplay_run):
    """Issue 11 item 6 on the real sampler: half the scripted answers end in <|endoftext|> followed by junk, and
    the model's generation_config carries Qwen's repetition_penalty 1.05 / top_k 20."""
    from posttrain.data.selfplay import load_records

    cfg, _ = selfplay_run
    path, gen = ra.scripted_selfplay(cfg.scale.model, cfg.data)
    samples = [s for r in load_records(path) for s in r["samples"]]
    assert not [s for s in samples if "JUNK" in s], "completions ran past <|endoftext|>"
    for call in gen.calls:
        assert call["eos_token_id"] == [151643, 151645]
        assert call["repetition_penalty"] in (None, 1.0) and call["top_k"] in (None, 0)
        assert (call["temperature"], call["top_p"]) == (cfg.data.temperature, cfg.data.top_p)

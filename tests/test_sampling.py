"""The sampler samples as configured: it stops at every EOS id (the tokenizer's and the model generation config's),
cuts at stop strings with ids and text kept consistent, and nothing of a model's own generation config (Qwen's
repetition_penalty 1.05, top_k 20, ...) applies unasked, also through a PeftModel. Models are random 1-layer Qwen2s
(tests/conftest.random_qwen2); "scripted" ones get their next token forced by a forward hook, so the real
``generate`` (left padding, KV cache, stopping criteria) runs on a known token sequence."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import qwen_like_char_tokenizer, random_qwen2
from transformers import GenerationConfig

from posttrain.data.tokenizer import build_char_tokenizer
from posttrain.rollout import SamplingConfig, sample, sampling_record, stop_ids
from posttrain.rollout.sampler import finish

IM_END, ENDOFTEXT = "<|im_end|>", "<|endoftext|>"
#: Qwen2.5-Instruct's generation_config.json sampling defaults.
QWEN_DEFAULTS = dict(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return qwen_like_char_tokenizer(tmp_path_factory.mktemp("tok"))


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def qwen_like(tok, seed: int = 0, **defaults):
    """A random Qwen2 whose generation config names both EOS ids, as Qwen2.5-Instruct's does; its (tied) output
    weights are scaled so logits span a few units, as a trained model's do, and penalties move the samples."""
    model = random_qwen2(len(tok), seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
    model.generation_config = GenerationConfig(eos_token_id=[tok.convert_tokens_to_ids(IM_END),
                                                             tok.convert_tokens_to_ids(ENDOFTEXT)],
                                               pad_token_id=tok.pad_token_id, **defaults)
    return model


def scripted(model, rows: list[list[int]]):
    """Force ``model``'s output: row ``i`` of a batch emits ``rows[i]`` after the prompt, then repeats its last
    token. The step counts forwards since the prefill (the one that finds the KV cache empty): each forward of
    ``generate`` makes one token."""
    state = {"step": 0}

    def hook(module, args, kwargs, output):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        state["step"] = 0 if cache is None or cache.get_seq_length() == kwargs["input_ids"].shape[1] else \
            state["step"] + 1
        step = state["step"]
        logits = torch.full_like(output.logits, -1e4)
        batch = kwargs["input_ids"].shape[0]
        nxt = [rows[i % len(rows)][min(step, len(rows[i % len(rows)]) - 1)] for i in range(batch)]
        logits[torch.arange(batch), -1, nxt] = 0.0
        output.logits = logits
        return output

    model.register_forward_hook(hook, with_kwargs=True)
    return model


def test_a_completion_stops_at_the_second_eos_id_and_nothing_after_it_leaks(tok):
    end, im_end = tok.convert_tokens_to_ids(ENDOFTEXT), tok.convert_tokens_to_ids(IM_END)
    assert tok.eos_token_id == im_end and tok.pad_token_id == end  # Qwen's layout: pad is the second EOS
    # "12" then <|endoftext|>, then junk forever: a model that does not stop at the generation config's 2nd EOS
    model = scripted(qwen_like(tok), [_ids(tok, "12") + [end] + _ids(tok, "999")])
    [r] = sample(model, tok, ["Q?"], SamplingConfig(num_samples=2, max_new_tokens=12), seed=0)
    assert r.completion_ids == [_ids(tok, "12") + [end]] * 2, "cut at the first EOS of either kind, kept"
    assert r.completions == ["12", "12"] and r.truncated == [False, False]
    # ... and at the tokenizer's own EOS, in the same batch as a row that never stops (truncated, no padding)
    model = scripted(qwen_like(tok), [_ids(tok, "7") + [im_end] + _ids(tok, "88"), _ids(tok, "!")])
    short, never = sample(model, tok, ["Q?", "long prompt!"], SamplingConfig(max_new_tokens=6), seed=0)
    assert short.completion_ids == [_ids(tok, "7") + [im_end]] and short.completions == ["7"]
    assert never.completion_ids == [_ids(tok, "!" * 6)] and never.truncated == [True]


def test_stop_strings_cut_text_and_ids_where_lm_eval_would(tok):
    # a few-shot model going on with the next question: cut before "Question:", as lm-eval gsm8k's `until`
    model = scripted(qwen_like(tok), [_ids(tok, "#### 5\n\nQuestion: what ")])
    cfg = SamplingConfig(max_new_tokens=40, stop_strings=("Question:", "</s>", IM_END))
    [r] = sample(model, tok, ["Q?"], cfg, seed=0)
    assert r.completions == ["#### 5\n\n"] and r.completion_ids == [_ids(tok, "#### 5\n\n")]
    assert r.truncated == [False]
    # HF's own stopping criterion ended generation there (the script would have gone on to max_new_tokens)
    out = model.generate(**tok(["Q?"], return_tensors="pt"), max_new_tokens=40, do_sample=False,
                         stop_strings=["Question:"], tokenizer=tok, pad_token_id=tok.pad_token_id)
    assert out.shape[1] - 2 == len(_ids(tok, "#### 5\n\nQuestion:"))


def test_a_token_straddling_the_stop_string_keeps_ids_and_text_consistent(tok, tmp_path):
    multi = build_char_tokenizer(tmp_path / "multi")
    multi.add_tokens(["B\nQu"])  # one token reaching into the stop string
    ids = _ids(multi, "AB\nQuestion: z")
    assert multi.convert_ids_to_tokens(ids[1]) == "B\nQu"
    kept, text, truncated = finish(multi, ids, [multi.eos_token_id], multi.pad_token_id, ("Question:",))
    # the longest prefix that decodes inside the cut text "AB\n": the straddling token goes with the stop string
    assert kept == ids[:1] and text == "A" == multi.decode(kept) and truncated is False
    kept, text, truncated = finish(multi, ids + [multi.eos_token_id, 7, 7], [multi.eos_token_id],
                                   multi.pad_token_id)
    assert kept == ids + [multi.eos_token_id] and text == "AB\nQuestion: z" and truncated is False


def test_the_models_own_sampling_defaults_do_not_apply(tok):
    prompts = ["Q?", "another question?"]
    cfg = SamplingConfig(num_samples=4, temperature=1.0, max_new_tokens=24)
    clean = sample(qwen_like(tok), tok, prompts, cfg, seed=7)
    qwen = qwen_like(tok, **QWEN_DEFAULTS)  # same weights (same init seed), Qwen's generation_config defaults
    assert [r.completion_ids for r in sample(qwen, tok, prompts, cfg, seed=7)] == [r.completion_ids for r in clean]
    assert qwen.generation_config.repetition_penalty == 1.05, "the model's own config is restored afterwards"
    # the check can fail: the earlier call (sampling kwargs only) let the model's repetition_penalty 1.05 in
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    asked = dict(max_new_tokens=24, do_sample=True, temperature=1.0, top_p=1.0, top_k=0,
                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(7)
    leaky = qwen.generate(**enc, **asked)
    torch.manual_seed(7)
    assert leaky.tolist() != qwen.generate(**enc, **asked, repetition_penalty=1.0).tolist()


def test_a_peft_model_samples_as_its_base_without_the_models_defaults(tok):
    from peft import LoraConfig, get_peft_model

    cfg = SamplingConfig(num_samples=3, temperature=1.0, max_new_tokens=16)
    clean = sample(qwen_like(tok), tok, ["Q?"], cfg, seed=3)
    peft = get_peft_model(qwen_like(tok, **QWEN_DEFAULTS), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert [r.completion_ids for r in sample(peft, tok, ["Q?"], cfg, seed=3)] == [r.completion_ids for r in clean]
    assert peft.get_base_model().generation_config.top_k == 20


def test_sampling_is_seeded_and_left_padded_batches_decode_as_single_prompts(tok):
    model = qwen_like(tok)
    cfg = SamplingConfig(num_samples=3, temperature=1.0, max_new_tokens=16)
    a, b = (sample(model, tok, ["Q?", "x"], cfg, seed=5) for _ in range(2))
    assert [r.completion_ids for r in a] == [r.completion_ids for r in b]
    assert [r.completion_ids for r in sample(model, tok, ["Q?", "x"], cfg, seed=6)] != [r.completion_ids for r in a]
    greedy = SamplingConfig(temperature=0, max_new_tokens=12)
    prompts = ["Q?", "a much longer prompt here?"]
    batched = sample(model, tok, prompts, greedy)
    assert [r.completion_ids for r in batched] == [sample(model, tok, [p], greedy)[0].completion_ids for p in prompts]


def test_stop_ids_are_the_union_and_the_record_says_what_ran(tok, tmp_path):
    im_end, end = tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(ENDOFTEXT)
    assert stop_ids(qwen_like(tok), tok) == [im_end, end]
    single = random_qwen2(len(tok))
    single.generation_config = GenerationConfig(eos_token_id=end)  # an int, not a list
    assert stop_ids(single, tok) == [im_end, end]
    record = sampling_record(SamplingConfig(num_samples=16, temperature=1.0, max_new_tokens=512,
                                            stop_strings=("Question:",)), [im_end, end], end)
    assert record == {"num_samples": 16, "do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                      "max_new_tokens": 512, "repetition_penalty": 1.0, "num_beams": 1,
                      "eos_token_id": [im_end, end], "pad_token_id": end, "stop_strings": ["Question:"]}
    assert json.loads(json.dumps(record)) == record
    greedy = sampling_record(SamplingConfig(temperature=0), [im_end], None)
    assert greedy["do_sample"] is False and greedy["pad_token_id"] == im_end and greedy["stop_strings"] is None
    tok_without = build_char_tokenizer(tmp_path / "no-eos")
    tok_without.eos_token = None
    bare = random_qwen2(len(tok))
    bare.generation_config = GenerationConfig()
    with pytest.raises(ValueError, match="eos"):
        stop_ids(bare, tok_without)


def test_online_rollouts_stop_at_the_stop_strings_their_prompts_carry(tok):
    from posttrain.algorithms.hparams import ROLLOUT_DEFAULTS
    from posttrain.rollout.groups import sample_groups as _sample_groups

    model = scripted(qwen_like(tok), [_ids(tok, "#### 5\n\nQuestion: next ")])
    examples = [{"prompt": "Q?", "answer": "5", "stop_strings": ["Question:"]}]  # as make_examples gives them
    rc = {**ROLLOUT_DEFAULTS, "num_samples": 2, "max_new_tokens": 30}
    [group] = _sample_groups(model, tok, examples, [0], rc, seed=0)
    assert group.texts == ["#### 5\n\n"] * 2 and group.truncated == [False, False]
    [group] = _sample_groups(model, tok, [{"prompt": "Q?", "answer": "5"}], [0], rc, seed=0)
    assert group.texts[0].startswith("#### 5\n\nQuestion: next") and group.truncated == [True, True]

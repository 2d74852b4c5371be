"""The embedded tasks, the character tokenizer, self-play example kinds, collation masks and GSM8K loading."""

from __future__ import annotations

import json
import re

import pytest
import torch

from posttrain.data import synth
from posttrain.data.collate import collate, mismatched_rows, pad_sequences
from posttrain.data.gsm8k import DataFormatError, load_gsm8k
from posttrain.data.selfplay import make_examples
from posttrain.data.tokenizer import build_char_tokenizer
from posttrain.rewards import answers_match, extract_strict

LINE = re.compile(r"^(\d+)([+\-*])(\d+)=(\d+)$")


def _check_worked_solution(problem: synth.Problem) -> int:
    lines = problem.solution.splitlines()
    assert lines[-1] == f"#### {problem.answer}"
    for line in lines[:-1]:
        a, op, b, c = LINE.match(line).groups()
        assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(c), line
    return len(lines) - 1


def test_generator_is_deterministic_correct_and_in_gsm8k_format():
    assert synth.problems("train", 50) == synth.problems("train", 50)
    assert synth.problems("train", 50) != synth.problems("test", 50)
    easy = [_check_worked_solution(p) for p in synth.problems("test", 300)]
    hard = [_check_worked_solution(p) for p in synth.problems("test", 300, hard=True)]
    assert 1 <= min(easy) and max(easy) <= 5 and min(hard) >= 4 and sum(hard) / 300 > sum(easy) / 300 + 2
    p = synth.problems("test", 1)[0]
    assert p.prompt.startswith("Question: ") and p.prompt.endswith("\nAnswer:")
    assert extract_strict(p.completion) == p.answer and p.to_json()["answer"] == p.solution


def test_test_split_does_not_leak_into_training_prompts():
    test = {p.question for p in synth.problems("test", 500)}
    train = {p.question for p in synth.problems("train", 512)}
    assert len(test & train) / len(test) < 0.02


def test_mc_items_have_one_gold_among_four_distinct_choices():
    for item in synth.mc_items("test", 300):
        assert len(item["choices"]) == 4 == len(set(item["choices"]))
        q = item["question"]
        if q.startswith("What is"):
            gold = eval(q[len("What is "):-1])  # noqa: S307 - generated arithmetic
        else:
            gold = max(int(x) for x in re.findall(r"\d+", q))
        assert item["choices"][item["label"]] == str(gold)


def test_char_tokenizer_round_trips_every_printable_character(tmp_path):
    from transformers import AutoTokenizer

    build_char_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "".join(chr(c) for c in range(32, 127)) + "\n  x\n\n#### 12"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok.padding_side == "left" and tok.pad_token_id != tok.eos_token_id


RECORDS = [
    {"prompt": "P1", "answer": "3", "gold": " g1", "samples": [" a", " b", " c"], "correct": [True, False, True]},
    {"prompt": "P2", "answer": "4", "gold": " g2", "samples": [" d", " e"], "correct": [False, False]},
    {"prompt": "P3", "answer": "5", "gold": " g3", "samples": [" f", " h"], "correct": [False, True]},
]


def test_self_play_kinds_follow_the_study():
    pairs = make_examples(RECORDS, "pairs", seed=0)
    assert [p["prompt"] for p in pairs] == ["P1", "P3"], "prompts without both a correct and a wrong sample drop"
    assert pairs[0]["chosen"] in (" a", " c") and pairs[0]["rejected"] == " b"
    assert pairs[1] == {"prompt": "P3", "chosen": " h", "rejected": " f"}
    sft = make_examples(RECORDS, "selfplay_chosen", seed=0)
    assert [(e["prompt"], e["completion"]) for e in sft] == [(p["prompt"], p["chosen"]) for p in pairs]
    rft = make_examples(RECORDS, "selfplay_chosen", seed=0, sft_source="all_correct")
    assert sorted(e["completion"] for e in rft) == [" a", " c", " h"]
    gold = make_examples(RECORDS, "gold", seed=0)
    assert [e["completion"] for e in gold] == [" g1", " g3"] and len(gold) == len(sft)
    unpaired = make_examples(RECORDS, "unpaired", seed=0)
    assert [u["desirable"] for u in unpaired] == [True, False, True, False]
    assert make_examples(RECORDS, "pairs", seed=0) == pairs, "deterministic given the data seed"
    with pytest.raises(ValueError, match="known"):
        make_examples(RECORDS, "nope")


def test_collation_masks_prompt_and_padding_and_appends_eos(tmp_path):
    tok = build_char_tokenizer(tmp_path)
    batch = pad_sequences(tok, ["ab", "abcd"], [" x", " yz"], max_length=64)
    ids, att, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    assert ids.shape == (2, 8)
    assert att[0].tolist() == [1] * 5 + [0] * 3 and comp[0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    assert ids[0, 4].item() == tok.eos_token_id and comp[1].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    pairs = collate("pairs", tok, [{"prompt": "p", "chosen": " c", "rejected": " rr"}], 64)
    assert pairs["pairs"] == 1 and pairs["input_ids"].shape[0] == 2
    unp = collate("unpaired", tok, [{"prompt": "p", "completion": " a", "desirable": True},
                                    {"prompt": "q", "completion": " bb", "desirable": False}], 64)
    assert unp["rows"] == 2 and torch.equal(unp["desirable"], torch.tensor([True, False]))
    assert unp["input_ids"].shape[0] == 2, "the gradient forward carries the examples' own rows only"
    annotated = [{"prompt": "p", "completion": " a", "desirable": True, "kl_completion": " bb"},
                 {"prompt": "q", "completion": " bb", "desirable": False, "kl_completion": " a"}]
    kl = mismatched_rows(tok, annotated, 64, matched=True)  # KTO's anchor pass: own rows, then mismatched ones
    decoded = [tok.decode(r[a.bool()]) for r, a in zip(kl["input_ids"], kl["attention_mask"])]
    assert decoded[0].startswith("p a") and decoded[2].startswith("p bb") and decoded[3].startswith("q a")


def test_local_gsm8k_file_loads_and_bad_files_name_file_and_line(tmp_path):
    good = tmp_path / "train.jsonl"
    rows = [{"question": "Tom has 2 apples and buys 3. How many?", "answer": "2+3=<<2+3=5>>5\n#### 5"},
            {"question": "A pen costs $1,200. Two?", "answer": "2*1200=2400\n#### 2,400"}]
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems = load_gsm8k(str(good))
    assert [p.answer for p in problems] == ["5", "2,400"]
    assert problems[0].prompt == "Question: Tom has 2 apples and buys 3. How many?\nAnswer:"
    assert answers_match(extract_strict(problems[1].completion), "2400")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(DataFormatError, match=r"bad.jsonl:2: not valid JSON"):
        load_gsm8k(str(bad))
    noanswer = tmp_path / "noanswer.jsonl"
    noanswer.write_text(json.dumps({"question": "q", "answer": "no final line"}) + "\n")
    with pytest.raises(DataFormatError, match=r"noanswer.jsonl:1: .*####"):
        load_gsm8k(str(noanswer))

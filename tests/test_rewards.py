"""Reward functions (posttrain.rewards): agreement with lm-eval's own gsm8k filters and exact_match, format reward,
DAPO's overlong punishment, weighted sums."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from posttrain.rewards import (
    INVALID,
    REWARD_FUNCTIONS,
    compute_rewards,
    extract_flexible,
    extract_strict,
    flexible_reward,
    format_reward,
    is_correct_flexible,
    is_correct_strict,
    is_well_formatted,
    overlong_penalty,
    strict_reward,
    weighted_sum,
)

GSM8K_GOLD = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
              "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")

# (completion, gold answer): commas, signs, decimals, $, trailing periods, no answer, several ####, ...
TRICKY = [
    ("The answer is 42.\n#### 42", "42"),
    ("#### 1,234", "1234"),
    ("#### 1,234", "1,234"),
    ("#### -5", "-5"),
    ("#### -5", "5"),
    ("#### 3.50", "3.5"),
    ("#### 3.50", "3.50"),
    ("#### $12", "12"),
    ("So it costs $1,000.", "1000"),
    ("So it costs $1,000.", "1,000"),
    ("No answer here", "7"),
    ("", "0"),
    ("#### 7\n#### 8", "8"),
    ("#### 7\n#### 8", "7"),
    ("#### 10.", "10"),
    ("I think 3 + 4 = 7", "7"),
    ("####42", "42"),
    ("Answer: 12\n\n#### 12 apples", "12"),
    ("She has 5 apples.\n#### 72", GSM8K_GOLD),
    ("72 clips", GSM8K_GOLD),
    ("The value is -3", "-3"),
    ("#### 5\nThe answer is 6", "6"),
    ("#### 5\nThe answer is 6", "5"),
    ("Total: 12.50.", "12.50"),
    ("Total: 12.50.", "12.5"),
    ("#### 1e3", "1000"),
    ("#### 0.5", ".5"),
    ("x = 4, so 2x = 8.", "8"),
    ("It is 8, not 9", "8"),
    ("#### -1,000.00", "-1000.00"),
    ("##### 9", "9"),
    ("The answer: $ 5", "5"),
    ("#### 12\n", "12"),
    ("costs 3 dollars, total 15$", "15"),
]


@pytest.fixture(scope="module")
def lm_eval_gsm8k():
    pytest.importorskip("lm_eval")
    import yaml
    import lm_eval
    from lm_eval.api.metrics import exact_match_fn
    from lm_eval.filters.extraction import RegexFilter

    cfg = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / "gsm8k" / "gsm8k.yaml").read_text())
    filters = {}
    for entry in cfg["filter_list"]:
        steps = entry["filter"]
        assert steps[0]["function"] == "regex" and steps[1]["function"] == "take_first"
        filters[entry["name"]] = RegexFilter(regex_pattern=steps[0]["regex_pattern"],
                                             group_select=steps[0].get("group_select", 0))
    (metric,) = cfg["metric_list"]
    assert metric["metric"] == "exact_match"
    kwargs = {k: metric[k] for k in ("ignore_case", "ignore_punctuation", "regexes_to_ignore")}

    def run(name, completion, gold):
        pred = list(filters[name].apply([[completion]], [{}]))[0][0]  # regex, then take_first
        score = exact_match_fn(predictions=[pred], references=[gold], **kwargs)["exact_match"]
        return pred, bool(score == 1.0)

    return run


@pytest.mark.parametrize("completion,gold", TRICKY, ids=[repr(c)[:40] for c, _ in TRICKY])
def test_agrees_with_lm_eval_gsm8k_filters(lm_eval_gsm8k, completion, gold):
    pred, ok = lm_eval_gsm8k("strict-match", completion, gold)
    assert extract_strict(completion) == pred
    assert is_correct_strict(completion, gold) is ok
    pred, ok = lm_eval_gsm8k("flexible-extract", completion, gold)
    assert extract_flexible(completion) == pred
    assert is_correct_flexible(completion, gold) is ok


def test_table_exercises_both_outcomes(lm_eval_gsm8k):
    strict = [lm_eval_gsm8k("strict-match", c, g)[1] for c, g in TRICKY]
    flexible = [lm_eval_gsm8k("flexible-extract", c, g)[1] for c, g in TRICKY]
    assert any(strict) and not all(strict) and any(flexible) and not all(flexible)
    assert any(s != f for s, f in zip(strict, flexible))


def test_known_cases():
    assert is_correct_strict("#### 1,234", "1234") and is_correct_strict("She has 5.\n#### 72", GSM8K_GOLD)
    assert not is_correct_strict("#### $12", "12") and is_correct_flexible("#### $12", "12")
    assert not is_correct_strict("#### 7\n#### 8", "8") and is_correct_flexible("#### 7\n#### 8", "8")
    assert extract_strict("no answer") == INVALID and not is_correct_flexible("no answer", "0")


def test_batched_rewards():
    completions = ["#### 5", "it is 5", "#### 6", "nothing"]
    answers = ["5", "5", "5", "5"]
    assert torch.equal(strict_reward(completions, answers), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert torch.equal(flexible_reward(completions, answers), torch.tensor([1.0, 1.0, 0.0, 0.0]))
    assert torch.equal(format_reward(completions), torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert strict_reward(completions, answers).dtype == torch.float32
    assert sorted(REWARD_FUNCTIONS) == ["flexible", "format", "strict"]
    out = compute_rewards(["strict", "format"], completions, answers)
    assert set(out) == {"strict", "format"} and torch.equal(out["format"], format_reward(completions))
    with pytest.raises(ValueError, match="flexible"):
        compute_rewards(["exact"], completions, answers)
    with pytest.raises(ValueError, match="answers"):
        strict_reward(completions, answers[:2])


@pytest.mark.parametrize("text,ok", [
    ("3*4=12\n12+1=13\n#### 13", True),
    ("#### 13", True),
    ("work\n#### -1,234.5  \n\n", True),
    ("work\n#### 13 apples", False),
    ("#### 13\nmore text", False),
    ("#### 7\n#### 8", False),
    ("####13", False),
    ("#### 1,23", False),
    ("#### $13", False),
    ("#### 13.", False),
    ("the answer is 13", False),
    ("", False),
])
def test_format_reward(text, ok):
    assert is_well_formatted(text) is ok
    if ok:  # a well-formatted completion always has a strict-match answer
        assert extract_strict(text) != INVALID


def test_overlong_penalty_hand_values():
    # max 20, cache 4: 0 up to 16, then (16 - L) / 4, -1 beyond 20
    out = overlong_penalty([0, 16, 17, 18, 20, 21, 100], max_length=20, cache_length=4)
    assert torch.equal(out, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0]))
    with pytest.raises(ValueError, match="cache_length"):
        overlong_penalty([1], max_length=4, cache_length=4)


def test_weighted_sum():
    rewards = {"strict": torch.tensor([1.0, 0.0, 1.0]), "format": torch.tensor([1.0, 1.0, 0.0]),
               "overlong": torch.tensor([0.0, -0.5, -1.0])}
    out = weighted_sum(rewards, {"strict": 1.0, "format": 0.2, "overlong": 0.5})
    torch.testing.assert_close(out, torch.tensor([1.2, -0.05, 0.5]))
    with pytest.raises(ValueError, match="no weight for \\['overlong'\\]"):
        weighted_sum(rewards, {"strict": 1.0, "format": 0.2})
    with pytest.raises(ValueError, match="no reward for \\['length'\\]"):
        weighted_sum(rewards, {"strict": 1.0, "format": 0.2, "overlong": 1.0, "length": 1.0})
    with pytest.raises(ValueError, match="shapes"):
        weighted_sum({"a": torch.zeros(2), "b": torch.zeros(3)}, {"a": 1.0, "b": 1.0})

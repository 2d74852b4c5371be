"""Final-answer extraction that agrees with lm-eval's gsm8k task (lm_eval/tasks/gsm8k/gsm8k.yaml).

strict-match:     regex ``#### (\\-?[0-9\\.\\,]+)``, first match.
flexible-extract: regex ``(-?[$0-9.,]{2,})|(-?[0-9]+)``, last match (group_select -1).
exact_match then ignores case, removes ``,``, ``$``, everything up to ``#### `` and a trailing ``.``.

The same functions score self-play samples, online-RL rewards and (through lm-eval's own filters, which use the
same patterns) the embedded evaluation, so "correct" means one thing everywhere.
"""

from __future__ import annotations

import re

INVALID = "[invalid]"  # lm-eval's RegexFilter fallback

STRICT_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
FLEXIBLE_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_IGNORE = [re.compile(p) for p in (r",", r"\$", r"(?s).*#### ", r"\.$")]


def _first_group(match) -> str:
    if isinstance(match, tuple):
        parts = [m for m in match if m]
        return parts[0] if parts else INVALID
    return match


def extract_strict(text: str) -> str:
    """The answer after ``#### `` (first occurrence), or ``[invalid]``, exactly as lm-eval's strict-match."""
    found = STRICT_RE.findall(text or "")
    return _first_group(found[0]).strip() if found else INVALID


def extract_flexible(text: str) -> str:
    """The last number-like span, or ``[invalid]``, exactly as lm-eval's flexible-extract."""
    found = FLEXIBLE_RE.findall(text or "")
    return _first_group(found[-1]).strip() if found else INVALID


def normalize_answer(text: str) -> str:
    """lm-eval gsm8k exact_match normalisation (regexes_to_ignore, then lower-case, then strip)."""
    for pattern in _IGNORE:
        text = pattern.sub("", text)
    return text.lower().strip()


def answers_match(prediction: str, target: str) -> bool:
    """exact_match of lm-eval's gsm8k metric on already-extracted strings."""
    if prediction == INVALID:
        return False
    return normalize_answer(prediction) == normalize_answer(target)

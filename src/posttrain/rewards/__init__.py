"""Answer checking and rewards shared by self-play data, online RL and the evaluation's own filters."""

from posttrain.rewards.answers import (  # noqa: F401
    INVALID,
    answers_match,
    extract_flexible,
    extract_strict,
    normalize_answer,
)

"""Answer checking and rewards shared by self-play data, online RL and the evaluation's own filters."""

from posttrain.rewards.answers import (  # noqa: F401
    INVALID,
    answers_match,
    extract_flexible,
    extract_strict,
    normalize_answer,
)
from posttrain.rewards.functions import (  # noqa: F401
    REWARD_FUNCTIONS,
    compute_rewards,
    flexible_reward,
    format_reward,
    is_correct_flexible,
    is_correct_strict,
    is_well_formatted,
    overlong_penalty,
    strict_reward,
    weighted_sum,
)

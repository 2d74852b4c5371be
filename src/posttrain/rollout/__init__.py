"""Sampling from a policy (self-play pairs and online RL use the same sampler)."""

from posttrain.rollout.sampler import (  # noqa: F401
    Rollout,
    SamplingConfig,
    generation_config,
    sample,
    sampling_record,
    stop_ids,
)

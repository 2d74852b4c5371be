"""Sampling from a policy (self-play pairs and online RL use the same sampler)."""

from posttrain.rollout.sampler import Rollout, SamplingConfig, sample  # noqa: F401

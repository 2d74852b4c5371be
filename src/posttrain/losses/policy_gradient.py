"""Placeholder: the policy-gradient (GRPO-family) losses are being written (issue 7)."""

POLICY_GRADIENT_LOSSES: dict = {}


def policy_gradient(name, logps, old_logps, advantages, mask, *, ref_logps=None, **hparams):
    raise ValueError(f"unknown policy-gradient loss {name!r}; known: {sorted(POLICY_GRADIENT_LOSSES)}")

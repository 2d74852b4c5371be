"""Placeholder: the unpaired (KTO-family) losses are being written (issue 4)."""

UNPAIRED_LOSSES: dict = {}


def unpaired(name, policy_logps, ref_logps, desirable, *, kl_anchor, lengths=None, **hparams):
    raise ValueError(f"unknown unpaired loss {name!r}; known: {sorted(UNPAIRED_LOSSES)}")

"""Placeholder: the pairwise (DPO-family) losses are being written (issue 4)."""

PAIRWISE_LOSSES: dict = {}


def pairwise(name, policy_chosen, policy_rejected, ref_chosen=None, ref_rejected=None, *, chosen_len=None,
             rejected_len=None, **hparams):
    raise ValueError(f"unknown pairwise loss {name!r}; known: {sorted(PAIRWISE_LOSSES)}")

"""Pure loss functions: tensors in, tensors out; no model, no loop (docs/design.md, "Loss functions").

- ``pairwise(name, policy_chosen, policy_rejected, ref_chosen=None, ref_rejected=None, *, chosen_len=None,
  rejected_len=None, **hparams) -> Tensor[B]``: the DPO family on summed sequence log-probs.
- ``unpaired(name, policy_logps, ref_logps, desirable, *, kl_anchor, lengths=None, **hparams) -> Tensor[B]``:
  KTO family.
- ``policy_gradient(name, logps, old_logps, advantages, mask, *, ref_logps=None, **hparams) -> Tensor[]``: GRPO family.
- ``token_nll(token_logps, mask, num_items=None) -> Tensor[]``: SFT.
"""

from posttrain.losses.supervised import token_nll  # noqa: F401
from posttrain.losses.pairwise import PAIRWISE_LOSSES, pairwise, pairwise_inputs  # noqa: F401
from posttrain.losses.unpaired import UNPAIRED_LOSSES, kto_kl_anchor, unpaired, unpaired_inputs  # noqa: F401
from posttrain.losses.policy_gradient import POLICY_GRADIENT_LOSSES, policy_gradient  # noqa: F401

from posttrain.losses import options  # noqa: E402,F401 - WPO, LD-DPO, f-DPO scores, TDPO
from posttrain.losses._common import LossSpec as _LossSpec  # noqa: E402

#: Pairwise losses that need per-token, full-vocabulary terms (run by the ``token_pairwise`` objective).
TOKEN_PAIRWISE_LOSSES = {
    "tdpo": _LossSpec(fn=options.tdpo),  # defaults from its signature: beta 0.1, alpha 0.5, variant 2
}

"""PPO's critic as a loop component (docs/algorithms.md 5.1), like the reference: a value head and its optimizer.

PPO keeps a value head (an MLP on the policy's detached last hidden state, zero-initialised output) with its own
Adam optimizer in the loop's memory (checkpointed with the weights, so a resumed PPO run continues with the same
critic; seeded and fitted on all ranks' rollouts together, so every rank holds the same head). It is fitted in the
rollout phase on each rollout's returns (clipped value loss, ``vf_epochs`` passes) after the advantages were
computed with the pre-update values.
"""

from __future__ import annotations

import torch

from posttrain.algorithms.memory import LoopMemory
from posttrain.losses.policy_gradient import ppo_value_loss
from posttrain.models.engine import PROCESS_GROUP


class ValueHead:
    """PPO's critic: an MLP on the policy's detached last hidden state (output layer zero: V = 0 at start) and its
    own Adam optimizer; ``state_dict``/``load_state_dict`` let the loop checkpoint both."""

    def __init__(self, hidden_size: int, lr: float, device, seed: int):
        with torch.random.fork_rng(devices=[]):  # the same initial head on every rank, whatever they sampled
            torch.manual_seed(seed)
            self.head = torch.nn.Sequential(torch.nn.Linear(hidden_size, hidden_size), torch.nn.Tanh(),
                                            torch.nn.Linear(hidden_size, 1)).to(device)
        torch.nn.init.zeros_(self.head[2].weight)
        torch.nn.init.zeros_(self.head[2].bias)
        self.optimizer = torch.optim.Adam(self.head.parameters(), lr=float(lr))

    def state_dict(self) -> dict:
        return {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])


def value_head(policy, memory: LoopMemory, rc: dict, seed: int) -> ValueHead:
    """The run's value head, created on first use (identically on every rank: seeded by the run seed)."""
    device = next(policy.parameters()).device
    return memory.get("value_head", lambda: ValueHead(_hidden_size(policy), rc["vf_lr"], device, seed))


def _hidden_size(policy) -> int:
    cfg = getattr(policy, "config", None)
    size = getattr(cfg, "hidden_size", None)
    if size is None:
        raise ValueError("ppo's value head needs the policy's config.hidden_size")
    return int(size)


def fit_value_head(head, optimizer, states, old_values, returns, mask, rc, collectives=PROCESS_GROUP) -> float:
    """``vf_epochs`` full-batch passes of PPO's clipped value loss on this rollout; returns the last pass's loss.

    Over several ranks the loss is a token mean over ALL ranks' rollouts and the gradients are summed over the ranks
    before each step, so every rank keeps the same head (the one rank 0 checkpoints). ``collectives``: the loop's
    engine (posttrain.models.engine.PROCESS_GROUP outside the loop)."""
    last = 0.0
    n_tokens = max(1.0, collectives.all_reduce_sum([float(mask.sum())])[0])
    for _ in range(rc["vf_epochs"]):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for rows, w, h in states:
            v = head(h).squeeze(-1)
            dev = v.device
            loss = ppo_value_loss(v, old_values[rows, : w - 1].to(dev), returns[rows, : w - 1].to(dev),
                                  mask[rows, : w - 1].to(dev), clip_range_value=rc["cliprange_value"],
                                  num_items=n_tokens)
            loss.backward()
            total += float(loss.detach())
        collectives.all_reduce_grads_(head.parameters())
        optimizer.step()
        last = total
    optimizer.zero_grad(set_to_none=True)
    return collectives.all_reduce_sum([last])[0]  # the last pass's loss over all ranks


@torch.no_grad()
def predict_values(head, states, shape) -> torch.Tensor:
    values = torch.zeros(shape, dtype=torch.float32)
    for rows, w, h in states:
        values[rows, : w - 1] = head(h).squeeze(-1).float().cpu()
    return values

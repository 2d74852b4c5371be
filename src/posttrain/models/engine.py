"""The optimisation engine behind the loop: backward, step, schedule, state for checkpoints.

``TorchEngine`` is plain PyTorch on one process (AdamW, cosine with linear warmup, gradient clipping). The loop
only calls ``backward``, ``step``, ``lr``, ``state_dict``/``load_state_dict``, so a DeepSpeed engine (ZeRO 0-3,
one rank per GPU) drops in behind the same five calls without touching train.py.
"""

from __future__ import annotations

import math

import torch


def lr_lambda(total_steps: int, warmup_steps: int, schedule: str):
    """Linear warmup then cosine to 0 (HF ``get_cosine_schedule_with_warmup``) or constant."""
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"unknown trainer.schedule {schedule!r}; known: cosine, constant")

    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    return fn


class TorchEngine:
    def __init__(self, model: torch.nn.Module, trainer_cfg, total_steps: int):
        self.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": float(trainer_cfg.weight_decay)},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=float(trainer_cfg.lr), betas=tuple(trainer_cfg.betas), eps=float(trainer_cfg.eps))
        warmup = int(math.ceil(float(trainer_cfg.warmup_ratio) * total_steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(total_steps, warmup, str(trainer_cfg.schedule)))
        self.max_grad_norm = trainer_cfg.max_grad_norm
        self.params = params

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        """Clip, step the optimizer and the schedule, zero the gradients; returns the gradient norm."""
        norm = torch.nn.utils.clip_grad_norm_(self.params, float(self.max_grad_norm or float("inf")))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict:
        trainable = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        return {"trainable": trainable, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state["trainable"].items():
                params[name].copy_(value)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

"""First-order baselines: torch.optim's SGD and Adam behind the step contract, with learning-rate schedules."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from optimizers.base import Optimizer
from optimizers.objective import Objective
from optimizers.schedules import make_schedule


class TorchOptimizer(Optimizer):
    """Wraps a ``torch.optim`` optimiser: one ``objective.backward()`` and one update per step."""

    def __init__(self, params: Iterable[Tensor], torch_cls: type, *, schedule: str = "constant", warmup_steps: int = 0,
                 milestones: Sequence[float] = (0.5, 0.75), gamma: float = 0.1, **hyper: Any):
        super().__init__(params)
        self.inner = torch_cls(self.params, **hyper)
        self.base_lrs = [g["lr"] for g in self.inner.param_groups]
        self._schedule_args = dict(name=schedule, warmup_steps=warmup_steps, milestones=milestones, gamma=gamma)
        self.schedule = make_schedule(**self._schedule_args) if schedule == "constant" else None

    def configure(self, *, total_steps: int | None = None) -> None:
        self.schedule = make_schedule(total_steps=total_steps, **self._schedule_args)

    def step(self, objective: Objective) -> dict[str, Any]:
        if self.schedule is None:
            self.configure(total_steps=None)  # raises the clear "needs total steps" error
        scale = self.schedule(self.steps)
        for group, base in zip(self.inner.param_groups, self.base_lrs):
            group["lr"] = base * scale
        self.inner.zero_grad(set_to_none=True)
        loss = objective.backward()
        self.inner.step()
        self.steps += 1
        return {"loss": loss, "lr": self.base_lrs[0] * scale}

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.inner.load_state_dict(state["inner"])


class SGD(TorchOptimizer):
    """SGD with (Nesterov) momentum and weight decay."""

    def __init__(self, params: Iterable[Tensor], lr: float = 0.1, momentum: float = 0.9, nesterov: bool = False,
                 weight_decay: float = 0.0, dampening: float = 0.0, **schedule: Any):
        if lr <= 0:
            raise ValueError(f"optimizer.lr must be positive, got {lr}.")
        super().__init__(params, torch.optim.SGD, lr=lr, momentum=momentum, nesterov=nesterov,
                         weight_decay=weight_decay, dampening=dampening, **schedule)


class Adam(TorchOptimizer):
    """Adam (Kingma & Ba 2014); ``decoupled=True`` gives AdamW."""

    def __init__(self, params: Iterable[Tensor], lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, decoupled: bool = False, **schedule: Any):
        if lr <= 0:
            raise ValueError(f"optimizer.lr must be positive, got {lr}.")
        cls = torch.optim.AdamW if decoupled else torch.optim.Adam
        super().__init__(params, cls, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **schedule)

"""The step contract every curvlab optimiser implements, first- or second-order.

    optimizer = SomeMethod(model.parameters(), **hyperparameters)
    for inputs, targets in batches:
        stats = optimizer.step(Objective(model, loss, inputs, targets))   # updates the parameters in place

``step`` returns a flat dict of statistics (floats or 0-dim tensors; always "loss", the batch loss before the update)
that a runner logs as is. ``state_dict``/``load_state_dict`` hold everything needed to continue the same trajectory.
First-order methods only call ``objective.backward()``; second-order ones use its gradient and curvature products.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from optimizers.objective import Objective


class Optimizer:
    """Base class: holds the trainable parameters; subclasses implement ``step``."""

    def __init__(self, params: Iterable[Tensor]):
        self.params: list[Tensor] = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("the optimiser was given no trainable parameters")
        self.steps = 0

    def configure(self, *, total_steps: int | None = None) -> None:
        """Told by the runner before training how many steps it will take (schedules use it)."""

    def step(self, objective: Objective) -> dict[str, Any]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])


def clone_state(value: Any) -> Any:
    """Deep copy of tensors inside nested containers, so a saved state never aliases live buffers."""
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: clone_state(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(clone_state(v) for v in value)
    return value


def as_tensor_like(value: Any, like: Tensor) -> Tensor:
    return torch.as_tensor(value, dtype=like.dtype, device=like.device).clone()

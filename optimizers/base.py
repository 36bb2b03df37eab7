"""The step contract every curvlab optimiser implements, first- or second-order.

    optimizer = SomeMethod(model.parameters(), **hyperparameters)
    for inputs, targets in batches:
        stats = optimizer.step(Objective(model, loss, inputs, targets))   # updates the parameters in place

``step`` returns a flat dict of statistics (floats or 0-dim tensors; always "loss", the batch's data loss before the
update) that a runner logs as is. ``state_dict``/``load_state_dict`` hold everything needed to continue the same
trajectory. First-order methods only call ``objective.backward()``; second-order ones use its gradient and curvature
products.

A method is a subclass with

* ``Options``: a frozen dataclass of its hyperparameters (``validation.checks.Options``), validated once;
* ``update(objective) -> stats``: one step on the objective, which already includes weight decay (below); what a
  method may ask of it is ``ObjectiveLike`` (optimizers/interface.py);
* ``state_dict``/``load_state_dict`` for the state that changes from step to step.

Where a method's iterate is not the point to evaluate (Schedule-Free averages its iterates), ``eval_point()`` is a
context manager inside which the parameters are at that point; on leaving it they are back where training continues,
bit for bit. A runner evaluates and checkpoints inside it (runner/state.py); for every other method it does nothing.

Weight decay is one mechanism for every method: with ``weight_decay = eta > 0`` the base class hands ``update`` a
:class:`~optimizers.weight_decay.WeightDecayed` objective, F(w) = L(w) + eta/2 |w|^2, whose gradient, curvature
products and trial losses include the regulariser. The logged "loss" stays the data loss L.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from validation.checks import Options, nonnegative, option
from optimizers.interface import ObjectiveLike
from optimizers.monitor import NO_MONITOR, StepMonitor, monitoring
from optimizers.weight_decay import WeightDecayed


@dataclass(frozen=True)
class OptimizerOptions(Options):
    """Options every method has."""

    weight_decay: float = option(0.0, nonnegative)  # eta: minimise L + eta/2 |w|^2 (gradient + eta w, curvature + eta I)


class Optimizer:
    """Base class: holds the trainable parameters and the validated options; subclasses implement ``update``."""

    Options: ClassVar[type[OptimizerOptions]] = OptimizerOptions

    def __init__(self, params: Iterable[Tensor], **options: Any):
        self.options = self.Options.build(type(self).__name__, options)
        self.params: list[Tensor] = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("the optimiser was given no trainable parameters")
        self.numel = sum(p.numel() for p in self.params)
        self.steps = 0
        self.monitor: StepMonitor = NO_MONITOR

    def configure(self, *, total_steps: int | None = None, monitor: StepMonitor | None = None) -> None:
        """Told by the runner before training how many steps it will take (schedules use it), and the monitor that
        receives the progress of each step and may stop it (optimizers/monitor.py; None keeps the current one)."""
        if monitor is not None:
            self.monitor = monitor

    def step(self, objective: ObjectiveLike) -> dict[str, Any]:
        """One update on ``objective``'s batch; returns the step's statistics."""
        if objective.numel != self.numel:
            raise ValueError(f"{type(self).__name__} was built with {self.numel} trainable parameters but the "
                             f"objective's model has {objective.numel}: pass all of the model's trainable parameters "
                             "to the optimiser.")
        eta = self.options.weight_decay
        with monitoring(self.monitor):  # the long loops inside report to it (optimizers/monitor.py)
            if eta and self.decays_through_objective:
                decayed = WeightDecayed(objective, eta)
                stats = self.update(decayed)
                stats["loss"] = decayed.data_loss_at_start()
            else:
                stats = self.update(objective)
        self.steps += 1
        return stats

    decays_through_objective: bool = True  # False for methods with their own (decoupled) decay, e.g. AdamW

    @contextlib.contextmanager
    def eval_point(self) -> Iterator[None]:
        """Inside: the parameters are at the point to evaluate and to save; after: back where training continues, bit
        for bit. The iterate itself for every method but Schedule-Free (optimizers/schedule_free.py)."""
        yield

    # Batch-norm running statistics gathered in training belong to the training point: when the eval point differs,
    # a runner recomputes them there from this many training batches (0: nothing to recompute; runner/state.py).
    eval_point_bn_batches: int = 0

    def update(self, objective: ObjectiveLike) -> dict[str, Any]:
        raise NotImplementedError

    def gradients_per_step(self) -> tuple[float, str]:
        """A rough cost per step, in gradients (one forward and backward pass over the batch), and how it comes about
        ("up to ..." where it varies), for the runner's up-front estimate (runner/cost.py). Methods that do more work
        per step override it."""
        return 1.0, "one gradient per step"

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

"""First-order baselines: torch.optim's SGD and Adam behind the step contract, with learning-rate schedules.

Weight decay is the library's shared mechanism (grad + eta w, as torch's own coupled ``weight_decay`` computes it);
AdamW's decoupled decay (Loshchilov & Hutter 2019, "Decoupled weight decay regularization") is a different
algorithm and stays torch's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from optimizers.base import Optimizer, OptimizerOptions
from validation.checks import boolean, fail, in_range, nonnegative_int, one_of, option, positive, sequence_of
from optimizers.objective import Objective
from optimizers.schedules import SCHEDULES, make_schedule


@dataclass(frozen=True)
class ScheduleOptions(OptimizerOptions):
    """A learning-rate schedule: the base rate times a multiplier of the step (optimizers/schedules.py)."""

    lr: float = option(0.1, positive)                       # base learning rate
    schedule: str = option("constant", one_of(*SCHEDULES))  # constant | cosine | linear | step
    warmup_steps: int = option(0, nonnegative_int)          # linear warm-up from lr / warmup_steps
    milestones: list = option([0.5, 0.75], sequence_of(in_range(0, 1)))  # step schedule: fractions of the run
    gamma: float = option(0.1, positive)                    # step schedule: factor at each milestone

    def schedule_kwargs(self) -> dict[str, Any]:
        return dict(name=self.schedule, warmup_steps=self.warmup_steps, milestones=self.milestones, gamma=self.gamma)


class TorchOptimizer(Optimizer):
    """Wraps a ``torch.optim`` optimiser: one ``objective.backward()`` and one update per step."""

    Options = ScheduleOptions

    def __init__(self, params, **options: Any):
        super().__init__(params, **options)
        torch_cls, hyper = self.torch_optimizer()
        self.inner = torch_cls(self.params, lr=self.options.lr, **hyper)
        self.schedule = make_schedule(**self.options.schedule_kwargs()) if self.options.schedule == "constant" else None

    def torch_optimizer(self) -> tuple[type, dict[str, Any]]:
        """The ``torch.optim`` class and its keyword arguments besides the parameters and ``lr``."""
        raise NotImplementedError

    def configure(self, *, total_steps: int | None = None) -> None:
        self.schedule = make_schedule(total_steps=total_steps, **self.options.schedule_kwargs())

    def update(self, objective: Objective) -> dict[str, Any]:
        if self.schedule is None:
            self.configure(total_steps=None)  # raises the clear "needs total steps" error
        lr = self.options.lr * self.schedule(self.steps)
        for group in self.inner.param_groups:
            group["lr"] = lr
        self.inner.zero_grad(set_to_none=True)
        loss = objective.backward()
        self.inner.step()
        return {"loss": loss, "lr": lr, **objective.stats()}

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.inner.load_state_dict(state["inner"])


@dataclass(frozen=True)
class SGDOptions(ScheduleOptions):
    lr: float = option(0.05, positive)
    momentum: float = option(0.9, in_range(0, 1))    # heavy-ball momentum
    nesterov: bool = option(False, boolean)          # Nesterov momentum (needs momentum > 0, dampening 0)
    dampening: float = option(0.0, in_range(0, 1))   # torch's dampening of the momentum buffer

    def validate(self) -> None:
        super().validate()
        if self.nesterov and (self.momentum == 0 or self.dampening != 0):
            fail(self.key("nesterov"), self.nesterov, f"needs {self.key('momentum')} > 0 and "
                 f"{self.key('dampening')}=0 (got momentum={self.momentum:g}, dampening={self.dampening:g}).")


class SGD(TorchOptimizer):
    """SGD with (Nesterov) momentum."""

    Options = SGDOptions

    def torch_optimizer(self) -> tuple[type, dict[str, Any]]:
        o = self.options
        return torch.optim.SGD, dict(momentum=o.momentum, nesterov=o.nesterov, dampening=o.dampening)


@dataclass(frozen=True)
class AdamOptions(ScheduleOptions):
    lr: float = option(1e-3, positive)
    betas: list = option([0.9, 0.999], sequence_of(in_range(0, 1, high_open=True), length=2))  # moment decays
    eps: float = option(1e-8, positive)              # added to the denominator
    decoupled: bool = option(False, boolean)         # true: AdamW (decoupled weight decay, torch's own)


class Adam(TorchOptimizer):
    """Adam (Kingma & Ba 2015, "Adam: a method for stochastic optimization"); ``decoupled=true`` gives AdamW."""

    Options = AdamOptions

    @property
    def decays_through_objective(self) -> bool:  # AdamW decays the weights itself
        return not self.options.decoupled

    def torch_optimizer(self) -> tuple[type, dict[str, Any]]:
        o = self.options
        if o.decoupled:
            return torch.optim.AdamW, dict(betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        return torch.optim.Adam, dict(betas=tuple(o.betas), eps=o.eps, weight_decay=0.0)

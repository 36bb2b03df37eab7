"""First-order baselines: torch.optim's SGD and Adam as configurations of the one adapter
(``optimizers.torch_optim.TorchAdapter``), with the shared learning-rate schedules (optimizers/schedules.py).

Weight decay is the library's shared mechanism (grad + eta w, as torch's own coupled ``weight_decay`` computes it);
AdamW's decoupled decay (Loshchilov & Hutter 2019, "Decoupled weight decay regularization") is a different
algorithm and stays torch's.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from optimizers.schedules import ScheduleOptions, Scheduled
from optimizers.torch_optim import TorchAdapter
from validation.checks import boolean, fail, in_range, option, positive, sequence_of


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


class SGD(Scheduled, TorchAdapter):
    """SGD with (Nesterov) momentum: one ``objective.backward()`` and one ``torch.optim.SGD`` update per step."""

    Options = SGDOptions

    def torch_optimizer(self) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
        o = self.options
        return torch.optim.SGD, dict(momentum=o.momentum, nesterov=o.nesterov, dampening=o.dampening)


@dataclass(frozen=True)
class AdamOptions(ScheduleOptions):
    lr: float = option(1e-3, positive)
    betas: list = option([0.9, 0.999], sequence_of(in_range(0, 1, high_open=True), length=2))  # moment decays
    eps: float = option(1e-8, positive)              # added to the denominator
    decoupled: bool = option(False, boolean)         # true: AdamW (decoupled weight decay, torch's own)


class Adam(Scheduled, TorchAdapter):
    """Adam (Kingma & Ba 2015, "Adam: a method for stochastic optimization"); ``decoupled=true`` gives AdamW."""

    Options = AdamOptions

    @property
    def decays_through_objective(self) -> bool:  # AdamW decays the weights itself
        return not self.options.decoupled

    def torch_optimizer(self) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
        o = self.options
        if o.decoupled:
            return torch.optim.AdamW, dict(betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        return torch.optim.Adam, dict(betas=tuple(o.betas), eps=o.eps, weight_decay=0.0)

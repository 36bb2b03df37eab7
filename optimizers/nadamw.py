"""NAdamW, AlgoPerf's baseline ([Dahl2023]; [AlgoPerf-code] algorithms/baselines/external_tuning/
pytorch_nadamw_full_budget.py): Adam with Nesterov momentum [Dozat2016] and decoupled weight decay
[LoshchilovHutter2019], as a configuration of the library's one torch.optim adapter.

    w <- w (1 - lr wd)
    m <- beta1 m + (1 - beta1) g,   v <- beta2 v + (1 - beta2) g^2
    w <- w - lr (beta1 m + (1 - beta1) g) / (1 - beta1^t) / (sqrt(v / (1 - beta2^t)) + eps)

The only difference from AdamW is the Nesterov look-ahead ``beta1 m + (1 - beta1) g`` in place of m.

Why not ``torch.optim.NAdam(decoupled_weight_decay=True)``: torch implements Dozat's NAdam with a momentum schedule
mu_t = beta1 (1 - 0.5 * 0.96^(t * momentum_decay)) (momentum_decay 0.004: mu_t starts at beta1 / 2, is 0.58 beta1
after 1,000 steps and 0.95 beta1 after about 14,000), and even in the limit of that schedule (mu_t = beta1) it divides
the momentum term by 1 - beta1^(t+1) instead of 1 - beta1^t. ``AlgoPerfNAdamW`` below is AlgoPerf's update (it
forms the look-ahead in a new tensor, where AlgoPerf forms it in m and undoes it afterwards, which leaves m off by
rounding);
tests/test_nadamw.py checks it against a float64 transcription of the formula above and against
``torch.optim.NAdam`` in that limit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from optimizers.schedules import ScheduleOptions, Scheduled
from optimizers.torch_optim import TorchAdapter
from validation.checks import boolean, in_range, option, positive, sequence_of


class AlgoPerfNAdamW(torch.optim.Optimizer):
    """AlgoPerf's NAdamW update (module docstring) as a ``torch.optim.Optimizer``."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g, state = p.grad, self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"].item()
                m, v = state["exp_avg"], state["exp_avg_sq"]
                p.mul_(1 - lr * wd)
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                nesterov = m.mul(beta1).add_(g, alpha=1 - beta1)  # AlgoPerf does this in m and undoes it
                denom = (v.sqrt() / (1 - beta2 ** t) ** 0.5).add_(eps)
                p.addcdiv_(nesterov, denom, value=-lr / (1 - beta1 ** t))
        return loss


@dataclass(frozen=True)
class NAdamWOptions(ScheduleOptions):
    lr: float = option(1e-3, positive)               # step size (AlgoPerf baseline's tuned values: 8e-4 to 5e-3)
    betas: list = option([0.9, 0.999], sequence_of(in_range(0, 1, high_open=True), length=2))  # moment decays
    eps: float = option(1e-8, positive)              # added to the denominator (AlgoPerf: 1e-8)
    decoupled: bool = option(True, boolean)          # weight_decay as w <- w (1 - lr wd) (AlgoPerf); false: L2


class NAdamW(Scheduled, TorchAdapter):
    """AlgoPerf's NAdamW through the adapter, with the library's schedules (AlgoPerf: warm-up then cosine)."""

    Options = NAdamWOptions

    @property
    def decays_through_objective(self) -> bool:
        return not self.options.decoupled

    def torch_optimizer(self) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
        o = self.options
        return AlgoPerfNAdamW, dict(betas=tuple(o.betas), eps=o.eps,
                                    weight_decay=o.weight_decay if o.decoupled else 0.0)

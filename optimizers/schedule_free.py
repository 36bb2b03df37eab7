"""Schedule-Free AdamW ([Defazio2024]: "The Road Less Scheduled"), the ``schedulefree`` package's
``AdamWScheduleFree`` through the library's one torch.optim adapter (optimizers/torch_optim.py).

No learning-rate schedule; three sequences instead (Defazio et al. eq. 1, with Adam's normalised gradient):

    y_t = (1 - beta1) z_t + beta1 x_t                  the gradient is taken here (the parameters while training)
    z_{t+1} = z_t - lr_t (g_t / (sqrt(v_t) + eps) + wd y_t)       v_t: Adam's second moment (beta2), bias-corrected
    x_{t+1} = (1 - c_{t+1}) x_t + c_{t+1} z_{t+1}      c = lr_t^2 / sum of lr_i^2 (weight_lr_power 2): an average

x is the point to evaluate and to save. The package keeps the parameters at y and moves them to x with
``optimizer.eval()`` (back with ``optimizer.train()``); this class does it in ``eval_point()``, the library's hook
that runs evaluate and checkpoint inside (runner/state.py), and returns to y by copying the saved y back, so that
evaluating never changes the training trajectory: ``eval()`` then ``train()`` is two interpolations, which do not
give y back to the last bit.

A checkpoint (``state_dict``) holds the package's state (z, v, the averaging weights) plus ``train_point``, y
itself: a runner saves the model at x (inside ``eval_point``) and a resumed run continues from y bit for bit.

Batch norm: the running statistics that training gathers belong to y. The package's README has them recomputed at x
with a few forward passes in training mode before evaluating; the runner does that with
``bn_batches`` training batches (cumulative averages, PreciseBN-style: runner/state.py).

Differences from the authors': none in the update (their code runs as is); the ``eval()``/``train()`` calls are made
for the user, with the exact return to y above; ``decoupled=false`` swaps the package's decay (at y, added to the
normalised gradient) for the library's L2 through the objective.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from optimizers.base import OptimizerOptions, clone_state
from optimizers.torch_optim import TorchAdapter, import_extra
from validation.checks import boolean, in_range, nonnegative, nonnegative_int, option, positive, sequence_of


@dataclass(frozen=True)
class ScheduleFreeOptions(OptimizerOptions):
    lr: float = option(0.0025, positive)             # step size of z (package default; AlgoPerf self-tuning: 0.0025)
    betas: list = option([0.9, 0.999], sequence_of(in_range(0, 1, high_open=True), length=2))  # interpolation, Adam's
    eps: float = option(1e-8, positive)              # added to sqrt(v)
    warmup_steps: int = option(0, nonnegative_int)   # linear warm-up of lr (the package's own; the README advises one)
    r: float = option(0.0, nonnegative)              # averaging weight grows as t^r (0: uniform)
    weight_lr_power: float = option(2.0, nonnegative)  # averaging weight grows as lr_max^power (warm-up)
    decoupled: bool = option(True, boolean)          # weight_decay is the package's (at y); false: the library's L2
    bn_batches: int = option(50, nonnegative_int)    # training batches to recompute batch-norm statistics at x


class ScheduleFreeAdamW(TorchAdapter):
    """``schedulefree.AdamWScheduleFree`` with its train/eval switch made by ``eval_point`` (module docstring)."""

    Options = ScheduleFreeOptions

    def __init__(self, params, **options: Any):
        super().__init__(params, **options)
        self.inner.train()  # the parameters are y from the first step on (no z yet: this only sets the flag)
        self._train_point: list[torch.Tensor] | None = None  # y, while inside eval_point

    @property
    def decays_through_objective(self) -> bool:
        return not self.options.decoupled

    @property
    def eval_point_bn_batches(self) -> int:
        return self.options.bn_batches

    def torch_optimizer(self) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
        schedulefree = import_extra("schedulefree", "optimizer=schedule_free")
        o = self.options
        return schedulefree.AdamWScheduleFree, dict(
            betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay if o.decoupled else 0.0,
            warmup_steps=o.warmup_steps, r=o.r, weight_lr_power=o.weight_lr_power)

    @contextlib.contextmanager
    def eval_point(self) -> Iterator[None]:
        if self._train_point is not None:  # already there
            yield
            return
        self._train_point = [p.detach().clone() for p in self.params]
        self.inner.eval()  # p <- x
        try:
            yield
        finally:
            with torch.no_grad():
                for p, y in zip(self.params, self._train_point):
                    p.copy_(y)  # exactly y (not train()'s interpolation back)
            self._set_train_mode()
            self._train_point = None

    def _set_train_mode(self) -> None:
        for group in self.inner.param_groups:
            group["train_mode"] = True

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        for group in state["inner"]["param_groups"]:
            group["train_mode"] = True  # the state describes y, the point training continues from
        y = self._train_point if self._train_point is not None else [p.detach() for p in self.params]
        return {**state, "train_point": clone_state(y)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            for p, y in zip(self.params, state["train_point"]):
                p.copy_(y)
        self._set_train_mode()

"""L-BFGS (Nocedal & Wright 2006, "Numerical Optimization", Algorithms 7.4-7.5): ``torch.optim.LBFGS`` behind the
step contract, as seed 001 (Veitch, "Second order optimisation methods in deep learning with applications on the
Fashion MNIST dataset") uses scipy's L-BFGS-B.

Seed 001 trains on batches held FIXED throughout training (sec. 3.3, eq. 28): resampling the batch every iteration
breaks the curvature pairs and makes the method stop early. Use it on a full batch or fixed batches. Every function
evaluation inside a step is made on the step's batch with the forward pass's dropout masks and without touching
batch-norm running statistics (``Objective.loss_and_gradient_at``), so the line search sees one deterministic function.
L-BFGS is a configuration of the library's one torch.optim adapter (``optimizers.torch_optim.TorchAdapter``, closure
mode) without a schedule: ``lr`` is the first trial step of each line search.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from optimizers.base import OptimizerOptions
from optimizers.interface import ObjectiveLike
from optimizers.torch_optim import TorchAdapter
from validation.checks import nonnegative, one_of, option, optional, positive, positive_int


@dataclass(frozen=True)
class LBFGSOptions(OptimizerOptions):
    """Defaults follow scipy's L-BFGS-B as used by seed 001 (history 10, strong Wolfe), one iteration per step."""

    lr: float = option(1.0, positive)                  # first trial step of the search (the fixed step without one)
    max_iter: int = option(1, positive_int)            # L-BFGS iterations per step (1: a step is one iteration)
    ls_max_evals: int | None = option(None, optional(positive_int))  # evaluations per step; null = 25 * max_iter
    history_size: int = option(10, positive_int)       # curvature pairs kept (scipy's maxcor = 10; torch: 100)
    tolerance_grad: float = option(1e-7, nonnegative)  # stop the step when max |grad| falls below this
    tolerance_change: float = option(1e-9, nonnegative)  # stop when the loss or step changes less than this
    line_search: str = option("strong_wolfe", one_of("strong_wolfe", "none"))  # none: fixed steps of length lr


class LBFGS(TorchAdapter):
    """One ``step`` runs up to ``max_iter`` L-BFGS iterations on the objective's batch (``torch.optim.LBFGS`` through
    the adapter's closure); the curvature pairs persist across steps.

    Statistics: ``loss`` (before), ``loss_after`` (the objective at the new parameters, same batch and masks),
    ``lbfgs/evals`` (function+gradient evaluations in this step), ``lbfgs/iters``, ``grad_norm`` (at the start).
    """

    Options = LBFGSOptions

    def torch_optimizer(self) -> tuple[type[torch.optim.Optimizer], dict[str, Any]]:
        o = self.options
        # torch's default budget (max_iter * 5/4 evaluations) leaves a one-iteration step no room for a line search:
        # allow up to 25 evaluations per iteration (torch's strong-Wolfe default max_ls).
        return torch.optim.LBFGS, dict(
            max_iter=o.max_iter, max_eval=25 * o.max_iter if o.ls_max_evals is None else o.ls_max_evals,
            tolerance_grad=o.tolerance_grad, tolerance_change=o.tolerance_change, history_size=o.history_size,
            line_search_fn=None if o.line_search == "none" else o.line_search)

    def backward_mode(self, cls: type[torch.optim.Optimizer]) -> str:
        return "closure"

    def _counters(self) -> tuple[int, int]:
        state = self.inner.state[self.inner.param_groups[0]["params"][0]]
        return state.get("func_evals", 0), state.get("n_iter", 0)

    def update(self, objective: ObjectiveLike) -> dict[str, Any]:
        evals0, iters0 = self._counters()
        loss, grad, _ = self.closure_step(objective)
        evals1, iters1 = self._counters()
        loss_after = objective.loss_at(torch.zeros_like(grad))  # same batch and masks, BN statistics untouched
        return {"loss": loss, "loss_after": loss_after, "lbfgs/evals": evals1 - evals0,
                "lbfgs/iters": iters1 - iters0, "grad_norm": grad.norm(), **objective.stats()}

    def gradients_per_step(self) -> tuple[float, str]:
        """A rough cost per step, in gradients (one forward and backward pass over the batch), and how it comes about,
        for the runner's up-front estimate (runner/cost.py)."""
        n = self.options.max_iter
        return 1 + 2 * n, (f"optimizer.max_iter={n} iterations of ~2 function evaluations: ~{1 + 2 * n} gradients per "
                           "step")

"""curvlab's optimiser library: the step contract, the curvature engine (``Objective``) and the methods.

Usable without the runner::

    from optimizers import Objective, HessianFree
    opt = HessianFree(model.parameters())
    for x, y in loader:
        stats = opt.step(Objective(model, "cross_entropy", x, y))
"""
from optimizers.base import Optimizer
from optimizers.first_order import SGD, Adam
from optimizers.losses import CrossEntropy, Loss, SquaredError, get_loss
from optimizers.objective import Objective

__all__ = ["Optimizer", "Objective", "Loss", "CrossEntropy", "SquaredError", "get_loss", "SGD", "Adam"]

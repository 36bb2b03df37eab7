"""curvlab's optimiser library: the step contract, the curvature engine (``Objective``) and the methods.

Usable without the runner::

    from optimizers import Objective, HessianFree
    opt = HessianFree(model.parameters())
    for x, y in loader:
        stats = opt.step(Objective(model, "cross_entropy", x, y))
"""
from optimizers.base import Optimizer
from optimizers.cg import CGResult, pcg
from optimizers.curveball import CurveBall
from optimizers.first_order import SGD, Adam
from optimizers.gd import GradientDescent
from optimizers.gradcheck import finite_difference_check
from optimizers.hf import HessianFree
from optimizers.losses import CrossEntropy, Loss, SquaredError, get_loss
from optimizers.newton import Newton
from optimizers.objective import Objective
from optimizers.quasi_newton import LBFGS, NLCG

__all__ = [
    "Optimizer", "Objective", "Loss", "CrossEntropy", "SquaredError", "get_loss", "pcg", "CGResult",
    "SGD", "Adam", "GradientDescent", "Newton", "HessianFree", "CurveBall", "LBFGS", "NLCG", "finite_difference_check",
]

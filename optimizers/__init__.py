"""curvlab's optimiser library: the step contract, the curvature engine (``Objective``) and the methods.

Usable without the runner::

    from optimizers import Objective, HessianFree
    opt = HessianFree(model.parameters(), damping=10.0)
    for x, y in loader:
        stats = opt.step(Objective(model, "cross_entropy", x, y))

Every method's hyperparameters are a frozen dataclass, ``Method.Options`` (e.g. ``help(HessianFree.Options)``).
What a method may ask of its objective is ``ObjectiveLike`` (optimizers/interface.py); ``Objective``,
``MicroBatchedObjective`` and the weight-decay wrapper ``WeightDecayed`` implement it.
"""
from optimizers.base import Optimizer, OptimizerOptions
from optimizers.cg import CGResult, pcg
from validation.checks import OptionError
from optimizers.curveball import CurveBall
from optimizers.first_order import SGD, Adam
from optimizers.gd import GradientDescent
from optimizers.gradcheck import finite_difference_check
from optimizers.hf import HessianFree
from optimizers.interface import Curvature, ObjectiveLike
from optimizers.kfac import KFAC
from optimizers.lbfgs import LBFGS
from optimizers.losses import CrossEntropy, Loss, SquaredError, get_loss
from optimizers.micro_batch import MicroBatchedObjective
from optimizers.muon import Muon
from optimizers.nadamw import NAdamW
from optimizers.newton import Newton
from optimizers.nlcg import NLCG
from optimizers.objective import Objective
from optimizers.schedule_free import ScheduleFreeAdamW
from optimizers.torch_optim import TorchAdapter, TorchOptim
from optimizers.weight_decay import WeightDecayed

__all__ = [
    "Optimizer", "OptimizerOptions", "OptionError", "ObjectiveLike", "Curvature", "Objective", "MicroBatchedObjective",
    "WeightDecayed", "Loss", "CrossEntropy", "SquaredError", "get_loss", "pcg", "CGResult", "SGD", "Adam",
    "GradientDescent", "Newton", "HessianFree", "CurveBall", "LBFGS", "NLCG", "KFAC", "Muon", "NAdamW", "ScheduleFreeAdamW", "TorchAdapter", "TorchOptim",
    "finite_difference_check",
]

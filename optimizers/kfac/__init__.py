"""K-FAC (Martens & Grosse 2015) with KFC convolutions (Grosse & Martens 2016), on the Objective.

    factors.py         which layers are covered; A and G from hooks on the Objective's forward and backward
    fisher.py          the backward signals of each Fisher type (sampled, empirical, ggn/exact)
    preconditioner.py  moving averages, eigendecompositions, the damped Kronecker inverse of one layer
    optimizer.py       the step: factors, inverses, preconditioning, KL clip, fall-back, momentum, state
"""
from optimizers.kfac.optimizer import KFAC, KFACOptions

__all__ = ["KFAC", "KFACOptions"]

"""The curvature of a batch loss as a symmetric linear operator on flat parameter vectors.

``CurvatureOperator(objective, "hessian")`` multiplies by the Hessian H (Pearlmutter 1994, "Fast exact
multiplication by the Hessian", through ``objective.hvp``); ``"ggn"`` by the generalised Gauss-Newton matrix
G = J^T H_L J (Schraudolph 2002, "Fast curvature matrix-vector products for second-order gradient descent", through
``objective.ggn_vp``). Only the Objective's public products are used, so a data-parallel objective gives reduced
(rank-averaged) products and every rank sees the same operator. ``MatrixOperator`` wraps an explicit symmetric
matrix with the same interface (for small models and for testing the estimators on known matrices).

Both count their products and the seconds spent in them (``products``, ``seconds``; on a GPU each product is
synchronised, which diagnostics can afford and training steps do not pay).
"""
from __future__ import annotations

import time
from typing import Protocol, cast

import torch
from torch import Tensor

from optimizers.interface import Curvature, ObjectiveLike, checked_curvature


class LinearOperator(Protocol):
    """What the estimators need: a symmetric n x n operator on flat vectors, with a product counter."""

    numel: int
    dtype: torch.dtype
    device: torch.device
    products: int

    def matvec(self, v: Tensor) -> Tensor: ...


class _Counted:
    """Product counting and timing shared by the operators."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.products = 0
        self.seconds = 0.0

    def matvec(self, v: Tensor) -> Tensor:
        """A v for a flat vector v (numel,), as a flat vector."""
        if v.shape != (self.numel,):
            raise ValueError(f"matvec: expected a flat vector of {self.numel} entries, got shape {tuple(v.shape)}.")
        t0 = time.perf_counter()
        out = self._product(v)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - t0
        self.products += 1
        return out

    def _product(self, v: Tensor) -> Tensor:
        raise NotImplementedError


class CurvatureOperator(_Counted):
    """H or G of an objective (its ``hvp``/``ggn_vp``, ``params`` and ``numel``) as an operator."""

    def __init__(self, objective: ObjectiveLike, curvature: Curvature = "hessian"):
        checked_curvature(curvature)
        first = objective.params[0]
        super().__init__(first.device)
        self.objective, self.curvature = objective, curvature
        self.numel, self.dtype = int(objective.numel), first.dtype
        self._product_fn = objective.hvp if curvature == "hessian" else objective.ggn_vp

    def _product(self, v: Tensor) -> Tensor:
        return self._product_fn(v.to(self.dtype)).detach()


class MatrixOperator(_Counted):
    """An explicit symmetric matrix A (n, n) as an operator (products are A @ v)."""

    def __init__(self, matrix: Tensor, curvature: str = "matrix"):
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"MatrixOperator: expected a square matrix, got shape {tuple(matrix.shape)}.")
        super().__init__(matrix.device)
        self.matrix, self.curvature = matrix, curvature
        self.numel, self.dtype = matrix.shape[0], matrix.dtype

    def _product(self, v: Tensor) -> Tensor:
        return self.matrix @ v


Source = ObjectiveLike | LinearOperator  # what the estimators take: an objective (with a curvature kind) or an operator


def as_operator(source: Source, curvature: Curvature = "hessian") -> LinearOperator:
    """``source`` itself when it is already an operator (has ``matvec``), else ``CurvatureOperator(source, ...)``."""
    if hasattr(source, "matvec"):
        return cast(LinearOperator, source)
    return CurvatureOperator(cast(ObjectiveLike, source), curvature)

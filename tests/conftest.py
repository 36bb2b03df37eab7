"""Shared test cases: one grid of (model, loss, dtype) that every curvature test runs over, as curvlinops does.

``curvature_case`` gives a model, a batch and a loss name; float64 cases are checked to 1e-10 against the dense
oracles of ``tests/oracles.py``, float32 cases to ``TOL[torch.float32]`` against the same oracles evaluated on a
float64 copy of the model.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor, nn

TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


@dataclass
class Case:
    name: str
    model: nn.Module
    x: Tensor
    y: Tensor
    loss: str
    dtype: torch.dtype

    @property
    def tol(self) -> float:
        return TOL[self.dtype]

    def float64(self) -> Case:
        """The same case in float64 (the oracle's precision)."""
        y = self.y.double() if self.y.is_floating_point() else self.y
        return Case(self.name, copy.deepcopy(self.model).double(), self.x.double(), y, self.loss, torch.float64)


def least_squares(n: int = 8, m: int = 30, seed: int = 0,
                  dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor, Tensor]:
    """Zero-residual linear least squares min_w (1/m) |X w - y|^2, y = X w*^T (a convex quadratic, Hessian condition
    number ~10-20) with its minimiser w* (1, n) known exactly; made in float64, then cast to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, n, generator=g, dtype=torch.float64) @ torch.diag(torch.logspace(0, 0.5, n, dtype=torch.float64))
    w_true = torch.randn(1, n, generator=g, dtype=torch.float64)
    return x.to(dtype), (x @ w_true.T).to(dtype), w_true.to(dtype)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.Tanh(), nn.Linear(7, 4))


def _bn_cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).train()


def make_case(name: str, dtype: torch.dtype = torch.float64) -> Case:
    g = torch.Generator().manual_seed(2)
    if name == "bn-cnn-ce":
        x, y = torch.randn(6, 2, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (6,), generator=g)
        model, loss = _bn_cnn(), "cross_entropy"
    else:
        loss = {"mlp-ce": "cross_entropy", "mlp-mse": "mse", "mlp-sse": "sse"}[name]
        x = torch.randn(9, 12, generator=g, dtype=torch.float64)
        y = torch.randint(0, 4, (9,), generator=g) if loss == "cross_entropy" else torch.randn(9, 4, generator=g,
                                                                                              dtype=torch.float64)
        model = _mlp()
    y = y.to(dtype) if y.is_floating_point() else y
    return Case(name, model.to(dtype), x.to(dtype), y, loss, dtype)


@functools.lru_cache(maxsize=None)
def dense_matrices(name: str, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The float64 oracle GGN and Hessian of ``make_case(name, dtype)`` (computed once per session)."""
    from oracles import dense_ggn, dense_hessian

    ref = make_case(name, dtype).float64()
    return dense_ggn(ref.model, ref.loss, ref.x, ref.y), dense_hessian(ref.model, ref.loss, ref.x, ref.y)


CASE_NAMES = ("mlp-ce", "mlp-mse", "mlp-sse", "bn-cnn-ce")
GRID = [(n, d) for d in (torch.float64, torch.float32) for n in CASE_NAMES]


@pytest.fixture(params=GRID, ids=[f"{n}-{str(d).split('.')[1]}" for n, d in GRID])
def curvature_case(request) -> Case:
    return make_case(*request.param)


@pytest.fixture(params=CASE_NAMES)
def float64_case(request) -> Case:
    return make_case(request.param, torch.float64)

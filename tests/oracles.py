"""Ground truth for the curvature tests, built from torch.func, torch.autograd and torch.nn.functional alone.

Nothing here imports curvlab: the dense matrices are computed from a pure function of one flat parameter vector, so a
bug in the library's products, backends, losses or flattening cannot hide in the oracle too.

Models with random layers (dropout, stochastic depth in train mode): ``seed`` re-seeds the global RNG before every
evaluation of the function (inside ``fork_rng``, so the caller's RNG is left alone), which draws the masks an
objective's forward pass drew right after ``torch.manual_seed(seed)``; second derivatives then come from autograd's
double backward through one forward pass (``torch.func`` transforms would run the network inside ``vmap``, which
refuses random operations). Attention runs through PyTorch's math kernel (the fused kernels have no double backward).
``pieces``: the function of a micro-batched objective, one forward pass per consecutive piece of that many samples
(random layers draw for the pieces in order; batch norm normalises each piece with its own statistics).
"""
from __future__ import annotations

import contextlib
import copy
import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

LOSSES = {
    "cross_entropy": lambda f, y: F.cross_entropy(f, y),
    "mse": lambda f, y: (f - y.view_as(f)).pow(2).mean(),                  # mean over batch and outputs
    "sse": lambda f, y: (f - y.view_as(f)).pow(2).sum(dim=1).mean(),       # sum over outputs, mean over batch
}


def trainable(model: nn.Module) -> tuple[list[str], list[Tensor]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p.detach() for _, p in named]


def flat_params(model: nn.Module) -> Tensor:
    return torch.cat([p.reshape(-1) for p in trainable(model)[1]])


def outputs_fn(model: nn.Module, x: Tensor, seed: int | None = None, pieces: int | None = None):
    """w (flat) -> f (B, o), with copies of the buffers so running statistics stay untouched; ``seed`` and
    ``pieces``: the module docstring."""
    names, params = trainable(model)
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def f(w: Tensor) -> Tensor:
        split, i = {}, 0
        for n, p in zip(names, params):
            split[n] = w[i:i + p.numel()].view_as(p)
            i += p.numel()
        with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
            if seed is not None:
                torch.manual_seed(seed)
            with sdpa_kernel([SDPBackend.MATH]):
                return torch.cat([functional_call(model, {**split, **{k: b.clone() for k, b in buffers.items()}}, (xi,))
                                  for xi in x.split(pieces or x.shape[0])])

    return f


def loss_fn(model: nn.Module, loss: str, x: Tensor, y: Tensor, seed: int | None = None, pieces: int | None = None):
    """w (flat) -> the batch-mean loss (for ``pieces``: the pieces' losses weighted by their sizes, the same mean)."""
    f = outputs_fn(model, x, seed, pieces)
    return lambda w: LOSSES[loss](f(w), y)


def dense_gradient(model: nn.Module, loss: str, x: Tensor, y: Tensor, seed: int | None = None,
                   pieces: int | None = None) -> Tensor:
    w = flat_params(model).requires_grad_(True)
    with torch.enable_grad():
        return torch.autograd.grad(loss_fn(model, loss, x, y, seed, pieces)(w), w)[0]


def dense_hessian(model: nn.Module, loss: str, x: Tensor, y: Tensor, chunk: int = 256, seed: int | None = None,
                  pieces: int | None = None) -> Tensor:
    """(P, P) Hessian of the batch loss, ``chunk`` columns at a time.

    Networks with batch normalisation or random layers (``seed``): rows d(e_i^T g)/dw by autograd's double backward
    through one forward pass. ``torch.func`` is not used for them: in torch 2.14.1 its second derivative through a
    train-mode BatchNorm2d is wrong by about 1 % (checked against central differences of the gradient, which agree
    with autograd to 1e-8), and it refuses random operations inside ``vmap``. Other networks: columns by
    ``torch.func`` forward-over-reverse (jvp of grad), an order of magnitude faster on the simple CNN.
    """
    f, w = loss_fn(model, loss, x, y, seed, pieces), flat_params(model)
    eye = torch.eye(w.numel(), dtype=w.dtype)
    if seed is not None or any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        w = w.requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(f(w), w, create_graph=True)
        rows = [torch.autograd.grad(g, w, eye[i:i + chunk], retain_graph=True, is_grads_batched=True)[0]
                for i in range(0, w.numel(), chunk)]
        return torch.cat(rows).detach()
    column = torch.func.vmap(lambda e: torch.func.jvp(torch.func.grad(f), (w,), (e,))[1])
    return torch.cat([column(eye[i:i + chunk]) for i in range(0, w.numel(), chunk)])


def dense_jacobian(model: nn.Module, x: Tensor, seed: int | None = None, pieces: int | None = None) -> Tensor:
    """(B * o, P) Jacobian of the outputs (reverse mode: one forward pass, so random layers draw once)."""
    w = flat_params(model)
    return torch.func.jacrev(outputs_fn(model, x, seed, pieces))(w).reshape(-1, w.numel())


def dense_ggn(model: nn.Module, loss: str, x: Tensor, y: Tensor, seed: int | None = None,
              pieces: int | None = None) -> Tensor:
    """(P, P) Gauss-Newton matrix J^T H_L J, with H_L the autograd Hessian of the loss in output space."""
    w = flat_params(model)
    f = outputs_fn(model, x, seed, pieces)(w).detach()
    h_l = torch.func.hessian(lambda out: LOSSES[loss](out, y))(f).reshape(f.numel(), f.numel())
    jac = dense_jacobian(model, x, seed, pieces)
    return jac.T @ h_l @ jac


def per_sample_grad_sq_mean(model: nn.Module, loss: str, x: Tensor, y: Tensor) -> Tensor:
    """(1/B) sum_i g_i^2 with g_i the gradient of sample i's loss alone, one sample at a time on a copy of the network
    in eval mode (dropout off, batch norm with its running statistics: a single sample has no batch statistics)."""
    model = copy.deepcopy(model).eval()
    total = torch.zeros_like(flat_params(model))
    for i in range(x.shape[0]):
        w = flat_params(model).requires_grad_(True)
        f = loss_fn(model, loss, x[i:i + 1], y[i:i + 1])
        with torch.enable_grad():
            (g,) = torch.autograd.grad(f(w), w)
        total += g.pow(2)
    return total / x.shape[0]


class DenseObjective:
    """What the curvature diagnostics read of an objective (``params``, ``numel``, ``inputs``, ``loss``, ``gradient``,
    ``loss_at``, ``hvp``, ``ggn_vp``, ``curvature_vp``, ``hessian_matrix``), from the dense matrices and the pure loss function above: running a
    diagnostic on it and on a curvlab objective of the same batch compares the objective against ground truth."""

    l2 = 0.0

    def __init__(self, model: nn.Module, loss: str, x: Tensor, y: Tensor, seed: int | None = None,
                 pieces: int | None = None):
        self.params = trainable(model)[1]
        self.numel = sum(p.numel() for p in self.params)
        self.w = flat_params(model)
        self.inputs = x
        self._loss = loss_fn(model, loss, x, y, seed, pieces)
        self._args = (model, loss, x, y, seed, pieces)
        self.g = dense_gradient(*self._args)

    @functools.cached_property
    def G(self) -> Tensor:
        return dense_ggn(*self._args)

    @functools.cached_property
    def H(self) -> Tensor:
        model, loss, x, y, seed, pieces = self._args
        return dense_hessian(model, loss, x, y, seed=seed, pieces=pieces)

    def loss(self) -> Tensor:
        return self._loss(self.w).detach()

    def loss_at(self, delta: Tensor) -> Tensor:
        return self._loss(self.w + delta).detach()

    def gradient(self, curvature: str | None = None) -> Tensor:
        return self.g

    def hvp(self, v: Tensor) -> Tensor:
        return self.H @ v

    def hessian_matrix(self, chunk_size: int | None = None) -> Tensor:
        return self.H

    def ggn_vp(self, v: Tensor) -> Tensor:
        return self.G @ v

    def curvature_vp(self, v: Tensor, curvature: str = "ggn") -> Tensor:
        return self.ggn_vp(v) if curvature == "ggn" else self.hvp(v)


def rel(a: Tensor, b: Tensor) -> float:
    """Relative error |a - b| / |b|."""
    return ((a - b).norm() / b.norm()).item()

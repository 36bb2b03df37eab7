"""Ground truth for the curvature tests, built from torch.func, torch.autograd and torch.nn.functional alone.

Nothing here imports curvlab: the dense matrices are computed from a pure function of one flat parameter vector, so a
bug in the library's products, backends, losses or flattening cannot hide in the oracle too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

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


def outputs_fn(model: nn.Module, x: Tensor):
    """w (flat) -> f (B, o), with copies of the buffers so running statistics stay untouched."""
    names, params = trainable(model)
    buffers = {n: b.clone() for n, b in model.named_buffers()}

    def f(w: Tensor) -> Tensor:
        split, i = {}, 0
        for n, p in zip(names, params):
            split[n] = w[i:i + p.numel()].view_as(p)
            i += p.numel()
        return functional_call(model, {**split, **{k: b.clone() for k, b in buffers.items()}}, (x,))

    return f


def loss_fn(model: nn.Module, loss: str, x: Tensor, y: Tensor):
    f = outputs_fn(model, x)
    return lambda w: LOSSES[loss](f(w), y)


def dense_gradient(model: nn.Module, loss: str, x: Tensor, y: Tensor) -> Tensor:
    return torch.func.grad(loss_fn(model, loss, x, y))(flat_params(model))


def dense_hessian(model: nn.Module, loss: str, x: Tensor, y: Tensor, chunk: int = 256) -> Tensor:
    """(P, P) Hessian of the batch loss, ``chunk`` columns at a time.

    Networks with batch normalisation: rows d(e_i^T g)/dw by autograd's double backward. ``torch.func`` is not used
    for them: in torch 2.14.1 its second derivative through a train-mode BatchNorm2d is wrong by about 1 % (checked
    against central differences of the gradient, which agree with autograd to 1e-8). Other networks: columns by
    ``torch.func`` forward-over-reverse (jvp of grad), an order of magnitude faster on the simple CNN.
    """
    f, w = loss_fn(model, loss, x, y), flat_params(model)
    eye = torch.eye(w.numel(), dtype=w.dtype)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        w = w.requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(f(w), w, create_graph=True)
        rows = [torch.autograd.grad(g, w, eye[i:i + chunk], retain_graph=True, is_grads_batched=True)[0]
                for i in range(0, w.numel(), chunk)]
        return torch.cat(rows).detach()
    column = torch.func.vmap(lambda e: torch.func.jvp(torch.func.grad(f), (w,), (e,))[1])
    return torch.cat([column(eye[i:i + chunk]) for i in range(0, w.numel(), chunk)])


def dense_jacobian(model: nn.Module, x: Tensor) -> Tensor:
    """(B * o, P) Jacobian of the outputs."""
    w = flat_params(model)
    return torch.func.jacrev(outputs_fn(model, x))(w).reshape(-1, w.numel())


def dense_ggn(model: nn.Module, loss: str, x: Tensor, y: Tensor) -> Tensor:
    """(P, P) Gauss-Newton matrix J^T H_L J, with H_L the autograd Hessian of the loss in output space."""
    w = flat_params(model)
    f = outputs_fn(model, x)(w).detach()
    h_l = torch.func.hessian(lambda out: LOSSES[loss](out, y))(f).reshape(f.numel(), f.numel())
    jac = dense_jacobian(model, x)
    return jac.T @ h_l @ jac


def rel(a: Tensor, b: Tensor) -> float:
    """Relative error |a - b| / |b|."""
    return ((a - b).norm() / b.norm()).item()

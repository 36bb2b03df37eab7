"""The output-space signals K-FAC back-propagates to get G, one set per Fisher type.

Each signal is a (B, o) tensor u whose backward pass J^T u gives per-sample pre-activation vectors g_i with
E over signals of sum g_i g_i^T = the per-sample curvature the type stands for (no 1/B: see factors.py, "Scale of G"):

* ``sampled`` (true Fisher, Martens & Grosse 2015 sec. 5): one label y ~ p(y | f) drawn from the model's predictive
  distribution per sample, u_i = dl_i/df_i at that label. Cross-entropy: y ~ softmax(f); squared error
  l = |f - y|^2 / s (s = o for ``mse``, 1 for ``sse``) is the negative log-likelihood of N(f, s/2 I), so
  y = f + sqrt(s/2) eps. E[u u^T] is the per-sample loss Hessian H_i: an unbiased one-sample estimate of the GGN.
* ``empirical``: the batch's own labels; the signal is the gradient's own backward (no extra pass, nothing here).
* ``ggn`` / ``exact``: the columns of a square root S_i of H_i (H_i = S_i S_i^T), one backward pass per output
  (Botev, Ritter & Barber 2017, Practical Gauss-Newton optimisation for deep learning, sec. 3; KFAC-JAX's
  "exact" estimator). Cross-entropy: H_i = diag(p) - p p^T = sum_k p_k (e_k - p)(e_k - p)^T, so column k is
  sqrt(p_k) (e_k - p); squared error: H_i = (2/s) I, column k is sqrt(2/s) e_k; any other loss: from an
  eigendecomposition of its explicit per-sample blocks. Exact, but costs o backward passes (10 on MNIST): for
  many classes use ``sampled``.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from validation.checks import OptionError
from optimizers.losses import CrossEntropy, Loss, SquaredError

FISHER_TYPES = ("sampled", "empirical", "ggn", "exact")


def _squared_error_scale(loss_fn: SquaredError, outputs: Tensor) -> float:
    """s in l = |f - y|^2 / s: o for ``mse`` (mean over outputs), 1 for ``sse``."""
    return float(outputs.shape[1]) if loss_fn.over_outputs == "mean" else 1.0


def sampled_signal(loss_fn: Loss, outputs: Tensor) -> Tensor:
    """B dL/df at labels drawn from the model's predictive distribution (one per sample), (B, o)."""
    f = outputs.detach()
    if isinstance(loss_fn, CrossEntropy):
        labels = torch.multinomial(torch.softmax(f, dim=1), 1).squeeze(1)
    elif isinstance(loss_fn, SquaredError):
        labels = f + math.sqrt(_squared_error_scale(loss_fn, f) / 2) * torch.randn_like(f)
    else:
        raise OptionError(f"optimizer.fisher=sampled needs a loss with a known predictive distribution "
                          f"(cross_entropy, mse or sse); the loss is {loss_fn.name!r}. Use optimizer.fisher=empirical "
                          "or optimizer.fisher=ggn.")
    return loss_fn.output_grad(f, labels) * f.shape[0]


def hessian_sqrt_signals(loss_fn: Loss, outputs: Tensor, targets: Tensor) -> list[Tensor]:
    """The o columns u_k (B, o) of per-sample square roots S_i of the loss Hessian, sum_k u_k u_k^T = H_i."""
    f = outputs.detach()
    b, o = f.shape
    if isinstance(loss_fn, CrossEntropy):
        p = torch.softmax(f, dim=1)
        eye = torch.eye(o, dtype=f.dtype, device=f.device)
        return [p[:, k:k + 1].sqrt() * (eye[k] - p) for k in range(o)]
    if isinstance(loss_fn, SquaredError):
        column = math.sqrt(2.0 / _squared_error_scale(loss_fn, f))
        return [torch.zeros_like(f).index_fill_(1, torch.tensor([k], device=f.device), column) for k in range(o)]
    h = loss_fn.hessian_blocks(f, targets) * b  # (B, o, o) per-sample blocks (the batch mean's 1/B removed)
    evals, evecs = torch.linalg.eigh(h)
    roots = evecs * evals.clamp_min(0).sqrt().unsqueeze(1)  # S_i = V diag(sqrt(lambda)), (B, o, o)
    return [roots[:, :, k] for k in range(o)]

"""Small synthetic problems with known structure, generated from a seed (float64, held in memory).

Every builder accepts ``root`` and ``download`` for a uniform interface and ignores them. Each draws its test
(held-out) split from the same distribution as its training split, after it, with the same generator.
"""

from __future__ import annotations

import math

import torch

from data.base import Splits, TensorPairDataset
from validation.checks import fail, finite, nonnegative, nonnegative_int, positive_int

DTYPE = torch.float64


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def build_logreg2d(
    root: str | None = None, download: bool = False, *,
    num_train: int = 800, num_test: int = 100, noise: float = 1.0, seed: int = 0,
) -> Splits:
    """[Seed001-Veitch] (sec. 3.1): logistic regression on a hand-made set of 800 labelled points in the plane,
    validated on 100 more. The paper does not say how its points were made; here: two Gaussian blobs, exactly
    balanced, class 0 centred at (-1, -1) and class 1 at (1, 1), each with standard deviation ``noise``. The blobs
    overlap (with noise = 1 the Bayes error is about 8%), so the logistic loss has a finite minimiser.
    """
    noise = nonnegative("dataset.noise", noise)
    g = _generator(nonnegative_int("dataset.seed", seed))

    def draw(n: int) -> TensorPairDataset:
        labels = (torch.arange(n) % 2)[torch.randperm(n, generator=g)]
        centres = (2.0 * labels.to(DTYPE) - 1.0).unsqueeze(1).expand(n, 2)
        points = centres + noise * torch.randn(n, 2, generator=g, dtype=DTYPE)
        return TensorPairDataset(points, labels)

    train = draw(positive_int("dataset.num_train", num_train))
    test = draw(positive_int("dataset.num_test", num_test))
    return Splits("logreg2d", train, test, (2,), 2, "cross_entropy", in_memory=True)


def build_sine(
    root: str | None = None, download: bool = False, *,
    num_samples: int = 2000, num_test: int = 1000, noise: float = 0.1, seed: int = 0,
) -> Splits:
    """[Seed002-Brunn2022] (sec. IV.A, "simple simulated sinus data"): 2,000 samples x_i ~ N(0, 1),
    y_i = sin(x_i) + 0.1 * beta_i with beta_i ~ N(0, 1); squared-error loss. ``noise`` is the 0.1, and the test split
    (not described in the paper) is ``num_test`` fresh samples of the same distribution.
    """
    noise = nonnegative("dataset.noise", noise)
    g = _generator(nonnegative_int("dataset.seed", seed))

    def draw(n: int) -> TensorPairDataset:
        x = torch.randn(n, 1, generator=g, dtype=DTYPE)
        return TensorPairDataset(x, torch.sin(x) + noise * torch.randn(n, 1, generator=g, dtype=DTYPE))

    train = draw(positive_int("dataset.num_samples", num_samples))
    test = draw(positive_int("dataset.num_test", num_test))
    return Splits("sine", train, test, (1,), 1, "mse", in_memory=True)


def rahimi_recht_matrix(x_dim: int, y_dim: int, condition: float, seed: int) -> torch.Tensor:
    """A = U diag(s) V^T of shape (y_dim, x_dim) with random orthonormal U, V and singular values log-spaced from 1
    down to 1 / condition, so that cond(A) = s_max / s_min = condition exactly (up to rounding)."""
    g = _generator(seed)
    k = min(x_dim, y_dim)
    u, _ = torch.linalg.qr(torch.randn(y_dim, k, generator=g, dtype=DTYPE))
    v, _ = torch.linalg.qr(torch.randn(x_dim, k, generator=g, dtype=DTYPE))
    s = torch.logspace(0.0, -math.log10(condition), k, dtype=DTYPE)
    return u @ torch.diag(s) @ v.T


def build_rahimi_recht(
    root: str | None = None, download: bool = False, *, x_dim: int = 6, y_dim: int = 10,
    num_samples: int = 1000, num_test: int = 1000, condition: float = 1e5, seed: int = 0,
) -> Splits:
    """[Seed003-Henriques2019] (sec. 4, Table 1): fit y = A x, with A ill-conditioned (condition number 1e5), by a
    network of two linear layers. The seed gives no sizes; the defaults follow Rahimi & Recht's own example
    ([RahimiRecht2017]: B. Recht, "shallow-linear-net", TwoLayerLinearNets notebook): x in R^6 drawn from N(0, I),
    y in R^10, 1,000 samples.
    """
    x_dim, y_dim = positive_int("dataset.x_dim", x_dim), positive_int("dataset.y_dim", y_dim)
    if not finite("dataset.condition", condition) >= 1:
        fail("dataset.condition", condition, "must be a finite number >= 1 (the condition number of A).")
    seed = nonnegative_int("dataset.seed", seed)
    a = rahimi_recht_matrix(x_dim, y_dim, float(condition), seed)
    g = _generator(seed + 1)  # inputs from a different stream than A's

    def draw(n: int) -> TensorPairDataset:
        x = torch.randn(n, x_dim, generator=g, dtype=DTYPE)
        return TensorPairDataset(x, x @ a.T)

    train = draw(positive_int("dataset.num_samples", num_samples))
    test = draw(positive_int("dataset.num_test", num_test))
    return Splits("rahimi_recht", train, test, (x_dim,), y_dim, "mse", in_memory=True)


def build_rosenbrock(
    root: str | None = None, download: bool = False, *, l1: float = 1.0, l2: float = 1.0,
    num_samples: int = 1000, num_test: int = 100, seed: int = 0,
) -> Splits:
    """[Seed003-Henriques2019] eq. 19 (after [YangDeb2010]), the stochastic Rosenbrock function
    R(u, v) = (1 - u)^2 + 100 eps_i (v - u^2)^2 with one noise sample eps_i ~ U[l1, l2] per evaluation (l1 = l2 = 1 is
    the deterministic function).

    The "inputs" are the noise samples eps (N, 1) and the targets are zeros (N, 2): the model
    (``models.problems.Rosenbrock``) outputs the residuals r = (1 - u, 10 sqrt(eps) (v - u^2)), and the "sse" loss
    (sum over the two outputs, mean over the batch) is the mean of R over the batch's samples.
    """
    l1 = nonnegative("dataset.l1", l1)  # the noise enters as sqrt(eps)
    if not finite("dataset.l2", l2) >= l1:
        fail("dataset.l2", l2, f"must be >= dataset.l1={l1:g}: the noise is drawn from U[l1, l2] "
             "(l1 = l2 = 1 is the deterministic function).")
    l2 = float(l2)
    g = _generator(nonnegative_int("dataset.seed", seed))

    def draw(n: int) -> TensorPairDataset:
        eps = l1 + (l2 - l1) * torch.rand(n, 1, generator=g, dtype=DTYPE)
        return TensorPairDataset(eps, torch.zeros(n, 2, dtype=DTYPE))

    train = draw(positive_int("dataset.num_samples", num_samples))
    test = draw(positive_int("dataset.num_test", num_test))
    return Splits("rosenbrock", train, test, (1,), 2, "sse", in_memory=True)

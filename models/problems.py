"""Small degenerate problems with known solutions ([Seed003-Henriques2019], sec. 4 and Table 1).

Both are written as ordinary ``nn.Module``s so that every optimiser, loss and curvature product in the
project treats them exactly like a network; the matching synthetic datasets live in ``data``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.common import as_shape, check_num_outputs, flat_size
from validation.checks import finite, optional, positive_int, sequence_of

# [Seed003-Henriques2019] does not state its starting point; we use the classic one of [Rosenbrock1960], also the
# standard start of Moré, Garbow & Hillstrom 1981, Testing unconstrained optimization software [More1981], problem 1.
ROSENBROCK_START = (-1.2, 1.0)


class Rosenbrock(nn.Module):
    """Stochastic Rosenbrock function ([Seed003-Henriques2019], eq. 19, after [YangDeb2010]) in residual form.

    Parameters ``xy = (u, v)``; an input row holds one noise sample eps ~ U[l1, l2]. The output holds the
    two residuals r = (1 - u, 10 sqrt(eps) (v - u^2)), so the "sse" loss (mean over the batch of
    sum_k r_k^2) is the batch mean of R(u, v) = (1 - u)^2 + 100 eps (v - u^2)^2, whose minimum is
    R(1, 1) = 0 for every eps >= 0. eps = 1 gives the deterministic Rosenbrock function.
    """

    def __init__(self, init: Sequence[float] = ROSENBROCK_START) -> None:
        super().__init__()
        # float64 so that model.double() keeps the start point exact (-1.2, not -1.2000000477)
        self.xy = nn.Parameter(torch.tensor([float(v) for v in init], dtype=torch.float64))

    def forward(self, eps: torch.Tensor) -> torch.Tensor:
        u, v = self.xy[0], self.xy[1]
        r1 = (1.0 - u).expand(eps.shape[0])
        r2 = 10.0 * torch.sqrt(eps[:, 0]) * (v - u * u)
        return torch.stack((r1, r2), dim=1)


class TwoLayerLinear(nn.Module):
    """y = W2 W1 x, no bias, no activation: the degenerate linear network of [RahimiRecht2017],
    fitted to y = A x with an ill-conditioned A ([Seed003-Henriques2019], sec. 4)."""

    def __init__(self, in_features: int, hidden: int, num_outputs: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(in_features, hidden, bias=False)
        self.w2 = nn.Linear(hidden, num_outputs, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.w1(x.flatten(1)))


def build_rosenbrock(
    input_shape: Sequence[int], num_outputs: int, init: Sequence[float] = ROSENBROCK_START
) -> Rosenbrock:
    """Rosenbrock residual model; needs a dataset of noise samples (input_shape (1,), 2 targets)."""
    shape = as_shape(input_shape)
    if shape != (1,) or num_outputs != 2:
        raise ValueError(
            f"Model 'rosenbrock' got dataset input_shape={shape} and num_outputs={num_outputs}, but it "
            "supports only input_shape=(1,) (one noise sample eps per row) and num_outputs=2 (the two "
            "residuals of eq. 19 in [Seed003-Henriques2019], REFERENCES.md). Use it with the Rosenbrock noise dataset "
            "and the sse loss."
        )
    return Rosenbrock(sequence_of(finite, length=2)("model.init", init))  # the start point [u, v]


def build_two_layer_linear(
    input_shape: Sequence[int], num_outputs: int, hidden: int | None = None
) -> TwoLayerLinear:
    """W2 W1 x with hidden width ``hidden`` (default: the input dimension, as in Rahimi & Recht)."""
    in_features = flat_size(input_shape)
    width = optional(positive_int)("model.hidden", hidden)
    return TwoLayerLinear(
        in_features, in_features if width is None else width, check_num_outputs("two_layer_linear", num_outputs)
    )

"""Fully-connected networks: flatten -> [Linear -> activation] * len(hidden) -> Linear.

One builder covers the MLPs of the seeds (see conf/model/mlp*.yaml; keys in REFERENCES.md): logistic regression (no
hidden layer, [Seed001-Veitch]), 784-800-10 ReLU and 1-15-15-1 ReLU sine regression ([Seed002-Brunn2022]), 128-64-32-10
tanh ([Seed003-Henriques2019]), linear-ReLU-linear ([Seed004-Wang]) and 1-/2-hidden-layer nets ([Seed001-Veitch]).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.common import check_num_outputs, flat_size, make_activation
from validation.checks import boolean, positive_int, sequence_of


class MLP(nn.Module):
    def __init__(
        self, in_features: int, hidden: Sequence[int], num_outputs: int, activation: str, bias: bool
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h, bias=bias), make_activation(activation)]
            width = h
        layers.append(nn.Linear(width, num_outputs, bias=bias))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


def build_mlp(
    input_shape: Sequence[int],
    num_outputs: int,
    hidden: Sequence[int] = (128,),
    activation: str = "relu",
    bias: bool = True,
) -> MLP:
    """An MLP on the flattened input. ``hidden=[]`` gives a linear (logistic-regression) model."""
    widths = sequence_of(positive_int)("model.hidden", hidden)  # layer widths; [] = no hidden layer
    make_activation(activation)  # validates the name even when there is no hidden layer
    return MLP(
        flat_size(input_shape),
        widths,
        check_num_outputs("mlp", num_outputs),
        activation,
        boolean("model.bias", bias),
    )

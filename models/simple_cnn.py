"""The 3,192-parameter "simple CNN" of [Seed000-Thesis] (sec. 10.1), with its Xavier-like initialisation (ch. 11).

Layout ([Seed000-Thesis], sec. 10.1): a 28x28 greyscale image -> 4x4 convolution, one filter, stride 1, "same"
padding, ReLU -> flatten to 784 -> right-multiply by W1 (784x4), sigmoid -> W2 (4x10) -> softmax (applied
by the cross-entropy loss, not here). No biases: 4*4 + 784*4 + 4*10 = 16 + 3136 + 40 = 3192 parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.common import as_shape, check_num_outputs

INPUT_SHAPE = (1, 28, 28)

# "Same" padding for an even 4x4 kernel needs 3 pixels per axis. The thesis was implemented in
# TensorFlow ([Seed000-Thesis], sec. 9.1 and ch. 13), whose "SAME" rule puts the odd pixel after the image:
# 1 before, 2 after. F.pad order is (left, right, top, bottom).
SAME_PAD_4x4 = (1, 2, 1, 2)


class SimpleCNN(nn.Module):
    def __init__(self, num_outputs: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, kernel_size=4, stride=1, bias=False)
        self.fc1 = nn.Linear(28 * 28, 4, bias=False)
        self.fc2 = nn.Linear(4, num_outputs, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # [Seed000-Thesis], ch. 11 ("Xavier-inspired initialisation"): W_j ~ N(0, sqrt(2 / (n_in + n_out))),
        # j = 1..3, read as mean 0 and standard deviation sqrt(2 / (fan_in + fan_out)); this is exactly
        # Glorot-normal ([GlorotBengio2010]). For the 4x4 filter fan_in = fan_out = 16 (receptive field x channels).
        for weight in (self.conv.weight, self.fc1.weight, self.fc2.weight):
            nn.init.xavier_normal_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(F.pad(x, SAME_PAD_4x4)))
        h = torch.sigmoid(self.fc1(h.flatten(1)))
        return self.fc2(h)


def build_simple_cnn(input_shape: Sequence[int], num_outputs: int) -> SimpleCNN:
    """The seed-000 simple CNN; only defined for 1x28x28 inputs (W1 is 784x4)."""
    shape = as_shape(input_shape)
    if shape != INPUT_SHAPE:
        raise ValueError(
            f"Model 'simple_cnn' got dataset input_shape={shape}, but it supports only {INPUT_SHAPE} "
            "(28x28 greyscale images such as MNIST or Fashion-MNIST): its first dense layer is 784x4 as "
            "in [Seed000-Thesis], sec. 10.1. Use dataset=mnist / fashion_mnist, or a model such as mlp or "
            "cifar_basic_cnn for other inputs."
        )
    return SimpleCNN(check_num_outputs("simple_cnn", num_outputs))

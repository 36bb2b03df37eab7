"""The basic 5-layer CIFAR CNN of [Seed003-Henriques2019] (footnote 5), with or without batch normalisation.

[Seed003-Henriques2019], footnote 5: "5x5 filters and ReLU activations, and 3x3 max-pooling layers (with stride 2) after
each of the first 3 convolutions. The number of output channels are, respectively, (32, 32, 64, 64, 10)."
The footnote leaves padding and the last two kernels open; we follow the authors' MatConvNet/autonn
``BasicCifarNet`` (used by their CurveBall code, [CurveBall-code]):

    conv 5x5/32 pad 2 -> [BN] -> ReLU -> maxpool 3/2 pad 1      32x32 -> 16x16
    conv 5x5/32 pad 2 -> [BN] -> ReLU -> maxpool 3/2 pad 1      16x16 ->  8x8
    conv 5x5/64 pad 2 -> [BN] -> ReLU -> maxpool 3/2 pad 1       8x8  ->  4x4
    conv 4x4/64 valid -> [BN] -> ReLU                            4x4  ->  1x1
    conv 1x1/num_outputs                                         logits

Differences from that code, on purpose: all three pools are max-pools as the footnote says (autonn uses
average pooling for the 2nd and 3rd), and convolutions followed by BN have no bias (it would be an exactly
flat direction of the loss, i.e. a zero eigenvalue of the Hessian). The fourth convolution covers the
whole remaining feature map, i.e. it is a fully-connected layer; its kernel is 4x4 for 32x32 inputs (the
published network) and adapts to other image sizes (28x28 MNIST also ends at 4x4).

Parameters for (3, 32, 32) inputs and 10 classes: 2,432 + 25,632 + 51,264 + 65,600 + 650 = 145,578;
with BN the 192 conv biases are replaced by 2 * 192 BN scales/shifts: 145,770.

``dropout`` ([Seed003-Henriques2019], Table 2, reports validation errors with dropout rate 0.3) is applied before the
two fully-connected-style convolutions, as the authors' ``vggf_dropout`` [CurveBall-code] does before VGG-f's last two
layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.common import check_num_outputs, require_image
from validation.checks import boolean, in_range

CHANNELS = (32, 32, 64, 64)


def _pooled(size: int) -> int:
    """Output size of MaxPool2d(kernel_size=3, stride=2, padding=1)."""
    return (size + 2 * 1 - 3) // 2 + 1


def _conv_block(
    in_ch: int, out_ch: int, kernel: int | tuple[int, int], padding: int, batch_norm: bool
) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel, padding=padding, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_ch))
    layers.append(nn.ReLU())
    return layers


class BasicCNN(nn.Module):
    def __init__(
        self, input_shape: tuple[int, int, int], num_outputs: int, batch_norm: bool, dropout: float
    ) -> None:
        super().__init__()
        in_ch, h, w = input_shape
        c1, c2, c3, c4 = CHANNELS
        layers: list[nn.Module] = []
        for cin, cout in ((in_ch, c1), (c1, c2), (c2, c3)):
            layers += _conv_block(cin, cout, 5, 2, batch_norm)
            layers.append(nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
            h, w = _pooled(h), _pooled(w)
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += _conv_block(c3, c4, (h, w), 0, batch_norm)
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += [nn.Conv2d(c4, num_outputs, 1), nn.Flatten(1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_cifar_basic_cnn(
    input_shape: Sequence[int], num_outputs: int, batch_norm: bool = False, dropout: float = 0.0
) -> BasicCNN:
    """[Seed003-Henriques2019]'s basic CNN for (C, H, W) images; the published network is the (3, 32, 32) case."""
    shape = require_image(
        "cifar_basic_cnn", input_shape, "images of shape (C, H, W), e.g. CIFAR-10's (3, 32, 32)"
    )
    rate = in_range(0.0, 1.0, high_open=True)("model.dropout", dropout)  # 0 disables dropout
    return BasicCNN(
        shape, check_num_outputs("cifar_basic_cnn", num_outputs), boolean("model.batch_norm", batch_norm), rate
    )

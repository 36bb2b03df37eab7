"""VGG-f ("fast") of Chatfield et al. 2014, "Return of the Devil in the Details" (BMVC 2014) [Chatfield2014].

[Seed003-Henriques2019] trains it on ImageNet and ImageNet-100 (Table 2). Layout for a 224x224 input:

    conv 11x11/64 stride 4 -> ReLU -> LRN -> maxpool 3/2      224 -> 54 -> 27
    conv 5x5/256 pad 2     -> ReLU -> LRN -> maxpool 3/2       27 -> 27 -> 13
    conv 3x3/256 pad 1 -> ReLU  (x3)      -> maxpool 3/2       13 -> 13 ->  6
    fc 6*6*256 -> 4096 -> ReLU [-> dropout]
    fc 4096 -> 4096    -> ReLU [-> dropout]
    fc 4096 -> num_outputs

Pooling uses ceil mode (Caffe's convention; MatConvNet's VGG-f pads the first pool by one pixel on the
bottom/right instead): both give 27/13/6 for 224x224 inputs. LRN: 5 channels, alpha = 1e-4 (torch divides
it by the window, i.e. 2e-5 per channel as in MatConvNet's [5 1 0.0001/5 0.75]), beta = 0.75, k = 1.

No adaptive pooling: the first fc layer takes whatever map the convolutions leave (6x6 at 224 px, as the
6x6 "fc6" convolution of the original), so images of other sizes work as long as they are at least
``min_input_size()`` pixels. ``batch_norm=True`` is the variant the seed-003 authors' code trains
(autonn ``VGG8('batchNorm', true)``): BN after every conv/fc except the last, and no LRN.
``dropout``: [Chatfield2014] use 0.5; [Seed003-Henriques2019] reports results with 0.3 in brackets; default 0.
Initialisation follows torchvision's VGG (Kaiming-normal convolutions, N(0, 0.01) fc layers, zero bias).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from models.common import check_num_outputs, require_image
from validation.checks import boolean, in_range

FC_WIDTH = 4096


def _pool(n: int) -> int:
    """MaxPool2d(3, stride=2, ceil_mode=True) output size (needs n >= 3)."""
    return -(-(n - 3) // 2) + 1


def feature_size(n: int) -> int:
    """Side of the last feature map for an input side ``n``; 0 if the image is too small."""
    if n < 11:
        return 0
    n = (n - 11) // 4 + 1  # conv1, stride 4
    for _ in range(3):  # conv2 and conv3-5 keep the size; three pools shrink it
        if n < 3:
            return 0
        n = _pool(n)
    return n


def min_input_size() -> int:
    """Smallest image side VGG-f accepts."""
    return next(n for n in range(11, 1000) if feature_size(n) > 0)


def _maybe_norm(batch_norm: bool, channels: int, dim: int) -> list[nn.Module]:
    if not batch_norm:
        return []
    return [nn.BatchNorm2d(channels) if dim == 2 else nn.BatchNorm1d(channels)]


class VGGF(nn.Module):
    def __init__(
        self, input_shape: tuple[int, int, int], num_outputs: int, batch_norm: bool, dropout: float
    ) -> None:
        super().__init__()
        in_ch, h, w = input_shape
        bias = not batch_norm

        def lrn() -> list[nn.Module]:
            return [] if batch_norm else [nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0)]

        def pool() -> nn.Module:
            return nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)

        def conv(cin: int, cout: int, k: int, stride: int = 1, pad: int = 0) -> list[nn.Module]:
            layer = nn.Conv2d(cin, cout, k, stride=stride, padding=pad, bias=bias)
            return [layer, *_maybe_norm(batch_norm, cout, 2), nn.ReLU()]

        def fc(fin: int, fout: int) -> list[nn.Module]:
            drop = [nn.Dropout(dropout)] if dropout > 0 else []
            return [nn.Linear(fin, fout, bias=bias), *_maybe_norm(batch_norm, fout, 1), nn.ReLU(), *drop]

        self.features = nn.Sequential(
            *conv(in_ch, 64, 11, stride=4), *lrn(), pool(),
            *conv(64, 256, 5, pad=2), *lrn(), pool(),
            *conv(256, 256, 3, pad=1), *conv(256, 256, 3, pad=1), *conv(256, 256, 3, pad=1), pool(),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            *fc(256 * feature_size(h) * feature_size(w), FC_WIDTH),
            *fc(FC_WIDTH, FC_WIDTH),
            nn.Linear(FC_WIDTH, num_outputs),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
            if isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def build_vgg_f(
    input_shape: Sequence[int], num_outputs: int, batch_norm: bool = False, dropout: float = 0.0
) -> VGGF:
    """VGG-f for (C, H, W) images of at least ``min_input_size()`` pixels per side."""
    shape = require_image("vgg_f", input_shape, "images of shape (C, H, W), e.g. ImageNet's (3, 224, 224)")
    if feature_size(shape[1]) == 0 or feature_size(shape[2]) == 0:
        raise ValueError(
            f"Model 'vgg_f' got dataset input_shape={shape}, but it supports only images of at least "
            f"{min_input_size()}x{min_input_size()} pixels (it was designed for 224x224 ImageNet crops; "
            "its stride-4 first layer and three poolings shrink smaller images to nothing). "
            "For CIFAR-sized images use model=cifar_basic_cnn or model=resnet18."
        )
    rate = in_range(0.0, 1.0, high_open=True)("model.dropout", dropout)  # 0 disables dropout
    return VGGF(shape, check_num_outputs("vgg_f", num_outputs), boolean("model.batch_norm", batch_norm), rate)

"""torchvision ResNet-18 / ResNet-50 (He et al. 2016, Deep residual learning for image recognition [He2016]), randomly
initialised or from a local state_dict.

ResNet-18 on CIFAR-10 is the large CIFAR model of [Seed003-Henriques2019] (Table 2); ResNet-50 on ImageNet is
[Seed000-Thesis]'s (sec. 10.2). For small images (<= 64 px) the usual CIFAR stem is used by default: conv1 becomes a 3x3
stride-1 convolution and the stem max-pool is dropped, so a 32x32 image reaches the last stage at 4x4
instead of 1x1. Inputs with other than 3 channels get a matching conv1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from torchvision.models import ResNet, resnet18, resnet50

from models.common import check_num_outputs, disable_inplace, require_image

CIFAR_STEM_MAX_PX = 64


def _build_resnet(
    name: str,
    factory: Callable[..., ResNet],
    input_shape: Sequence[int],
    num_outputs: int,
    cifar_stem: bool | None,
    weights_path: str | None,
) -> ResNet:
    in_ch, h, w = require_image(name, input_shape, "images of shape (C, H, W)")
    model = factory(weights=None, num_classes=check_num_outputs(name, num_outputs))
    if cifar_stem is None:
        cifar_stem = max(h, w) <= CIFAR_STEM_MAX_PX
    if cifar_stem:
        model.conv1 = nn.Conv2d(in_ch, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_ch != 3:
        model.conv1 = nn.Conv2d(in_ch, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if cifar_stem or in_ch != 3:  # same initialisation torchvision gives its own convolutions
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    disable_inplace(model)
    if weights_path is not None:
        _load_state_dict(name, model, weights_path)
    return model


def _load_state_dict(name: str, model: nn.Module, weights_path: str) -> None:
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"Model '{name}': weights_path={weights_path!r} does not exist. Give the path of a local "
            "state_dict file saved with torch.save(model.state_dict(), path), or weights_path=null."
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(
            f"Model '{name}': the state_dict in weights_path={weights_path!r} does not fit the model "
            "built for this dataset (check num_outputs, input channels and cifar_stem). "
            f"torch says: {err}"
        ) from err


def build_resnet18(
    input_shape: Sequence[int],
    num_outputs: int,
    cifar_stem: bool | None = None,
    weights_path: str | None = None,
) -> ResNet:
    """ResNet-18; ``cifar_stem=None`` means: CIFAR stem when the image is at most 64 px."""
    return _build_resnet("resnet18", resnet18, input_shape, num_outputs, cifar_stem, weights_path)


def build_resnet50(
    input_shape: Sequence[int],
    num_outputs: int,
    cifar_stem: bool | None = None,
    weights_path: str | None = None,
) -> ResNet:
    """ResNet-50; ``cifar_stem=None`` means: CIFAR stem when the image is at most 64 px."""
    return _build_resnet("resnet50", resnet50, input_shape, num_outputs, cifar_stem, weights_path)

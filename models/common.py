"""Small helpers shared by the model builders: input-shape checks, activations, in-place switch-off.

Every builder has the signature ``build_<x>(input_shape, num_outputs, **options) -> nn.Module``; the
dataset supplies ``input_shape`` (without the batch dimension) and ``num_outputs``. The options are typed
keyword arguments: the runner checks the keys and types of the ``model`` group against the annotations
(``validation.checks.check_call``) before it calls the builder, and the builder checks value ranges with the
same shared checks, naming the key as typed (``model.hidden[0]=0 must be an integer >= 1.``). The helpers
below turn an impossible model/dataset combination into a readable ``ValueError`` before torch can fail on
shapes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from validation.checks import OptionError, one_of, positive_int

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "identity": nn.Identity,
}


def as_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    """Normalise a list / tuple / OmegaConf ListConfig of ints to a tuple of ints."""
    return tuple(int(s) for s in input_shape)


def check_num_outputs(model: str, num_outputs: int) -> int:
    """``num_outputs`` must be a positive int (it comes from the dataset, not from a config key)."""
    try:
        return positive_int("num_outputs", num_outputs)
    except OptionError:
        raise ValueError(
            f"Model '{model}' got num_outputs={num_outputs!r}, but it needs a positive integer "
            "(the number of classes or regression targets, taken from the dataset)."
        ) from None


def flat_size(input_shape: Sequence[int]) -> int:
    """Number of input features once an example is flattened."""
    return math.prod(as_shape(input_shape))


def require_image(model: str, input_shape: Sequence[int], supports: str) -> tuple[int, int, int]:
    """Return ``(C, H, W)`` or raise if the dataset does not deliver images."""
    shape = as_shape(input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(
            f"Model '{model}' got dataset input_shape={shape}, but it supports {supports}. "
            "Choose an image dataset (e.g. dataset=mnist or dataset=cifar10) or a model that flattens "
            "its input (e.g. model=mlp)."
        )
    return shape  # type: ignore[return-value]


def make_activation(name: str, key: str = "model.activation") -> nn.Module:
    """A fresh activation module (never in-place: curvature code differentiates twice); ``key`` names the option."""
    return ACTIVATIONS[one_of(*ACTIVATIONS)(key, name)]()


def disable_inplace(module: nn.Module) -> nn.Module:
    """Switch off ``inplace=True`` everywhere (torchvision/timm use it for ReLU and dropout).

    In-place activations overwrite tensors that double backward and forward-mode AD (Hessian- and
    GGN-vector products) may still need, so the curvature code expects out-of-place layers.
    """
    for sub in module.modules():
        if isinstance(getattr(sub, "inplace", None), bool):
            sub.inplace = False
    return module


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)

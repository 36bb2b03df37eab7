"""Any timm architecture by name, randomly initialised (no downloads: there is no internet)."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import timm
from torch import nn

from models.common import check_num_outputs, disable_inplace, require_image
from validation.checks import fail


def build_timm(input_shape: Sequence[int], num_outputs: int, name: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, pretrained=False, ...)``; extra options go to create_model."""
    in_ch, _, _ = require_image(f"timm:{name}", input_shape, "images of shape (C, H, W)")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"Close matches: {', '.join(close)}." if close else "No close match found."
        fail("model.name", name, f"is not a timm architecture. {hint} List the valid names with "
             "`python -c \"import timm; print(timm.list_models())\"` and set e.g. model.name=resnet18.")
    model = timm.create_model(
        name,
        pretrained=False,
        num_classes=check_num_outputs(f"timm:{name}", num_outputs),
        in_chans=in_ch,
        **kwargs,
    )
    return disable_inplace(model)

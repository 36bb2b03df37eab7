"""How the model's forward pass computes: bf16 autocast (mixed precision) and channels-last memory.

    from optimizers.precision import set_execution
    set_execution(model, precision="bf16", channels_last=True)    # once, after model.to(device)
    opt.step(Objective(model, "cross_entropy", x, y))             # every forward of the model now runs as set

Both settings belong to the model, not to a batch: ``set_execution`` replaces ``forward`` on the model instance
(the class stays untouched, so ``named_parameters``, ``state_dict``, checkpoints and hooks are exactly the model's)
by one that

* with ``channels_last``: hands 4-D inputs to the network in channels-last memory (N, H, W, C strides); the 4-D
  parameters (convolution filters) are converted once by ``set_execution``. The arithmetic is the same: every output
  equals the contiguous network's to float32 round-off (the kernels sum in another order).
* with ``precision="bf16"``: runs the network under ``torch.autocast(device_type, dtype=torch.bfloat16)`` and casts
  its output back to the parameters' dtype (float32). Everything the Objective builds on the model therefore sees it:
  the batch's forward pass, trial points, curvature sub-batches, forward-mode tangents (J v), the graph that J^T w
  and the double-backward products differentiate, evaluation. In bf16 run the ops on autocast's lower-precision list
  (linear, matmul, convolutions, their tangents and their backward: autograd runs each backward op in the dtype of its
  forward op); float32 are the parameters, the network's output, the loss and its output-space derivatives (g_f,
  H_L u), the flat parameter vectors (gradients, G v, H v, CG vectors, CurveBall's z, Adam's moments) and K-FAC's
  factors (``optimizers.kfac.factors`` casts the recorded activations and output gradients before multiplying).

Backward passes are not wrapped in autocast (PyTorch's advice: "backward ops run in the same type that autocast used
for corresponding forward ops"). bf16 keeps 8 significand bits (7 stored; unit round-off u = 2^-8 ~ 3.9e-3, float32's
is 2^-24 ~ 6e-8), so a bf16 run tracks the float32 one to a few u relative, not to float32 round-off
(tests/test_compiled.py derives its tolerances). ``float64`` parameters are refused with bf16: mixed precision starts from float32.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from validation.checks import OptionError, boolean, one_of

log = logging.getLogger("curvlab")

PRECISIONS = {"float32": None, "bf16": torch.bfloat16}  # the config's name -> autocast dtype (None: no autocast)


@dataclass(frozen=True)
class Execution:
    """How the model's forward pass runs (the model's ``_curvlab_execution``; see the module docstring)."""

    precision: str = "float32"   # float32 | bf16
    channels_last: bool = False  # 4-D inputs and convolution filters in channels-last memory

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return PRECISIONS[self.precision]


def set_execution(model: nn.Module, *, precision: str = "float32", channels_last: bool = False,
                  precision_key: str = "precision", channels_last_key: str = "channels_last") -> dict[str, Any]:
    """Make every forward pass of ``model`` run in ``precision`` and, for a convolutional network, in channels-last
    memory. Call it once, after ``model.to(device, dtype)``; ``precision="float32"``, ``channels_last=False`` undo it.

    Returns the record a run keeps in its metadata (what was requested and what it does on this model). Raises
    OptionError, naming the keys as given by ``precision_key`` / ``channels_last_key``, for a precision that is not
    one of ``PRECISIONS``, and for bf16 with float64 parameters. ``channels_last`` on a model without a 2-D
    convolution changes nothing (there is no 4-D tensor to lay out): it is accepted, logged at INFO and recorded as
    ``channels_last_applied: false``, so that one setting can serve a sweep over MLPs and CNNs.
    """
    precision = one_of(*PRECISIONS)(precision_key, precision)
    channels_last = boolean(channels_last_key, channels_last)
    dtypes = {p.dtype for p in model.parameters()}
    if precision != "float32" and torch.float64 in dtypes:
        raise OptionError(
            f"{precision_key}={precision} cannot be combined with float64 parameters (dtype=float64): bf16 autocast "
            f"is mixed precision around float32 parameters. Use dtype=float32 with {precision_key}={precision}, or "
            f"{precision_key}=float32 for a float64 run.")
    convolutional = any(isinstance(m, nn.Conv2d) for m in model.modules())
    applied = channels_last and convolutional
    if channels_last and not convolutional:
        log.info(f"{channels_last_key}=true: the model has no 2-D convolution, so there is nothing to lay out in "
                 "channels-last memory; it runs as it is.")
    model.to(memory_format=torch.channels_last if applied else torch.contiguous_format)
    execution = Execution(precision, applied)
    if execution == Execution():
        model.__dict__.pop("forward", None)  # the class's own forward again
        model.__dict__.pop("_curvlab_execution", None)
    else:
        object.__setattr__(model, "_curvlab_execution", execution)
        model.forward = types.MethodType(_forward, model)
    devices = {p.device.type for p in model.parameters()}
    return {"precision": precision, "autocast_dtype": str(execution.autocast_dtype).replace("torch.", "")
            if execution.autocast_dtype else None, "channels_last": channels_last, "channels_last_applied": applied,
            "device_type": devices.pop() if len(devices) == 1 else sorted(devices)}


_AUTOCAST_OFF = contextvars.ContextVar("curvlab_autocast_off", default=False)


@contextlib.contextmanager
def without_autocast() -> Iterator[None]:
    """Inside the block the model's forward runs in its parameters' dtype, bf16 setting or not (for the per-sample
    gradients of HF's preconditioner: torch.vmap's batch-norm rule does not mix bf16 inputs with float32 statistics)."""
    token = _AUTOCAST_OFF.set(True)
    try:
        yield
    finally:
        _AUTOCAST_OFF.reset(token)


def execution_of(model: nn.Module) -> Execution:
    """The model's execution settings (the defaults when ``set_execution`` was never called)."""
    return model.__dict__.get("_curvlab_execution", Execution())


def _forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The model's forward under its execution settings (installed on the instance by ``set_execution``)."""
    execution: Execution = self._curvlab_execution
    if execution.channels_last:  # not inside torch.vmap (per-sample gradients): it cannot re-lay out a batched tensor
        args = tuple(a.contiguous(memory_format=torch.channels_last) if isinstance(a, Tensor) and a.dim() == 4
                     and not _vmapped(a) else a for a in args)
    dtype = execution.autocast_dtype
    if dtype is None or _AUTOCAST_OFF.get():
        return type(self).forward(self, *args, **kwargs)
    device = next((a.device.type for a in args if isinstance(a, Tensor)), "cpu")
    with torch.autocast(device, dtype=dtype):
        out = type(self).forward(self, *args, **kwargs)
    return _to_float32(out)


def _vmapped(t: Tensor) -> bool:
    """``t`` is (or wraps) a torch.vmap batched tensor: looks through torch.func's gradient wrappers."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


def _to_float32(out: Any) -> Any:
    """The network's output (a tensor, or tuples/lists/dicts of them) in float32, the dtype of the loss and of
    everything computed in output space."""
    if isinstance(out, Tensor):
        return out.float() if out.is_floating_point() and out.dtype != torch.float64 else out
    if isinstance(out, (tuple, list)):
        return type(out)(_to_float32(o) for o in out)
    if isinstance(out, dict):
        return {k: _to_float32(v) for k, v in out.items()}
    return out

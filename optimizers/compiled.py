"""``objective.compile=true``: the model's forward and the curvature products through ``torch.compile``.

What is compiled (``Objective(..., compile=True)``):

* the first-order path, ``Objective.backward()`` (the whole step of SGD, Adam, Muon, ...): the batch's forward pass
  runs through ``compiled_forward(model)`` and its backward through the graph AOTAutograd compiled with it. While a
  module of the model has hooks (K-FAC's factor hooks, the per-sample capture of HF's preconditioner) that forward
  stays the model's own: hooks must see the eager layers' inputs and outputs.
* J v and G v = J^T H_L J v on the curvature batch: the ``Compiled`` Jacobian backend, which the Objective uses in
  place of ``objective.ggn_backend`` (``auto`` is the only value accepted with compile; an explicit backend is
  refused, naming the alternative). Both are ``torch.func`` transforms of ``functional_call`` compiled as a whole:
  J v = ``torch.func.jvp`` (under bf16 autocast the vjp of J^T u, as below: forward-mode
  torch.func through batch norm under autocast fails in torch 2.14); G v in ONE forward pass: (f, vjp) = ``torch.func.vjp``, J v as the vjp of that vjp (the
  double-backward trick, Pearlmutter 1994), then J^T (H_L J v) with the closed-form H_L of the loss. One forward per
  product means one draw of the dropout masks, which ``replay_rng`` makes the batch's.

What stays eager: the batch's own forward pass on the second-order path (its graph is differentiated twice:
AOTAutograd does not support double backward or forward-mode AD through a compiled graph), J^T w (one backward
through that graph: compiling it would add a forward pass), the Hessian products (``objective.hvp_backend``), trial
losses, per-sample gradients. A method that picks a backend for a product itself (CurveBall's J dz on its kept J^T u
graph, its J z fused into the forward) keeps it.

Exactness. Inductor fuses and reorders floating-point operations, so compiled products equal the eager ones to
float32 round-off (a few 1e-7 relative), not bit for bit. Random numbers: with ``fallback_random`` inductor draws them
with ATen's own operators from the global generator, in program order, exactly as eager does (measured: the same
dropout masks and the same generator state afterwards), so ``replay_rng`` redraws the batch's masks inside compiled
code too; batch-norm statistics are computed on copies of the buffers, which stay untouched.

Compilation is cached by torch per function and input signature (``dynamic=False``): models of the same structure
share one graph, and a new batch shape compiles once more (the last, shorter batch of an epoch; ``drop_last=true``
avoids it; a curvature sub-batch has its own shape). torch's recompile limit (``torch._dynamo.config.recompile_limit``,
8 per function) bounds the count; beyond it torch runs the function eagerly and warns.
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from optimizers.backends import CurvatureBatch, JacobianBackend
from optimizers.functional import FunctionalModel, differentiable_twice
from optimizers.losses import CrossEntropy, Loss, SquaredError
from optimizers.precision import execution_of
from optimizers.vec import flatten, unflatten
from validation.checks import OptionError, boolean

OPTIONS = {"fallback_random": True}  # random ops through ATen and the global generator, as eager (the masks replay)


def check_compile(compile: bool, ggn_backend: str, device: torch.device | str | None = None) -> bool:
    """``objective.compile``, validated against the Jacobian backend it replaces and, given the ``device``, against
    what torch.compile needs there (``unavailable``)."""
    compile = boolean("objective.compile", compile)
    if compile and ggn_backend != "auto":
        raise OptionError(
            f"objective.compile=true computes J v and G v with its own compiled torch.func products, so "
            f"objective.ggn_backend={ggn_backend} would not be used (linearize's trace cannot be compiled, and the "
            "double_backward and forward_ad backends differentiate the batch's eager graph). Leave "
            "objective.ggn_backend=auto with objective.compile=true, or set objective.compile=false to use "
            f"{ggn_backend}.")
    if compile and device is not None:
        reason = unavailable(torch.device(device).type)
        if reason:
            raise OptionError(f"objective.compile=true cannot run here: {reason}. Set objective.compile=false (the "
                              "eager products compute the same values), or run where torch.compile works.")
    return compile


@functools.cache
def unavailable(device_type: str) -> str | None:
    """Why torch.compile (inductor) cannot compile for ``device_type`` on this machine, or None when it can.

    Checked before the first step, so that a missing tool is one message naming ``objective.compile`` rather than a
    traceback from inside the first compiled call: CPU kernels are C++ built by the compiler that
    ``torch._inductor.config.cpp.cxx`` names (g++ unless ``CXX`` says otherwise), CUDA kernels are Triton's."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        return f"torch {torch.__version__} does not support torch.compile on this Python or platform"
    if device_type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "inductor builds CUDA kernels with Triton, which is not installed (pip install triton)"
    elif device_type == "cpu":
        from torch._inductor import config
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()
        except Exception:  # torch._inductor.exc.InvalidCxxCompiler, or a compiler that does not run
            cxx = config.cpp.cxx if isinstance(config.cpp.cxx, (list, tuple)) else (config.cpp.cxx,)
            return ("inductor builds CPU kernels with a C++ compiler, and none runs here (looked for "
                    f"{', '.join(c for c in cxx if c) or 'none'}; install g++ or point the CXX variable at one)")
    else:
        return f"curvlab has not checked torch.compile on device type {device_type!r}"
    return None


# ---------------------------------------------------------------------------------------------- compiled functions
def _forward(model: nn.Module, x: Tensor) -> Tensor:
    return model(x)


def _net(model: nn.Module, buffers: dict[str, Tensor], x: Tensor) -> Callable[[dict[str, Tensor]], Tensor]:
    """params -> f(params; x), with copies of the buffers made inside the transformed function (batch-norm running
    statistics move on the copies only; torch.func refuses in-place updates of captured tensors)."""
    return lambda params: functional_call(model, {**params, **{n: b.clone() for n, b in buffers.items()}}, (x,))


def _jvp(model: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor,
         v: dict[str, Tensor]) -> Tensor:
    return torch.func.jvp(_net(model, buffers, x), (params,), (v,))[1]


def _jvp_by_vjp(model: nn.Module, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor,
                v: dict[str, Tensor]) -> Tensor:
    """J v as the vjp of J^T u (as in ``_ggn``), for bf16 autocast: torch.func.jvp through batch norm under autocast
    fails in torch 2.14 ("Input type (torch.FloatTensor) and weight type (CPUBFloat16Type) should be the same"), eager
    or compiled; reverse mode does not."""
    outputs, jt = torch.func.vjp(_net(model, buffers, x), params)
    _, j = torch.func.vjp(jt, torch.zeros_like(outputs))
    return j((v,))[0]


def _ggn(model: nn.Module, loss_fn: Loss, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor,
         y: Tensor, v: dict[str, Tensor]) -> dict[str, Tensor]:
    outputs, jt = torch.func.vjp(_net(model, buffers, x), params)   # the one forward pass; jt(u) = (J^T u,)
    _, j = torch.func.vjp(jt, torch.zeros_like(outputs))            # J^T u is linear in u: its vjp is J
    (jv,) = j((v,))
    (gv,) = jt(loss_fn.hessian_vp(outputs, y, jv))
    return gv


_COMPILED: dict[str, Callable] = {}


def compiled(name: str) -> Callable:
    """The compiled version of one of the functions above (built on first use: importing this module compiles
    nothing)."""
    if name not in _COMPILED:
        fn = {"forward": _forward, "jvp": _jvp, "jvp_by_vjp": _jvp_by_vjp, "ggn": _ggn}[name]
        _COMPILED[name] = torch.compile(fn, dynamic=False, options=OPTIONS)
    return _COMPILED[name]


def compiled_forward(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """x -> model(x), compiled; the model itself while any of its modules (or the global registry) has hooks."""
    if _has_hooks(model):
        return model
    return lambda x: compiled("forward")(model, x)


def _has_hooks(model: nn.Module) -> bool:
    from torch.nn.modules import module as m

    if m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks:
        return True
    return any(mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks or mod._backward_pre_hooks
               for mod in model.modules())


# ---------------------------------------------------------------------------------------------- the backend
class Compiled(JacobianBackend):
    """J v and the whole G v as compiled ``torch.func`` functions of the curvature batch (see the module docstring).

    ``fused_ggn``: the Objective takes G v from ``ggn_vp`` (one compiled function) rather than composing
    ``jvp``, H_L and J^T; true for the closed-form losses (cross-entropy, squared error). A custom loss's H_L is an
    autograd product, which does not run inside torch.func: its G v is the compiled J v, H_L and the eager J^T."""

    name = "compiled"

    def __init__(self, net: FunctionalModel, batch: CurvatureBatch):
        super().__init__(net, batch)
        self.primals = net.by_name([p.detach() for p in net.params])
        self.buffers = dict(net.model.named_buffers())
        self.fused_ggn = type(net.loss_fn) in (CrossEntropy, SquaredError)

    def _tangents(self, v: Tensor) -> dict[str, Tensor]:
        return self.net.by_name(unflatten(v, self.net.params))

    def jvp(self, v: Tensor) -> Tensor:
        net = self.net
        name = "jvp_by_vjp" if execution_of(net.model).autocast_dtype is not None else "jvp"
        with net.replay_rng(), differentiable_twice():
            return compiled(name)(net.model, self.primals, self.buffers, self.batch.inputs, self._tangents(v))

    def ggn_vp(self, v: Tensor) -> Tensor:
        """G v (flat), undamped, not yet reduced across ranks."""
        net, batch = self.net, self.batch
        with net.replay_rng(), differentiable_twice():
            gv = compiled("ggn")(net.model, net.loss_fn, self.primals, self.buffers, batch.inputs, batch.targets,
                                 self._tangents(v))
        return flatten([gv[n] for n in net.names])

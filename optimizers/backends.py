"""Curvature backends: how J v, J^T w (Jacobian backends) and H v (Hessian backends) are computed on one batch.

Notation (Henriques et al. 2019, "Small steps and giant leaps", sec. 2.3): f = network outputs (B, o), J = df/dw,
g_f = dL/df, H_L = d^2L/df^2. The Objective writes the Gauss-Newton product once on top of any Jacobian backend,
G v = J^T (H_L (J v)) (Schraudolph 2002, "Fast curvature matrix-vector products for second-order gradient descent"),
and the Hessian product on top of any Hessian backend (Pearlmutter 1994, "Fast exact multiplication by the Hessian").

A backend is built once per curvature batch (its set-up) and then serves every product of that batch (a CG solve
reuses it). It sees the network only as ``net``, a ``FunctionalModel`` (optimizers.functional: f(w; x) with the
batch's dropout masks, the parameters and their names, the loss), and the batch; never the Objective. Each backend is
one small class; adding one is a class plus a line in its registry.

Jacobian backends (``objective.ggn_backend``):
  double_backward  J^T u is built once with ``create_graph`` (u a leaf); J v = d<J^T u, v>/du is one backward through
                   that graph. With u = g_f the set-up also yields the gradient J^T g_f for free.
  linearize        ``torch.func.linearize``: traces a tangent-only forward once per batch; each J v replays it. High
                   set-up cost, cheap products: for long CG solves on large batches.
  forward_ad       a dual-number forward per product (no set-up).
Hessian backends (``objective.hvp_backend``):
  double_backward  the gradient built once with ``create_graph``; H v = d<g, v>/dw per product. Yields the gradient.
  forward_over_reverse  ``torch.func.jvp`` of ``torch.func.grad``: recomputes forward and backward per product.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.autograd.forward_ad as fwad
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from optimizers.functional import FunctionalModel
from optimizers.vec import flatten, unflatten
from validation.checks import OptionError


class CurvatureBatch:
    """The batch curvature products use (the gradient batch, or a sub-batch of it: Martens 2010 sec. 4.3), with its
    outputs and loss (graphs kept) and the backends built on it."""

    def __init__(self, inputs: Tensor, targets: Tensor, outputs: Tensor, loss: Tensor, shared: bool):
        self.inputs, self.targets = inputs, targets      # (B, ...), (B,) or (B, o)
        self.outputs, self.loss = outputs, loss          # f (B, o) and the batch-mean loss, with their graphs
        self.shared = shared                              # True: the same batch as the gradient's
        self.backends: dict[str, Backend] = {}            # name -> backend built on this batch


class Backend:
    """Built once on a curvature batch from the batch's function ``net``; ``gradient`` is the batch gradient when the
    set-up computed it for free (else None)."""

    name: ClassVar[str]
    gradient: Tensor | None = None

    def __init__(self, net: FunctionalModel, batch: CurvatureBatch):
        self.net, self.batch = net, batch


# ---------------------------------------------------------------------------------------------- Jacobian backends
class JacobianBackend(Backend):
    """J v on one curvature batch (J^T w needs no backend: it is a backward through the batch's forward graph,
    ``vjp``). Subclasses implement ``jvp``."""

    def jvp(self, v: Tensor) -> Tensor:  # v flat (P,) -> J v (B, o)
        raise NotImplementedError


def vjp(batch: CurvatureBatch, params: Sequence[Tensor], w: Tensor) -> Tensor:
    """J^T w, flat (P,), for an output-shaped w (B, o): one backward through the batch's forward graph."""
    return flat_or_zero(torch.autograd.grad(batch.outputs, params, w, retain_graph=True, allow_unused=True), params)


class DoubleBackward(JacobianBackend):
    """J v as the derivative of <J^T u, v> with respect to the leaf u (the 'double-backward trick')."""

    name = "double_backward"

    def __init__(self, net: FunctionalModel, batch: CurvatureBatch, u: Tensor | None = None):
        super().__init__(net, batch)
        loss_fn, params = net.loss_fn, net.params
        from_gradient = u is None
        self.u = (loss_fn.output_grad(batch.outputs, batch.targets) if from_gradient else u).detach().requires_grad_()
        with torch.enable_grad():
            jtu = torch.autograd.grad(batch.outputs, params, self.u, create_graph=True, allow_unused=True)
        self.jtu = flat_or_zero(jtu, params).detach()     # J^T u, flat
        if from_gradient and batch.shared:
            self.gradient = self.jtu                      # J^T g_f is the gradient of the batch loss
        self.used = [i for i, g in enumerate(jtu) if g is not None and g.requires_grad]
        self.graph = [jtu[i] for i in self.used]

    def jvp(self, v: Tensor) -> Tensor:
        jv = None
        if self.used:
            vs = unflatten(v, self.net.params)
            (jv,) = torch.autograd.grad(self.graph, self.u, [vs[i] for i in self.used], retain_graph=True,
                                        allow_unused=True)
        return jv if jv is not None else torch.zeros_like(self.u, dtype=v.dtype)


class Linearize(JacobianBackend):
    """``torch.func.linearize`` traced once per batch; J v replays the trace.

    Refused for a forward pass that draws random numbers (dropout, stochastic depth in train mode): the trace keeps
    the random operations and draws new masks at every product (measured: G v about 20 % off the batch's, and two
    identical products differ). Which of them constant folding evaluates once at tracing time is PyTorch's choice,
    so replaying the random state per product would not provably redraw the batch's masks either."""

    name = "linearize"

    def __init__(self, net: FunctionalModel, batch: CurvatureBatch):
        super().__init__(net, batch)
        if net.draws_random:
            raise OptionError(
                "objective.ggn_backend=linearize cannot be used with this model: its forward pass draws random "
                "numbers (dropout or stochastic depth in train mode), and torch.func.linearize's trace would draw new "
                "masks at every product instead of the batch's. Use objective.ggn_backend=double_backward or "
                "forward_ad (or auto), which replay the batch's masks exactly, or put the random layers in eval mode.")
        primals = net.by_name([p.detach() for p in net.params])
        with net.replay_rng():
            _, self.linear = torch.func.linearize(lambda p: net(p, batch.inputs), primals)

    def jvp(self, v: Tensor) -> Tensor:
        return self.linear(self.net.by_name(unflatten(v, self.net.params)))


class ForwardAD(JacobianBackend):
    """A dual-number forward pass per product (forward-mode AD, no set-up)."""

    name = "forward_ad"

    def jvp(self, v: Tensor) -> Tensor:
        net = self.net
        with torch.no_grad(), net.replay_rng(), fwad.dual_level(), TangentFreeInputs():
            dual = net.by_name([fwad.make_dual(p.detach(), t) for p, t in zip(net.params, unflatten(v, net.params))])
            return fwad.unpack_dual(net(dual, self.batch.inputs)).tangent


# ---------------------------------------------------------------------------------------------- Hessian backends
class HessianBackend(Backend):
    """H v on one curvature batch. Subclasses implement ``hvp``."""

    def hvp(self, v: Tensor) -> Tensor:  # v flat (P,) -> H v flat (P,)
        raise NotImplementedError


class HessianDoubleBackward(HessianBackend):
    """The gradient with ``create_graph``, built once; H v = d<g, v>/dw (Pearlmutter 1994)."""

    name = "double_backward"

    def __init__(self, net: FunctionalModel, batch: CurvatureBatch):
        super().__init__(net, batch)
        params = net.params
        with torch.enable_grad():
            g = torch.autograd.grad(batch.loss, params, create_graph=True, allow_unused=True)
        if batch.shared:
            self.gradient = flat_or_zero([None if gi is None else gi.detach() for gi in g], params)
        # parameters the loss does not use (no gradient) or enters linearly (a gradient without a graph) have zero
        # rows in H: they take no part in the double backward
        self.used = [i for i, gi in enumerate(g) if gi is not None and gi.requires_grad]
        self.graph = [g[i] for i in self.used]

    def hvp(self, v: Tensor) -> Tensor:
        params = self.net.params
        if not self.used:
            return torch.zeros_like(v)
        vs = unflatten(v, params)
        hv = torch.autograd.grad(self.graph, params, [vs[i] for i in self.used], retain_graph=True,
                                 allow_unused=True)
        return flat_or_zero(hv, params)


class ForwardOverReverse(HessianBackend):
    """``torch.func.jvp`` of ``torch.func.grad``: a fresh forward and backward per product."""

    name = "forward_over_reverse"

    def hvp(self, v: Tensor) -> Tensor:
        net, batch = self.net, self.batch

        def grad_fn(p: dict[str, Tensor]) -> dict[str, Tensor]:
            return torch.func.grad(lambda q: net.loss_fn(net(q, batch.inputs), batch.targets))(p)

        primals = net.by_name([p.detach() for p in net.params])
        with net.replay_rng():
            _, hv = torch.func.jvp(grad_fn, (primals,), (net.by_name(unflatten(v, net.params)),))
        return flatten([hv[n] for n in net.names])


JACOBIAN_BACKENDS: dict[str, type[JacobianBackend]] = {b.name: b for b in (DoubleBackward, Linearize, ForwardAD)}
HESSIAN_BACKENDS: dict[str, type[HessianBackend]] = {b.name: b for b in (HessianDoubleBackward, ForwardOverReverse)}


def auto_jacobian_backend(model: nn.Module, *, jtu_graph_kept: bool = False) -> str:
    """The one rule behind ``auto``, from measurements on the CPU (scripts/bench_curvature.py, README tables).

    From scratch: ``forward_ad`` for networks with convolutions (basic CNN: 1.24x vs 1.53x a gradient per GGN
    product; ResNet-18: 2.0x vs 2.7x), ``double_backward`` otherwise (MLP: 0.91x vs 1.26x). When a J^T u graph is
    already kept (CurveBall's J dz after its J^T u), reusing it costs about one tangent pass, except through batch
    norm, whose double backward is slower than a fresh forward-mode pass (CNN + BN: 2.9x vs 3.4x an SGD step).
    """
    if jtu_graph_kept:
        return "forward_ad" if has_batch_norm(model) else "double_backward"
    convolutional = any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())
    return "forward_ad" if convolutional else "double_backward"


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


# ---------------------------------------------------------------------------------------------- helpers
class TangentFreeInputs(TorchFunctionMode):
    """Forward-mode AD of linear/convolution layers whose input carries no tangent (the network's first layer).

    PyTorch's rule for such a layer also multiplies a materialised zero input tangent by the weight: a wasted
    product as costly as the layer itself (on a 784-800-10 MLP, as much as the whole forward pass). Here the
    tangent is just layer(x, dW, db). Every other op keeps PyTorch's rule.
    """

    LAYERS = (F.linear, F.conv1d, F.conv2d, F.conv3d)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.LAYERS and len(args) >= 2 and fwad.unpack_dual(args[0]).tangent is None:
            weight, weight_t = fwad.unpack_dual(args[1])
            if weight_t is not None:
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                bias, bias_t = fwad.unpack_dual(bias) if bias is not None else (None, None)
                rest, options = args[3:], {k: a for k, a in kwargs.items() if k != "bias"}
                primal = func(args[0], weight, bias, *rest, **options)
                tangent = func(args[0], weight_t, bias_t, *rest, **options)
                return fwad.make_dual(primal, tangent)
        return func(*args, **kwargs)


def flat_or_zero(grads: Sequence[Tensor | None], params: Sequence[Tensor]) -> Tensor:
    """``autograd.grad`` results as one flat vector, zeros for parameters the output does not depend on."""
    return flatten([g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)])

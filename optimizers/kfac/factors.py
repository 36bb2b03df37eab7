"""K-FAC's Kronecker factors, read from the Objective's own forward and backward passes by hooks.

For a layer with input a (with a homogeneous 1 appended when it has a bias) and pre-activation s = W a, K-FAC
(Martens & Grosse 2015, Optimizing neural networks with Kronecker-factored approximate curvature, sec. 3) approximates
the layer's block of the Fisher by A (x) G with

    A = E[a a^T]                 (d_in [+1], d_in [+1])
    G = E[g g^T],  g = dl/ds     (d_out, d_out), l one sample's loss

For a convolution (KFC: Grosse & Martens 2016, A Kronecker-factored approximate Fisher matrix for convolution layers,
sec. 3.1) a_t are the unfolded input patches (C k_h k_w [+1]) and g_t the output gradients at the T output locations
t, and the spatial sums are split between the factors as the paper prescribes:

    A = E[sum_t a_t a_t^T],     G = (1/T) E[sum_t g_t g_t^T]

Scale of G. curvlab's losses are batch means, L = (1/B) sum_i l_i, so the gradient the backward pass brings to s_i is
g_i / B. The factors here undo that 1/B: G is the expectation over samples of ONE sample's gradient outer product, so
A (x) G approximates the Fisher / GGN of the batch-mean loss, the same scale as ``Objective.ggn_vp``, Martens &
Grosse's F and the factors of kfac-pytorch (which multiplies the output gradients by the batch size too). Damping
values are therefore comparable with theirs, and do not change with the batch size.

Only ``nn.Linear`` (any number of leading dimensions: the extra ones count as locations, as in KFC) and ``nn.Conv2d``
with ``groups=1``, zero padding given as numbers, are covered. Everything else is left to the optimiser's fall-back.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from optimizers.patches import patch_matrix

CHUNK = 2**24  # entries of unfolded patches processed at a time (bounds the memory of a convolution's A)
GRAM_BLOCK = 192  # smallest block side of gram()'s block-triangular product


@dataclass(frozen=True)
class Layer:
    """A covered layer: its module and the positions of its weight and bias in the optimiser's parameter list."""

    name: str
    module: nn.Module
    weight: int
    bias: int | None

    @property
    def is_conv(self) -> bool:
        return isinstance(self.module, nn.Conv2d)

    def gradient_matrix(self, grads: Sequence[Tensor]) -> Tensor:
        """The weight gradient as a (d_out, d_in [+1]) matrix, the bias gradient as its last column."""
        w = grads[self.weight].reshape(grads[self.weight].shape[0], -1)
        return w if self.bias is None else torch.cat([w, grads[self.bias].unsqueeze(1)], dim=1)

    def scatter(self, matrix: Tensor, out: Sequence[Tensor], scale: Tensor | float = 1.0) -> None:
        """Write ``scale`` times a (d_out, d_in [+1]) matrix into the weight and bias views of ``out``."""
        d_in = out[self.weight][0].numel()
        torch.mul(matrix[:, :d_in].reshape(out[self.weight].shape), scale, out=out[self.weight])
        if self.bias is not None:
            torch.mul(matrix[:, d_in], scale, out=out[self.bias])


def coverable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def covered_layers(model: nn.Module, params: Sequence[Tensor]) -> dict[str, Layer]:
    """The model's Linear and Conv2d layers whose weight (and bias, if any) are among the trainable ``params``."""
    index = {id(p): i for i, p in enumerate(params)}
    layers = {}
    for name, m in model.named_modules():
        if not coverable(m) or id(m.weight) not in index:
            continue
        if m.bias is not None and id(m.bias) not in index:
            continue
        layers[name] = Layer(name, m, index[id(m.weight)], None if m.bias is None else index[id(m.bias)])
    return layers


class _Call:
    """One forward call of a layer: its input, its output (graph kept), the output gradients recorded for it."""

    __slots__ = ("inputs", "output", "grads")

    def __init__(self, inputs: Tensor, output: Tensor):
        self.inputs, self.output, self.grads = inputs, output, []


class Capture:
    """Forward hooks on the model and the covered layers, registered for the duration of a ``with`` block.

    Each forward call of a covered layer records its input and output; the model's hook keeps the network's output
    (with its graph). Output gradients reach the calls in two ways:

    * ``recording()``: a tensor hook on every recorded output keeps the gradients of the backward passes run inside
      the block (the empirical Fisher: the Objective's own ``backward()``, no extra pass);
    * ``backward(signal)``: one backward pass of an output-space signal from the network's output to the layer
      outputs only (no parameter gradients), for the sampled Fisher and the loss-Hessian square root.

    Pairing each gradient with its own call keeps the statistics right if a layer runs more than once.
    """

    def __init__(self, model: nn.Module, layers: dict[str, Layer]):
        self.model, self.layers = model, layers
        self.calls: dict[str, list[_Call]] = {name: [] for name in layers}
        self.network_output: Tensor | None = None
        self._recording = False
        self._handles: list = []

    def __enter__(self) -> Capture:
        self._handles = [layer.module.register_forward_hook(functools.partial(self._forward, name))
                         for name, layer in self.layers.items()]
        self._handles.append(self.model.register_forward_hook(self._network))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.network_output = None
        for calls in self.calls.values():
            for call in calls:
                call.output = None  # release the graph

    def _forward(self, name: str, module: nn.Module, args: tuple, output: Tensor) -> None:
        if not (torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad):
            return
        call = _Call(args[0].detach().to(module.weight.dtype), output)  # float32 factors under bf16 autocast
        output.register_hook(functools.partial(self._backward, call))
        self.calls[name].append(call)

    def _network(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if isinstance(output, Tensor) and output.requires_grad:
            self.network_output = output

    def _backward(self, call: _Call, grad: Tensor) -> None:
        if self._recording:
            call.grads.append(grad.detach().to(call.inputs.dtype))

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Keep the output gradients of the backward passes taken inside this block."""
        self._recording = True
        try:
            yield
        finally:
            self._recording = False

    def backward(self, signal: Tensor) -> None:
        """J_s^T signal for every recorded layer output s: a backward pass that stops at the covered layers."""
        if self.network_output is None:
            raise RuntimeError("K-FAC's hooks saw no forward pass of the model inside step(): the objective's forward "
                               "must run inside step() (one fresh Objective per step).")
        calls = [c for cs in self.calls.values() for c in cs if c.output is not None]
        grads = torch.autograd.grad(self.network_output, [c.output for c in calls], signal, retain_graph=True,
                                    allow_unused=True)
        for call, g in zip(calls, grads):
            if g is not None:
                call.grads.append(g.to(call.inputs.dtype))


def batch_factors(layer: Layer, calls: Sequence[_Call], mean_loss_signal: bool) -> tuple[Tensor, Tensor] | None:
    """A and G of one batch from the calls that received gradients; None when none did (``batch_factor_sums``
    divided by their counts)."""
    sums = batch_factor_sums(layer, calls, mean_loss_signal)
    return None if sums is None else (sums.a / sums.a_count, sums.g / sums.g_count)


@dataclass(frozen=True)
class FactorSums:
    """A = a / a_count and G = g / g_count for one layer and batch (the division is left to the moving average)."""

    a: Tensor
    g: Tensor
    a_count: int
    g_count: int


def batch_factor_sums(layer: Layer, calls: Sequence[_Call], mean_loss_signal: bool) -> FactorSums | None:
    """The sums behind A and G of one batch from the calls that received gradients; None when none did.

    ``mean_loss_signal``: the gradients came from the batch-mean loss's backward (the empirical Fisher), so each is
    one sample's gradient divided by B and is multiplied back by B (B^2 on the small G itself). Otherwise they are
    per-sample signals already (sampled labels, loss-Hessian square-root columns), summed over the signals of a call.
    """
    calls = [c for c in calls if c.grads]
    if not calls:
        return None
    a_sum, g_sum, samples, locations = None, None, 0, 1
    for call in calls:
        b = call.inputs.shape[0]
        a_part = _input_second_moment(layer, call.inputs)
        g_part = None
        for grad in call.grads:
            rows = _output_grad_rows(layer, grad)  # (d_out, B T) or (B T, d_out)
            locations = rows.numel() // (b * layer.module.weight.shape[0])
            part = gram(rows, rows_are_features=layer.is_conv)
            g_part = part if g_part is None else g_part.add_(part)
        if mean_loss_signal:
            g_part = g_part.mul_(float(b * b))
        a_sum = a_part if a_sum is None else a_sum.add_(a_part)
        g_sum = g_part if g_sum is None else g_sum.add_(g_part)
        samples += b
    return FactorSums(a_sum, g_sum, samples, samples * locations)


def _output_grad_rows(layer: Layer, g: Tensor) -> Tensor:
    """The pre-activation gradients as a matrix for ``gram``: (d_out, B T) for a convolution (one copy), (B T, d_out)
    for a dense layer (a view)."""
    if layer.is_conv:
        return g.transpose(0, 1).reshape(g.shape[1], -1)
    return g.reshape(-1, g.shape[-1])


def _input_second_moment(layer: Layer, inputs: Tensor) -> Tensor:
    """sum_i sum_t a_it a_it^T over a call's samples (with the bias's 1 appended to a), in chunks of samples for
    convolutions (unfolded patches can be large). The bias row and column are the sums of the inputs and the count,
    so the 1s are never materialised."""
    m, bias = layer.module, layer.bias is not None
    n = m.weight[0].numel()
    out = inputs.new_empty(n + bias, n + bias)
    if layer.is_conv:
        per_sample = n * max(1, patch_matrix(m, inputs[:1]).shape[1])
        chunk = max(1, CHUNK // per_sample)
        part, sums, count = None, None, 0
        for start in range(0, inputs.shape[0], chunk):
            p = patch_matrix(m, inputs[start:start + chunk])  # (C kh kw, b T)
            if start == 0:
                gram(p, rows_are_features=True, out=out[:n, :n])
            else:
                part = gram(p, rows_are_features=True, out=part)
                out[:n, :n] += part
            if bias:
                s = p.sum(1)
                sums = s if sums is None else sums.add_(s)
            count += p.shape[1]
    else:
        a = inputs.reshape(-1, inputs.shape[-1])
        gram(a, rows_are_features=False, out=out[:n, :n])
        sums = a.sum(0) if bias else None
        count = a.shape[0]
    if bias:
        out[:n, n] = sums
        out[n, :n] = sums
        out[n, n] = count
    return out


def gram(m: Tensor, rows_are_features: bool, out: Tensor | None = None) -> Tensor:
    """m m^T (``rows_are_features``: m is (n, N)) or m^T m (m is (N, n)): the (n, n) Gram matrix of n features over N
    samples, into ``out`` if given. Computed as the lower block triangle of k x k blocks (k(k+1)/2 products of the
    k^2 a full product takes; about 30 % less time than one ``mm`` for n ~ 800 on the CPU, torch having no symmetric
    rank-k update) and mirrored, so the result is exactly symmetric."""
    n = m.shape[0] if rows_are_features else m.shape[1]
    if out is None:
        out = m.new_empty(n, n)
    k = min(4, n // GRAM_BLOCK)
    if k < 2:
        return torch.mm(m, m.T, out=out) if rows_are_features else torch.mm(m.T, m, out=out)
    edges = [n * i // k for i in range(k + 1)]
    for lo, hi in zip(edges[:-1], edges[1:]):
        if rows_are_features:
            torch.mm(m[lo:hi], m[:hi].T, out=out[lo:hi, :hi])
        else:
            torch.mm(m[:, lo:hi].T, m[:, :hi], out=out[lo:hi, :hi])
    for lo, hi in zip(edges[1:-1], edges[2:]):
        out[:lo, lo:hi] = out[lo:hi, :lo].T
    return out

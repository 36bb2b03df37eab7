"""One batch = one objective: the loss, gradient and curvature products of a model on one batch.

Every optimiser's ``step(objective)`` talks to this object only. It owns:

* the caching: one forward pass per batch; for Gauss-Newton products a linearisation built once and reused by every
  product of a CG solve (a cached GGN product costs a fraction of a gradient instead of a fresh forward each time);
* the policies: curvature sub-batch (Martens 2010 sec. 4.3), dropout masks and batch-norm statistics held fixed for
  every evaluation on this batch (trial losses replay the forward's RNG state and never touch running statistics);
* the bookkeeping: how many products were taken and how long they took;
* the one place where a data-parallel run would average across ranks (``_reduce``).

Notation (seed 003 sec. 2.3): f = network outputs (B, o), J = df/dw, g_f = dL/df, H_L = d^2L/df^2.
GGN: G v = J^T H_L J v (seed 003 eq. 10-12). Hessian: H v by Pearlmutter's trick (seed 000, Pearlmutter 1994).

Backends (``ggn_backend``):
  auto             forward_ad for networks with convolutions, double_backward otherwise (the faster of the two in
                   scripts/bench_curvature.py: MLP 0.91x vs 1.26x a gradient; basic CNN 1.24x vs 1.53x; ResNet-18
                   2.0x vs 2.7x, CPU). Default.
  double_backward  J^T u is built once with ``create_graph`` (u a leaf); J v = d<J^T u, v>/du is one backward through
                   that graph, and J^T w reuses the forward's graph.
  linearize        ``torch.func.linearize``: traces a tangent-only forward once per batch; each J v replays it. High
                   set-up cost per batch, cheap products: for long CG solves on large batches.
  forward_ad       dual-number forward per product (no caching): the reference for comparisons.
``hvp_backend``:
  double_backward  gradient built once with ``create_graph``; H v = d<g, v>/dw per product (Pearlmutter 1994).
  forward_over_reverse  ``torch.func.jvp`` of ``torch.func.grad``: recomputes forward and backward per product.
"""
from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator

import torch
import torch.autograd.forward_ad as fwad
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from optimizers.losses import Loss, get_loss
from optimizers.vec import add_to_params, flatten, unflatten

GGN_BACKENDS = ("auto", "double_backward", "linearize", "forward_ad")
HVP_BACKENDS = ("double_backward", "forward_over_reverse")


class Objective:
    """The loss of ``model`` on one batch, with its gradient and curvature products on flat parameter vectors."""

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Loss | str,
        inputs: Tensor,
        targets: Tensor,
        *,
        ggn_backend: str = "auto",
        hvp_backend: str = "double_backward",
        curvature_batch_size: int | None = None,
        per_sample_chunk: int | None = None,
    ):
        if ggn_backend not in GGN_BACKENDS:
            raise ValueError(f"objective.ggn_backend={ggn_backend!r} is not one of {list(GGN_BACKENDS)}.")
        if hvp_backend not in HVP_BACKENDS:
            raise ValueError(f"objective.hvp_backend={hvp_backend!r} is not one of {list(HVP_BACKENDS)}.")
        if curvature_batch_size is not None and curvature_batch_size < 1:
            raise ValueError(f"objective.curvature_batch_size must be a positive integer or null, got {curvature_batch_size}.")
        self.model, self.loss_fn = model, get_loss(loss_fn)
        self.inputs, self.targets = inputs, targets
        self.ggn_backend, self.hvp_backend = ggn_backend, hvp_backend
        self.curvature_batch_size = curvature_batch_size
        self.per_sample_chunk = per_sample_chunk
        self.product_count = {"ggn": 0, "hvp": 0, "jvp": 0, "vjp": 0}
        self._clear()

    # Built on first use, so the first-order path (``backward`` only) pays nothing for them.
    @functools.cached_property
    def _named(self) -> list[tuple[str, Tensor]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    @functools.cached_property
    def names(self) -> list[str]:
        return [n for n, _ in self._named]

    @functools.cached_property
    def params(self) -> list[Tensor]:
        """The trainable parameters, in ``model.named_parameters()`` order (the flat-vector layout)."""
        return [p for _, p in self._named]

    @functools.cached_property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    @functools.cached_property
    def ggn_method(self) -> str:
        """The GGN backend in use (``auto`` resolved against the model's layers)."""
        if self.ggn_backend != "auto":
            return self.ggn_backend
        convolutional = any(isinstance(m, nn.modules.conv._ConvNd) for m in self.model.modules())
        return "forward_ad" if convolutional else "double_backward"

    @functools.cached_property
    def _timer(self) -> _ProductTimer:
        return _ProductTimer(self.inputs.device)

    # ------------------------------------------------------------------ forward, loss, gradient
    def _clear(self) -> None:
        self._outputs: Tensor | None = None
        self._loss: Tensor | None = None
        self._grad: Tensor | None = None
        self._rng: tuple | None = None
        self._curv: _CurvatureBatch | None = None

    def _forward(self) -> Tensor:
        if self._outputs is None:
            self._rng = _capture_rng(self.inputs.device)
            with torch.enable_grad():
                self._outputs = self.model(self.inputs)
                self._loss = self.loss_fn(self._outputs, self.targets)
        return self._outputs

    def outputs(self) -> Tensor:
        """Network outputs f on the batch (B, o), detached."""
        return self._forward().detach()

    def loss(self) -> Tensor:
        """The batch loss at the current parameters (0-dim, detached)."""
        self._forward()
        return self.reduce(self._loss.detach())

    def backward(self) -> Tensor:
        """First-order path: forward and ``loss.backward()`` into ``p.grad``; returns the loss. Frees the graph."""
        self._forward()
        self._loss.backward()
        if _distributed():
            for p in self.params:
                if p.grad is not None:
                    self._reduce_(p.grad)
        loss = self.reduce(self._loss.detach())
        self._outputs = self._loss = None
        return loss

    def gradient(self) -> Tensor:
        """Flat gradient of the batch loss (cached). ``prepare`` first when products will follow, to share the pass."""
        if self._grad is None:
            self._forward()
            grads = torch.autograd.grad(self._loss, self.params, retain_graph=True, allow_unused=True)
            self._grad = self.reduce(_flat_or_zero(grads, self.params))
        return self._grad

    def output_grad(self) -> Tensor:
        """g_f = dL/df (B, o), closed form for the matching losses."""
        return self.loss_fn.output_grad(self._forward(), self.targets)

    @property
    def _curvature_on_whole_batch(self) -> bool:
        k = self.curvature_batch_size
        return k is None or k >= self.inputs.shape[0]

    @property
    def can_fuse_forward(self) -> bool:
        """Whether ``forward_with_jvp`` may still replace the batch's forward: not run yet, no curvature sub-batch."""
        return self._outputs is None and self._curvature_on_whole_batch

    def forward_with_jvp(self, v: Tensor) -> Tensor:
        """The batch's one forward pass carrying the tangent v by forward-mode AD; returns J v (B, o).

        Outputs, loss and graph are cached exactly as ``loss()`` would leave them (BN running statistics updated once,
        RNG state recorded for replays), so a method that needs J z first (CurveBall) gets it with the forward.
        """
        if not self.can_fuse_forward:
            raise RuntimeError("forward_with_jvp must come before any other use of the objective (and needs "
                               "curvature_batch_size=null)")
        with self._timer("jvp"):
            self.product_count["jvp"] += 1
            self._rng = _capture_rng(self.inputs.device)
            buffers = _buffer_copies(self.model)
            try:
                with torch.enable_grad(), fwad.dual_level(), _TangentFreeInputs():
                    dual = {n: fwad.make_dual(p, t) for n, p, t in zip(self.names, self.params, unflatten(v, self.params))}
                    outputs, jv = fwad.unpack_dual(functional_call(self.model, {**dual, **buffers}, (self.inputs,)))
            except BaseException:
                _restore_rng(self._rng, self.inputs.device)  # leave the RNG as if nothing had run
                self._rng = None
                raise
            with torch.no_grad():  # model(inputs) would have moved the running statistics: commit the copies' update
                for name, buf in self.model.named_buffers():
                    buf.copy_(buffers[name])
            self._outputs = outputs
            with torch.enable_grad():
                self._loss = self.loss_fn(outputs, self.targets)
            return jv.detach()

    def prepare(self, curvature: str = "ggn") -> Tensor:
        """Build what ``curvature`` products need in the same backward pass as the gradient; returns the gradient.

        For the double-backward backends the gradient comes out of the graph the products reuse, so a method that
        calls ``prepare`` first pays one backward for both.
        """
        if curvature not in ("ggn", "hessian"):
            raise ValueError(f"curvature must be 'ggn' or 'hessian', got {curvature!r}")
        if self._curvature_on_whole_batch:  # a sub-batch's graph cannot give the gradient: nothing to share
            if curvature == "ggn" and self.ggn_method == "double_backward":
                self._double_backward_j(self._curvature_batch())
            elif curvature == "hessian" and self.hvp_backend == "double_backward":
                self._hessian_graph(self._curvature_batch())
        return self.gradient()

    def _double_backward_j(self, cb: _CurvatureBatch) -> _DoubleBackwardJ:
        """The batch's J^T u graph, built once with u = g_f, so on the whole batch it also yields the gradient."""
        if cb.j is None:
            jtu = cb.build_j(self.params, self.loss_fn.output_grad(cb.outputs, cb.targets))
            if cb.shared and self._grad is None:
                self._grad = self.reduce(jtu)
        return cb.j

    def _hessian_graph(self, cb: _CurvatureBatch) -> list[Tensor]:
        """The batch's gradient with ``create_graph``, built once; on the whole batch it is also the gradient."""
        if cb.hgraph is None:
            cb.build_hessian_graph(self.params)
            if cb.shared and self._grad is None:
                self._grad = self.reduce(flatten([g.detach() for g in cb.hgraph]))
        return cb.hgraph

    # ------------------------------------------------------------------ curvature products
    def ggn_vp(self, v: Tensor) -> Tensor:
        """G v = J^T H_L J v on the curvature batch (undamped)."""
        with self._timer("ggn"):
            self.product_count["ggn"] += 1
            cb = self._curvature_batch()
            jv = self._jvp(cb, v, None)
            return self.reduce(self._vjp(cb, self.loss_fn.hessian_vp(cb.outputs, cb.targets, jv)))

    def hvp(self, v: Tensor) -> Tensor:
        """H v, the exact Hessian of the loss on the curvature batch times v (undamped)."""
        with self._timer("hvp"):
            self.product_count["hvp"] += 1
            cb = self._curvature_batch()
            if self.hvp_backend == "forward_over_reverse":
                return self.reduce(self._hvp_forward_over_reverse(cb, v))
            hv = torch.autograd.grad(self._hessian_graph(cb), self.params, unflatten(v, self.params), retain_graph=True, allow_unused=True)
            return self.reduce(_flat_or_zero(hv, self.params))

    def curvature_vp(self, v: Tensor, curvature: str = "ggn") -> Tensor:
        """G v or H v by name: the one entry point solvers use."""
        return self.ggn_vp(v) if curvature == "ggn" else self.hvp(v)

    def jvp(self, v: Tensor, method: str | None = None) -> Tensor:
        """J v: output-space directional derivative (B, o) on the curvature batch; ``method`` overrides ggn_backend."""
        with self._timer("jvp"):
            self.product_count["jvp"] += 1
            return self._jvp(self._curvature_batch(), v, method)

    def vjp(self, w: Tensor, keep_jvp: bool = False) -> Tensor:
        """J^T w for an output-shaped w on the curvature batch, as a flat vector.

        ``keep_jvp=True`` takes this backward with ``create_graph`` so that it doubles as the set-up of later
        double-backward ``jvp`` calls (saves ``prepare``'s extra backward when J^T u comes before J v, as in CurveBall).
        """
        with self._timer("vjp"):
            self.product_count["vjp"] += 1
            cb = self._curvature_batch()
            if not keep_jvp:
                return self.reduce(self._vjp(cb, w))
            return self.reduce(cb.build_j(self.params, w))

    def loss_hessian_vp(self, u: Tensor) -> Tensor:
        """H_L u on the curvature batch's outputs."""
        cb = self._curvature_batch()
        return self.loss_fn.hessian_vp(cb.outputs, cb.targets, u)

    def curvature_output_grad(self) -> Tensor:
        """g_f on the curvature batch (equals ``output_grad`` when no sub-batch is used)."""
        cb = self._curvature_batch()
        return self.loss_fn.output_grad(cb.outputs, cb.targets)

    def _curvature_batch(self) -> _CurvatureBatch:
        if self._curv is None:
            self._forward()
            k = self.curvature_batch_size
            if self._curvature_on_whole_batch:
                self._curv = _CurvatureBatch(self.inputs, self.targets, self._outputs, self._loss, shared=True)
            else:
                # Martens 2010 sec. 4.3: curvature on a sub-batch. Its forward must not move BN running statistics.
                x, y = self.inputs[:k], self.targets[:k]
                with torch.enable_grad():
                    out = self._call(dict(zip(self.names, self.params)), x)
                self._curv = _CurvatureBatch(x, y, out, self.loss_fn(out, y), shared=False)
        return self._curv

    def _jvp(self, cb: _CurvatureBatch, v: Tensor, method: str | None) -> Tensor:
        method = method or self.ggn_method
        if method not in GGN_BACKENDS[1:]:
            raise ValueError(f"jvp method {method!r} is not one of {list(GGN_BACKENDS)}")
        if method == "double_backward":
            return self._double_backward_j(cb).jvp(v)
        if method == "linearize":
            if cb.linearized is None:
                with self._replay_rng():
                    _, cb.linearized = torch.func.linearize(
                        lambda p: functional_call(self.model, {**p, **_buffer_copies(self.model)}, (cb.inputs,)),
                        dict(zip(self.names, (p.detach() for p in self.params))),
                    )
            return cb.linearized(dict(zip(self.names, unflatten(v, self.params))))
        return self._jvp_forward_ad(cb, v)

    def _vjp(self, cb: _CurvatureBatch, w: Tensor) -> Tensor:
        grads = torch.autograd.grad(cb.outputs, self.params, w, retain_graph=True, allow_unused=True)
        return _flat_or_zero(grads, self.params)

    def _jvp_forward_ad(self, cb: _CurvatureBatch, v: Tensor) -> Tensor:
        with torch.no_grad(), self._replay_rng(), fwad.dual_level(), _TangentFreeInputs():
            dual = {n: fwad.make_dual(p.detach(), t) for n, p, t in zip(self.names, self.params, unflatten(v, self.params))}
            out = functional_call(self.model, {**dual, **_buffer_copies(self.model)}, (cb.inputs,))
            return fwad.unpack_dual(out).tangent

    def _hvp_forward_over_reverse(self, cb: _CurvatureBatch, v: Tensor) -> Tensor:
        def grad_fn(p: dict[str, Tensor]) -> dict[str, Tensor]:
            return torch.func.grad(lambda q: self.loss_fn(self._call(q, cb.inputs), cb.targets))(p)

        primals = dict(zip(self.names, (p.detach() for p in self.params)))
        tangents = dict(zip(self.names, unflatten(v, self.params)))
        with self._replay_rng():
            _, hv = torch.func.jvp(grad_fn, (primals,), (tangents,))
        return flatten([hv[n] for n in self.names])

    # ------------------------------------------------------------------ trial points and updates
    def loss_at(self, delta: Tensor) -> Tensor:
        """Loss at w + delta on the same batch, same dropout masks, without touching BN running statistics."""
        params = {n: p.detach() + d for n, p, d in zip(self.names, self.params, unflatten(delta, self.params))}
        with torch.no_grad(), self._replay_rng():
            return self.reduce(self.loss_fn(self._call(params, self.inputs), self.targets))

    def loss_and_gradient_at(self, delta: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Loss and flat gradient at w + delta (w = the parameters as they are now), evaluated afresh on the batch
        with the same dropout masks and untouched BN running statistics: ``loss_at`` with a gradient. Valid after the
        parameters moved in place (line searches that move them, e.g. torch's L-BFGS)."""
        base = [p.detach() for p in self.params]
        deltas = unflatten(delta, base) if delta is not None else [None] * len(base)
        trial = [(b if d is None else b + d).requires_grad_(True) for b, d in zip(base, deltas)]
        with torch.enable_grad(), self._replay_rng():
            loss = self.loss_fn(self._call(dict(zip(self.names, trial)), self.inputs), self.targets)
            grads = torch.autograd.grad(loss, trial, allow_unused=True)
        return self.reduce(loss.detach()), self.reduce(_flat_or_zero(grads, trial))

    def invalidate(self) -> None:
        """Drop every cache (the parameters were moved by someone other than ``apply``)."""
        self._clear()

    def apply(self, delta: Tensor, alpha: float = 1.0) -> None:
        """w <- w + alpha * delta in place. The objective's caches belong to the old w and are dropped."""
        add_to_params(self.params, delta, alpha)
        self._clear()

    def per_sample_grad_sq_mean(self) -> Tensor:
        """Mean over the batch of squared per-sample gradients (flat), for Martens' diagonal preconditioner.

        Dense and 2-D convolution layers in closed form from one forward and backward: a sample's weight gradient is
        the outer product delta_i a_i^T, so sum_i g_i^2 = (delta^2)^T (a^2) (convolutions: the same per sample over
        unfolded patches). Every other parameter by ``torch.func.vmap`` over samples. Taken with the network in eval
        mode: a single sample has no batch statistics, and the preconditioner is a heuristic (Martens 2010 sec. 4.7).
        """
        was_training = self.model.training
        self.model.eval()
        try:
            sums = _dense_grad_sq_sums(self.model, self.loss_fn, self.inputs, self.targets, set(map(id, self.params)))
            rest = [n for n, p in zip(self.names, self.params) if id(p) not in sums]
            if rest:
                sums.update(self._vmap_grad_sq_sums(rest))
            total = torch.cat([sums[id(p)].reshape(-1) for p in self.params])
            return self.reduce(total / self.inputs.shape[0])
        finally:
            self.model.train(was_training)

    def _vmap_grad_sq_sums(self, names: list[str]) -> dict[int, Tensor]:
        by_name = dict(zip(self.names, self.params))
        fixed = {n: p.detach() for n, p in by_name.items() if n not in names}

        def sample_loss(free: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            return self.loss_fn(self._call({**fixed, **free}, x.unsqueeze(0)), y.unsqueeze(0))

        per_sample = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))
        free = {n: by_name[n].detach() for n in names}
        sums = {n: torch.zeros_like(p) for n, p in free.items()}
        n_samples, numel = self.inputs.shape[0], sum(p.numel() for p in free.values())
        chunk = self.per_sample_chunk or max(1, min(n_samples, 2**25 // numel))  # ~32M gradient entries at a time
        for start in range(0, n_samples, chunk):
            g = per_sample(free, self.inputs[start:start + chunk], self.targets[start:start + chunk])
            for n in names:
                sums[n] += g[n].pow(2).sum(0)
        return {id(by_name[n]): sums[n] for n in names}

    # ------------------------------------------------------------------ explicit matrices (small models, tests)
    def hessian_matrix(self, chunk_size: int = 512) -> Tensor:
        """Explicit Hessian (numel, numel) of the curvature-batch loss: columns H e_i by functorch forward-over-reverse
        (``torch.func.jvp`` of ``torch.func.grad``, vmapped over chunks of the basis), independent of ``hvp``."""
        cb = self._curvature_batch()
        flat0 = flatten([p.detach() for p in self.params])

        def loss_of_flat(w: Tensor) -> Tensor:
            return self.loss_fn(self._call(dict(zip(self.names, unflatten(w, self.params))), cb.inputs), cb.targets)

        grad_fn = torch.func.grad(loss_of_flat)
        column = torch.func.vmap(lambda e: torch.func.jvp(grad_fn, (flat0,), (e,))[1])
        eye = torch.eye(self.numel, dtype=flat0.dtype, device=flat0.device)
        with self._replay_rng():
            return torch.cat([column(eye[i:i + chunk_size]) for i in range(0, self.numel, chunk_size)])

    def ggn_matrix(self, chunk_size: int | None = 256) -> Tensor:
        """Explicit GGN J^T H_L J (numel, numel), with J from torch.func.jacrev (independent of ``ggn_vp``)."""
        cb = self._curvature_batch()
        flat0 = flatten([p.detach() for p in self.params])

        def outputs_of_flat(w: Tensor) -> Tensor:
            return self._call(dict(zip(self.names, unflatten(w, self.params))), cb.inputs)

        with self._replay_rng():
            jac = torch.func.jacrev(outputs_of_flat, chunk_size=chunk_size)(flat0)  # (B, o, numel)
        blocks = self.loss_fn.hessian_blocks(cb.outputs.detach(), cb.targets)  # (B, o, o)
        return torch.einsum("bip,bij,bjq->pq", jac, blocks, jac)

    # ------------------------------------------------------------------ statistics and helpers
    def stats(self) -> dict[str, float]:
        """Counts and wall time of the products taken on this batch (merged into an optimiser's step statistics)."""
        out = {f"curv/{k}_products": float(v) for k, v in self.product_count.items() if v}
        out["curv/product_time"] = self._timer.total()
        return out

    def _call(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """Functional forward with the given parameters and copies of the buffers (running stats stay untouched)."""
        return functional_call(self.model, {**params, **_buffer_copies(self.model)}, (x,))

    @contextlib.contextmanager
    def _replay_rng(self) -> Iterator[None]:
        """Re-draw the same dropout masks as the batch's forward pass."""
        if self._rng is None:
            self._forward()
        devices = [self.inputs.device] if self.inputs.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            _restore_rng(self._rng, self.inputs.device)
            yield

    @staticmethod
    def reduce(t: Tensor) -> Tensor:
        """Average across data-parallel ranks: the single all-reduce that makes every method distributed."""
        if _distributed():
            t = t.clone()
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= dist.get_world_size()
        return t

    @staticmethod
    def _reduce_(t: Tensor) -> None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= dist.get_world_size()


class _CurvatureBatch:
    """Outputs and loss of the batch the curvature products use (the gradient batch or a sub-batch of it)."""

    def __init__(self, inputs: Tensor, targets: Tensor, outputs: Tensor, loss: Tensor, shared: bool):
        self.inputs, self.targets, self.outputs, self.loss, self.shared = inputs, targets, outputs, loss, shared
        self.linearized = None                      # torch.func.linearize's J v (ggn_backend=linearize)
        self.j: _DoubleBackwardJ | None = None      # the J^T u graph (double-backward J v)
        self.hgraph: list[Tensor] | None = None     # the gradient with create_graph (double-backward H v)

    def build_j(self, params: list[Tensor], u: Tensor) -> Tensor:
        """J^T u by a backward with ``create_graph`` (u a leaf); the graph then serves every J v. Returns J^T u."""
        leaf = u.detach().requires_grad_(True)
        with torch.enable_grad():
            jtu = torch.autograd.grad(self.outputs, params, leaf, create_graph=True, allow_unused=True)
        self.j = _DoubleBackwardJ(self.outputs, leaf, jtu, params)
        return _flat_or_zero(jtu, params).detach()

    def build_hessian_graph(self, params: list[Tensor]) -> None:
        with torch.enable_grad():
            g = torch.autograd.grad(self.loss, params, create_graph=True, allow_unused=True)
        self.hgraph = [gi if gi is not None else torch.zeros_like(p) for gi, p in zip(g, params)]


class _DoubleBackwardJ:
    """J v as the derivative of <J^T u, v> with respect to the leaf u (the 'double-backward trick')."""

    def __init__(self, outputs: Tensor, u: Tensor, jtu: tuple, params: list[Tensor]):
        self.u = u
        self.used = [i for i, g in enumerate(jtu) if g is not None and g.requires_grad]
        self.jtu = [jtu[i] for i in self.used]
        self.params = params
        self.out_shape = outputs.shape

    def jvp(self, v: Tensor) -> Tensor:
        if not self.used:
            return torch.zeros(self.out_shape, dtype=v.dtype, device=v.device)
        vs = unflatten(v, self.params)
        (jv,) = torch.autograd.grad(self.jtu, self.u, [vs[i] for i in self.used], retain_graph=True, allow_unused=True)
        return jv if jv is not None else torch.zeros(self.out_shape, dtype=v.dtype, device=v.device)


class _ProductTimer:
    """Wall time of curvature products; CUDA events on a GPU so timing adds no host synchronisation per product."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds = 0.0
        self.events: list = []

    @contextlib.contextmanager
    def __call__(self, kind: str) -> Iterator[None]:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((start, end))
        else:
            t0 = time.perf_counter()
            yield
            self.seconds += time.perf_counter() - t0

    def total(self) -> float:
        if self.events:
            torch.cuda.synchronize()
            self.seconds += sum(s.elapsed_time(e) for s, e in self.events) / 1e3
            self.events.clear()
        return self.seconds


class _TangentFreeInputs(TorchFunctionMode):
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


def _dense_grad_sq_sums(model: nn.Module, loss_fn: Loss, x: Tensor, y: Tensor, wanted: set[int]) -> dict[int, Tensor]:
    """Sum over samples of squared per-sample gradients of nn.Linear (2-D inputs) and nn.Conv2d (groups = 1) weights
    and biases, keyed by id(parameter); one forward, one backward to the layer outputs (BackPACK's SumGradSquared)."""
    layers: list[tuple[nn.Module, Tensor, Tensor]] = []

    def capture(module: nn.Module, args: tuple, output: Tensor) -> None:
        if output.requires_grad:
            layers.append((module, args[0].detach(), output))

    handles = []
    for m in model.modules():
        dense = isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"
                                             and not isinstance(m.padding, str))
        if dense and id(m.weight) in wanted and (m.bias is None or id(m.bias) in wanted):
            handles.append(m.register_forward_hook(capture))
    try:
        with torch.enable_grad():
            out = model(x)
            layers = [(m, a, o) for m, a, o in layers if not (isinstance(m, nn.Linear) and a.dim() != 2)]
            if not layers:
                return {}
            # the batch-mean loss times B is the sum of per-sample losses: delta_i is then sample i's own signal
            deltas = torch.autograd.grad(loss_fn(out, y) * x.shape[0], [o for _, _, o in layers], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    sums: dict[int, Tensor] = {}
    for (m, a, o), d in zip(layers, deltas):
        if d is None:
            d = torch.zeros_like(o)
        if isinstance(m, nn.Linear):
            sums[id(m.weight)] = d.pow(2).T @ a.pow(2)
            if m.bias is not None:
                sums[id(m.bias)] = d.pow(2).sum(0)
            continue
        patches = F.unfold(a, m.kernel_size, dilation=m.dilation, padding=m.padding, stride=m.stride)  # (B, C k k, P)
        d = d.flatten(2)  # (B, out, P)
        w_sq = torch.zeros(m.weight.shape[0], patches.shape[1], dtype=a.dtype, device=a.device)
        chunk = max(1, 2**24 // (d.shape[1] * patches.shape[1]))
        for i in range(0, a.shape[0], chunk):
            w_sq += torch.einsum("bop,bkp->bok", d[i:i + chunk], patches[i:i + chunk]).pow(2).sum(0)
        sums[id(m.weight)] = w_sq.view_as(m.weight)
        if m.bias is not None:
            sums[id(m.bias)] = d.sum(2).pow(2).sum(0)
    return sums


def _flat_or_zero(grads: tuple, params: list[Tensor]) -> Tensor:
    return flatten([g if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)])


def _buffer_copies(model: nn.Module) -> dict[str, Tensor]:
    return {n: b.clone() for n, b in model.named_buffers()}


def _capture_rng(device: torch.device) -> tuple:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _restore_rng(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

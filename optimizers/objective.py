"""One batch = one objective: the loss, gradient and curvature products of a model on one batch.

Every optimiser's ``step(objective)`` talks to this object only. It owns

* the batch and its one forward pass (running statistics of batch norm move once, as in ``model(inputs)``);
* the dropout masks of that pass, replayed for every later evaluation on the batch (trial losses, products), which
  never touch batch-norm running statistics;
* the curvature batch (the whole batch, or its first ``curvature_batch_size`` samples: Martens 2010, "Deep learning
  via Hessian-free optimization", sec. 4.3) and the backends built on it (``optimizers.backends``), reused by every
  product of a CG solve;
* the statistics: how many products were taken and how long they took;
* ``reduce``: the one place where a data-parallel run averages across ranks. Each rank holds its shard of the
  global batch; every quantity the Objective computes is a mean over the local shard, so the global batch mean is
  sum_r (B_r / B) * local_r: one weighted all-reduce (a SUM) per gradient, per product and per scalar that drives a
  decision. All ranks therefore hold identical values and take identical steps.

Products (flat parameter vectors v of length P; f = outputs (B, o)):
    G v = J^T H_L J v   Gauss-Newton (Schraudolph 2002), on any Jacobian backend
    H v                 Hessian (Pearlmutter 1994), on any Hessian backend
    J v, J^T w          Jacobian products, H_L u the loss Hessian in output space (closed form, optimizers.losses)

Caches belong to the parameters they were computed at: moving the parameters in place (``apply``, or any in-place
update such as torch.optim's) is noticed from the tensors' version counters and drops them, so no call order is
required of the methods.
"""
from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Iterator

import torch
import torch.autograd.forward_ad as fwad
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call

from validation import checks
from optimizers.backends import (HESSIAN_BACKENDS, JACOBIAN_BACKENDS, CurvatureBatch, DoubleBackward,
                                 HessianBackend, JacobianBackend, TangentFreeInputs, auto_jacobian_backend,
                                 flat_or_zero, has_batch_norm, vjp)
from optimizers.compiled import Compiled, check_compile, compiled_forward
from optimizers.functional import FunctionalModel, RandomState, buffer_copies, call, differentiable_twice
from optimizers.interface import Curvature, checked_curvature
from optimizers.losses import Loss, get_loss
from optimizers.per_sample import grad_sq_sums
from optimizers.precision import execution_of
from optimizers.vec import add_to_params, flatten, unflatten

GGN_BACKENDS = ("auto", *JACOBIAN_BACKENDS)  # the built-in choices (the registries are read at each construction)
HVP_BACKENDS = tuple(HESSIAN_BACKENDS)


class Objective:
    """The loss of ``model`` on one batch, with its gradient and curvature products on flat parameter vectors
    (implements ``optimizers.interface.ObjectiveLike``)."""

    l2 = 0.0  # weight decay eta; see optimizers.weight_decay.WeightDecayed
    micro_batch_size = None  # one forward pass over the whole batch (optimizers.micro_batch splits it)
    local = False  # True: never all-reduce (a piece of a MicroBatchedObjective, which reduces the sum once)

    def __init__(self, model: nn.Module, loss_fn: Loss | str, inputs: Tensor, targets: Tensor, *,
                 ggn_backend: str = "auto", hvp_backend: str = "double_backward",
                 curvature_batch_size: int | None = None, per_sample_chunk: int | None = None,
                 global_batch_size: int | None = None, compile: bool = False):
        self.ggn_backend = checks.one_of("auto", *JACOBIAN_BACKENDS)("objective.ggn_backend", ggn_backend)
        self.compile = check_compile(compile, ggn_backend, inputs.device)  # torch.compile: optimizers/compiled.py
        if self.ggn_backend == "linearize" and execution_of(model).autocast_dtype is not None and has_batch_norm(model):
            raise checks.OptionError(
                "objective.ggn_backend=linearize cannot run with precision=bf16 on a model with batch norm: "
                "torch.func's forward mode fails through batch norm under autocast. Use objective.ggn_backend=auto "
                "(or forward_ad, double_backward) with precision=bf16, or precision=float32 with linearize.")
        self.hvp_backend = checks.one_of(*HESSIAN_BACKENDS)("objective.hvp_backend", hvp_backend)
        self.curvature_batch_size = checks.optional(checks.positive_int)("objective.curvature_batch_size",
                                                                         curvature_batch_size)
        self.per_sample_chunk = checks.optional(checks.positive_int)("objective.per_sample_chunk", per_sample_chunk)
        self.model, self.loss_fn = model, get_loss(loss_fn)
        self.inputs, self.targets = inputs, targets
        world = dist.get_world_size() if _distributed() else 1
        # this rank's share of the global batch mean (data parallelism; 1 in a single process)
        self.share = inputs.shape[0] / (global_batch_size or inputs.shape[0] * world)
        self.product_count = {"ggn": 0, "hvp": 0, "jvp": 0, "vjp": 0}
        self.comm = {"calls": 0, "bytes": 0, "seconds": 0.0}
        self._random_state: RandomState | None = None  # of the batch's forward pass (its dropout masks)
        self._draws_random = False  # that forward pass drew random numbers (dropout, stochastic depth)
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
    def jacobian_backend(self) -> str:
        """The Jacobian backend in use (``auto`` resolved against the model's layers)."""
        if self.compile:
            return Compiled.name
        return auto_jacobian_backend(self.model) if self.ggn_backend == "auto" else self.ggn_backend

    @functools.cached_property
    def _timer(self) -> _ProductTimer:
        return _ProductTimer(self.inputs.device)

    # ------------------------------------------------------------------ forward, loss, gradient
    def _clear(self) -> None:
        """Drop everything computed at the current parameters (the dropout masks stay: they belong to the batch)."""
        self._outputs: Tensor | None = None
        self._loss: Tensor | None = None
        self._grad: Tensor | None = None
        self._curv: CurvatureBatch | None = None
        self._versions: tuple[int, ...] | None = None

    def _forward(self, first_order: bool = False) -> None:
        """Outputs and loss at the current parameters, with their graph. The batch's first forward pass is the
        model's own (running statistics move once); it runs attention through the twice-differentiable kernel
        (``functional.differentiable_twice``) unless it only serves the first-order path (``first_order``)."""
        if self._outputs is not None and self._versions != self._param_versions():
            self._clear()  # the parameters were moved in place since the caches were filled
        if self._outputs is not None:
            return
        with torch.enable_grad():
            if self._random_state is None:  # the batch's one real forward pass
                self._random_state = RandomState.capture(self.inputs.device)
                forward = compiled_forward(self.model) if first_order and self.compile else self.model
                with contextlib.nullcontext() if first_order else differentiable_twice():
                    self._outputs = forward(self.inputs)
                self._draws_random = not self._random_state.unchanged()
            else:                           # the parameters moved: same masks, running statistics untouched
                net = self._functional()
                with net.replay_rng():
                    self._outputs = net(dict(self._named), self.inputs)
            self._loss = self.loss_fn(self._outputs, self.targets)
        self._versions = self._param_versions()

    def _param_versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.params)

    def outputs(self) -> Tensor:
        """Network outputs f on the batch (B, o), detached."""
        self._forward()
        return self._outputs.detach()

    def loss(self) -> Tensor:
        """The batch loss at the current parameters (0-dim, detached)."""
        self._forward()
        return self.reduce(self._loss.detach())

    def backward(self, scale: float = 1.0) -> Tensor:
        """First-order path: ``(scale * loss).backward()`` into ``p.grad`` (one flat all-reduce across ranks); returns
        the loss. Frees the graph."""
        self._forward(first_order=True)
        (self._loss * scale if scale != 1.0 else self._loss).backward()
        if _distributed() and not self.local:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            for p, g in zip(self.params, unflatten(self.reduce(flatten(grads)), self.params)):
                p.grad = g
        loss = self.reduce(self._loss.detach())
        self._clear()
        return loss

    def gradient(self, curvature: Curvature | None = None) -> Tensor:
        """Flat gradient of the batch loss (cached).

        ``curvature="ggn"`` or ``"hessian"`` announces that products of that curvature will follow: the gradient
        then comes out of the backward that sets up their backend where it can (double-backward backends on the
        whole batch), so a method pays one backward for both.
        """
        if curvature is not None:
            checked_curvature(curvature)
        self._forward()
        if self._grad is None and curvature is not None and self._curvature_on_whole_batch:
            backend = self._jacobian() if curvature == "ggn" else self._hessian()
            if backend.gradient is not None:
                self._grad = self.reduce(backend.gradient)
        if self._grad is None:
            grads = torch.autograd.grad(self._loss, self.params, retain_graph=True, allow_unused=True)
            self._grad = self.reduce(flat_or_zero(grads, self.params))
        return self._grad

    def output_grad(self) -> Tensor:
        """g_f = dL/df (B, o), closed form for the matching losses."""
        self._forward()
        return self.loss_fn.output_grad(self._outputs, self.targets)

    def l2_gradient(self) -> Tensor | None:
        """The regulariser's gradient eta w (None: no weight decay; see ``WeightDecayed``)."""
        return None

    def forward_with_jvp(self, v: Tensor) -> Tensor:
        """J v (B, o) computed by the batch's forward pass itself, carrying the tangent v by forward-mode AD.

        Outputs, loss, graph and dropout masks are left exactly as ``loss()`` would leave them (batch-norm running
        statistics move once), so a method that needs J z first (CurveBall) gets it with the forward. When the
        forward has already run, or curvature uses a sub-batch, this is ``jvp(v)``.
        """
        if self._random_state is not None or not self._curvature_on_whole_batch:
            return self.jvp(v)
        with self._timer("jvp"):
            self.product_count["jvp"] += 1
            self._random_state = RandomState.capture(self.inputs.device)
            buffers = buffer_copies(self.model)
            try:
                with torch.enable_grad(), fwad.dual_level(), TangentFreeInputs(), differentiable_twice():
                    dual = {n: fwad.make_dual(p, t) for n, p, t in zip(self.names, self.params, unflatten(v, self.params))}
                    outputs, jv = fwad.unpack_dual(functional_call(self.model, {**dual, **buffers}, (self.inputs,)))
                self._draws_random = not self._random_state.unchanged()
            except BaseException:
                self._random_state.restore()  # leave the RNG as if nothing had run
                self._random_state = None
                raise
            with torch.no_grad():  # model(inputs) would have moved the running statistics: commit the copies' update
                for name, buf in self.model.named_buffers():
                    buf.copy_(buffers[name])
            self._outputs = outputs
            with torch.enable_grad():
                self._loss = self.loss_fn(outputs, self.targets)
            self._versions = self._param_versions()
            return jv.detach()

    # ------------------------------------------------------------------ curvature products
    def ggn_vp(self, v: Tensor) -> Tensor:
        """G v = J^T H_L J v on the curvature batch (undamped)."""
        with self._timer("ggn"):
            self.product_count["ggn"] += 1
            backend, cb = self._jacobian(), self._curvature_batch()
            if getattr(backend, "fused_ggn", False):  # the backend computes G v as a whole (optimizers.compiled)
                return self.reduce(backend.ggn_vp(v))
            return self.reduce(vjp(cb, self.params, self.loss_fn.hessian_vp(cb.outputs, cb.targets, backend.jvp(v))))

    def hvp(self, v: Tensor) -> Tensor:
        """H v, the exact Hessian of the loss on the curvature batch times v (undamped)."""
        with self._timer("hvp"):
            self.product_count["hvp"] += 1
            return self.reduce(self._hessian().hvp(v))

    def curvature_vp(self, v: Tensor, curvature: Curvature = "ggn") -> Tensor:
        """G v or H v by name: the one entry point solvers use."""
        return self.ggn_vp(v) if checked_curvature(curvature) == "ggn" else self.hvp(v)

    def jvp(self, v: Tensor, backend: str | None = None) -> Tensor:
        """J v: output-space directional derivative (B, o) on the curvature batch; ``backend`` overrides the default."""
        with self._timer("jvp"):
            self.product_count["jvp"] += 1
            return self._jacobian(backend).jvp(v)

    def vjp(self, w: Tensor, keep_for_jvp: bool = False) -> Tensor:
        """J^T w for an output-shaped w on the curvature batch, as a flat vector.

        ``keep_for_jvp=True`` takes this backward with ``create_graph``, so that it doubles as the set-up of the
        double-backward backend for later ``jvp`` calls (CurveBall's J dz after its J^T u).
        """
        with self._timer("vjp"):
            self.product_count["vjp"] += 1
            cb = self._curvature_batch()
            if not keep_for_jvp:
                return self.reduce(vjp(cb, self.params, w))
            cb.backends[DoubleBackward.name] = backend = DoubleBackward(self._functional(), cb, u=w)
            return self.reduce(backend.jtu)

    def loss_hessian_vp(self, u: Tensor) -> Tensor:
        """H_L u on the curvature batch's outputs."""
        cb = self._curvature_batch()
        return self.loss_fn.hessian_vp(cb.outputs, cb.targets, u)

    def curvature_output_grad(self) -> Tensor:
        """g_f on the curvature batch (equals ``output_grad`` when no sub-batch is used)."""
        cb = self._curvature_batch()
        return self.loss_fn.output_grad(cb.outputs, cb.targets)

    def set_curvature_batch_size(self, size: int) -> None:
        """Take curvature products on the batch's first ``size`` samples from now on (a method's own default for
        ``curvature_batch_size``, e.g. Hessian-free's curvature mini-batch). Must precede the first product."""
        if self._curv is not None:
            raise RuntimeError("set_curvature_batch_size must be called before the first curvature product")
        self.curvature_batch_size = checks.positive_int("curvature batch size", size)

    @property
    def _curvature_on_whole_batch(self) -> bool:
        k = self.curvature_batch_size
        return k is None or k >= self.inputs.shape[0]

    def _curvature_batch(self) -> CurvatureBatch:
        self._forward()
        if self._curv is None:
            if self._curvature_on_whole_batch:
                self._curv = CurvatureBatch(self.inputs, self.targets, self._outputs, self._loss, shared=True)
            else:  # Martens 2010 sec. 4.3: a sub-batch. Its forward must not move BN running statistics. Replaying
                   # the batch's random state draws masks for the k samples afresh (only the first random layer's
                   # match the batch's rows), and batch norm uses the sub-batch's statistics: the curvature of the
                   # same network on k samples, an estimate as the sub-sample itself is.
                k, net = self.curvature_batch_size, self._functional()
                x, y = self.inputs[:k], self.targets[:k]
                with torch.enable_grad(), net.replay_rng():
                    out = net(dict(self._named), x)
                self._curv = CurvatureBatch(x, y, out, self.loss_fn(out, y), shared=False)
        return self._curv

    def _jacobian(self, name: str | None = None) -> JacobianBackend:
        cb, name = self._curvature_batch(), name or self.jacobian_backend
        if name not in cb.backends:
            backend = Compiled if name == Compiled.name else \
                JACOBIAN_BACKENDS[checks.one_of(*JACOBIAN_BACKENDS)("jvp backend", name)]
            cb.backends[name] = backend(self._functional(), cb)
        return cb.backends[name]

    def _hessian(self) -> HessianBackend:
        cb = self._curvature_batch()
        key = "hessian/" + self.hvp_backend
        if key not in cb.backends:
            cb.backends[key] = HESSIAN_BACKENDS[self.hvp_backend](self._functional(), cb)
        return cb.backends[key]

    def _functional(self) -> FunctionalModel:
        """The batch's function for backends and trial points: f(w; x) replaying the forward pass's dropout masks."""
        if self._random_state is None:
            self._forward()
        return FunctionalModel(self.model, self.names, self.params, self.loss_fn, self._random_state,
                               self._draws_random)

    # ------------------------------------------------------------------ trial points and updates
    def loss_at(self, delta: Tensor) -> Tensor:
        """Loss at w + delta on the same batch, same dropout masks, without touching BN running statistics."""
        net = self._functional()
        params = net.by_name([p.detach() + d for p, d in zip(self.params, unflatten(delta, self.params))])
        with torch.no_grad(), net.replay_rng():
            return self.reduce(self.loss_fn(net(params, self.inputs), self.targets))

    def loss_and_gradient_at(self, delta: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Loss and flat gradient at w + delta (w = the parameters as they are now), evaluated afresh on the batch
        with the same dropout masks and untouched BN running statistics: ``loss_at`` with a gradient."""
        base = [p.detach() for p in self.params]
        deltas = unflatten(delta, base) if delta is not None else [None] * len(base)
        trial = [(b if d is None else b + d).requires_grad_(True) for b, d in zip(base, deltas)]
        net = self._functional()
        with torch.enable_grad(), net.replay_rng():
            loss = self.loss_fn(net(net.by_name(trial), self.inputs), self.targets)
            grads = torch.autograd.grad(loss, trial, allow_unused=True)
        return self.reduce(loss.detach()), self.reduce(flat_or_zero(grads, trial))

    def apply(self, delta: Tensor, alpha: float = 1.0) -> None:
        """w <- w + alpha * delta in place. The objective's caches belong to the old w and are dropped."""
        add_to_params(self.params, delta, alpha)
        self._clear()

    def release(self) -> None:
        """Drop the forward graph and every cache (memory); the dropout masks stay. Later calls rebuild what they need
        with the same masks and without touching batch-norm running statistics."""
        self._clear()

    def per_sample_grad_sq_mean(self) -> Tensor:
        """Mean over the batch of squared per-sample gradients (flat), for Martens' diagonal preconditioner
        (``optimizers.per_sample``). Taken with the network in eval mode (dropout and stochastic depth off, batch norm
        on its running statistics): in train mode a sample's gradient is not its own (batch norm mixes the samples
        through the batch statistics) and no closed form or vmap over samples can redraw the batch's masks. The
        preconditioner is a heuristic (Martens 2010 sec. 4.7): it changes how fast CG converges, not its solution."""
        modes = [(m, m.training) for m in self.model.modules()]  # per module: a frozen backbone's eval-mode batch
        self.model.eval()                                        # norm must stay in eval mode afterwards
        try:
            sums = grad_sq_sums(self.model, self.loss_fn, self.inputs, self.targets, self._named,
                                functools.partial(call, self.model), self.per_sample_chunk)
            return self.reduce(flatten(sums) / self.inputs.shape[0])
        finally:
            for module, training in modes:
                module.training = training

    def hessian_matrix(self, chunk_size: int = 512) -> Tensor:
        """Explicit Hessian (P, P) of the curvature-batch loss, for small models (explicit Newton, full spectra):
        columns H e_i by ``torch.func`` forward-over-reverse, vmapped over chunks of the basis.

        The network is evaluated once per chunk (the columns are vmapped tangents of one unbatched forward pass), so
        with ``randomness="same"`` and the random state replayed for each chunk every random operation draws exactly
        what the batch's forward pass drew: dropout and stochastic depth keep the batch's masks."""
        cb, net = self._curvature_batch(), self._functional()
        flat0 = flatten([p.detach() for p in self.params])

        def loss_of_flat(w: Tensor) -> Tensor:
            return self.loss_fn(net(net.by_name(unflatten(w, self.params)), cb.inputs), cb.targets)

        grad_fn = torch.func.grad(loss_of_flat)
        column = torch.func.vmap(lambda e: torch.func.jvp(grad_fn, (flat0,), (e,))[1], randomness="same")
        eye = torch.eye(self.numel, dtype=flat0.dtype, device=flat0.device)
        chunks = []
        for i in range(0, self.numel, chunk_size):
            with net.replay_rng():
                chunks.append(column(eye[i:i + chunk_size]))
        return self.reduce(torch.cat(chunks))

    # ------------------------------------------------------------------ statistics and helpers
    def stats(self) -> dict[str, float]:
        """Counts and wall time of the products taken on this batch, and the all-reduces of a data-parallel run
        (merged into an optimiser's step statistics)."""
        out = {f"curv/{k}_products": float(v) for k, v in self.product_count.items() if v}
        if out:
            out["curv/product_time"] = self._timer.total()
        if self.comm["calls"]:
            out.update({"comm/all_reduces": float(self.comm["calls"]), "comm/bytes": float(self.comm["bytes"]),
                        "comm/time": self.comm["seconds"]})
        return out

    def reduce(self, t: Tensor) -> Tensor:
        """The global batch mean of a local batch-mean quantity: sum over ranks of share * t, one all-reduce.

        The single all-reduce that makes every method data-parallel; the identity in a single process. Its calls,
        bytes and seconds are reported by ``stats()`` as ``comm/*``.
        """
        if self.local or not _distributed():
            return t
        return weighted_all_reduce(t, self.share, self.comm)


def weighted_all_reduce(t: Tensor, share: float, comm: dict) -> Tensor:
    """sum over ranks of share * t (one all-reduce), counted in ``comm`` (calls, bytes, seconds)."""
    t0 = time.perf_counter()
    t = t * share
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    comm["calls"] += 1
    comm["bytes"] += t.numel() * t.element_size()
    comm["seconds"] += time.perf_counter() - t0
    return t


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


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

"""K-FAC: natural-gradient steps with a Kronecker-factored, block-diagonal Fisher (Martens & Grosse 2015).

One step (``update``), with lr the scheduled learning rate and gamma the damping:

1. factor step (every ``factor_every`` steps): hooks on the covered layers read the Objective's own forward and the
   backward pass(es) of the chosen Fisher type (fisher.py), and the batch's A and G (factors.py) are averaged over
   data-parallel ranks (one ``objective.reduce`` of their concatenation) and into the moving averages. The gradient
   comes from ``objective.backward()``; the empirical Fisher's output gradients are that backward's own (no extra
   pass), the sampled Fisher's take one extra backward from the network output to the layer outputs (no parameter
   gradients), the GGN type's one such pass per output;
2. inverse step (every ``inverse_every`` steps): eigendecompositions of every A and G (preconditioner.py);
3. per covered layer, dW = (G (x) A + gamma I)^-1 grad in the eigenbasis (or factored Tikhonov damping);
4. KL clipping (Ba, Grosse & Martens 2017, Distributed second-order optimization using Kronecker-factored
   approximations, sec. 5): nu = min(1, sqrt(kappa / sum_layers lr^2 <dW, grad>)), dW <- nu dW;
5. layers K-FAC does not cover (batch norm, embeddings, anything but Linear and Conv2d) take the plain gradient
   (``uncovered=sgd``) or the gradient over the root of its running second moment (``uncovered=adam``: Adam's v,
   bias-corrected); they are not part of the KL clip;
6. heavy-ball momentum on the whole direction u: m <- mu m + u; w <- w - lr m (as torch's SGD, which the authors'
   PyTorch ports apply to the preconditioned gradient).

Weight decay eta comes from the base class (the gradient gains eta w); its curvature eta I joins the damping:
gamma + eta (Martens & Grosse 2015 sec. 6.1 add the regulariser's curvature to the damped Fisher the same way).
"""
from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from optimizers import monitor as step_monitor
from optimizers.base import Optimizer
from optimizers.interface import ObjectiveLike
from validation.checks import OptionError, in_range, one_of, option, optional, positive, positive_int
from optimizers.kfac.factors import Capture, Layer, batch_factors, covered_layers
from optimizers.kfac.fisher import FISHER_TYPES, hessian_sqrt_signals, sampled_signal
from optimizers.kfac.preconditioner import DAMPING_MODES, KroneckerBlock
from optimizers.schedules import ScheduleOptions, Scheduled
from optimizers.vec import flatten, unflatten

UNCOVERED = ("sgd", "adam")


@dataclass(frozen=True)
class KFACOptions(ScheduleOptions):
    lr: float = option(0.1, positive)  # learning rate of the preconditioned (and KL-clipped) step
    momentum: float = option(0.9, in_range(0.0, 1.0, high_open=True))  # heavy-ball momentum on the update
    damping: float = option(0.3, positive)  # gamma, on G at one sample's scale (factors.py, "Scale of G")
    damping_mode: str = option("eigenbasis", one_of(*DAMPING_MODES))  # eigenbasis: d_G d_A^T + gamma | factored
    fisher: str = option("sampled", one_of(*FISHER_TYPES))  # sampled | empirical | ggn (= exact): see fisher.py
    factor_decay: float = option(0.95, in_range(0.0, 1.0, high_open=True))  # moving average of A and G
    factor_every: int = option(1, positive_int)  # update A and G every this many steps
    inverse_every: int = option(10, positive_int)  # eigendecompose A and G every this many steps
    kl_clip: float | None = option(1e-3, optional(positive))  # kappa of the KL clip; null: no clipping
    uncovered: str = option("sgd", one_of(*UNCOVERED))  # layers without factors: sgd (gradient) | adam (g/sqrt(v))
    adam_beta2: float = option(0.999, in_range(0.0, 1.0, high_open=True))  # uncovered=adam: decay of v
    adam_eps: float = option(1e-8, positive)  # uncovered=adam: added to sqrt(v)


class KFAC(Scheduled, Optimizer):
    """K-FAC for nn.Linear and nn.Conv2d layers (KFC), any other parameter by the fall-back (module docstring)."""

    Options = KFACOptions

    def __init__(self, params: Iterable[Tensor], **options: Any):
        super().__init__(params, **options)
        p0 = self.params[0]
        self.momentum_buffer = torch.zeros(self.numel, dtype=p0.dtype, device=p0.device)
        self.adam_v: Tensor | None = None  # uncovered=adam: second moment of the uncovered entries (flat)
        self.factor_updates = 0
        self.blocks: dict[str, KroneckerBlock] = {}
        self.layers: dict[str, Layer] | None = None  # found on the first step (needs the objective's model)
        self.uncovered: list[int] = []
        self._extra_backwards = 0  # backward passes of Fisher signals in the current step (logged)

    # ------------------------------------------------------------------ the step
    def update(self, objective: ObjectiveLike) -> dict[str, Any]:
        o = self.options
        layers = self._cover(objective)
        for p in self.params:
            p.grad = None
        factor_time = inverse_time = 0.0
        self._extra_backwards = 0
        if self.steps % o.factor_every == 0:
            loss, factor_time = self._gradient_and_factors(objective, layers)
        else:
            loss = objective.backward()
        stale = [b for b in self.blocks.values() if b.A is not None and not b.ready]
        if self.steps % o.inverse_every == 0 or stale:
            with _Clock(self.params[0].device) as clock:
                for k, block in enumerate(self.blocks.values(), 1):
                    block.decompose()
                    step_monitor.current().report("K-FAC eigendecomposition", k, of=len(self.blocks))
            inverse_time = clock.seconds
        grad = flatten([p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params])
        lr = self.learning_rate()
        damping = o.damping + float(objective.l2)
        direction, nu = self._direction(grad, lr, damping)
        buffer = self.momentum_buffer.mul_(o.momentum).add_(direction)
        objective.apply(buffer, alpha=-lr)
        return {"loss": loss, "lr": lr, "damping": damping, "kfac/kl_clip": nu, "kfac/factor_time": factor_time,
                "kfac/inverse_time": inverse_time, "kfac/extra_backwards": self._extra_backwards,
                "update_norm": lr * buffer.norm(), **objective.stats()}

    def _cover(self, objective: ObjectiveLike) -> dict[str, Layer]:
        if self.layers is None:
            layers = covered_layers(objective.model, self.params)
            if self.blocks and set(self.blocks) != set(layers):
                raise ValueError(f"the K-FAC state was saved for the layers {sorted(self.blocks)}, but this model's "
                                 f"covered layers are {sorted(layers)}.")
            for name in layers:
                self.blocks.setdefault(name, KroneckerBlock())
            covered = {i for layer in layers.values() for i in (layer.weight, layer.bias) if i is not None}
            self.uncovered = [i for i in range(len(self.params)) if i not in covered]
            self.layers = layers
        return self.layers

    # ------------------------------------------------------------------ factors
    def _gradient_and_factors(self, objective: ObjectiveLike, layers: dict[str, Layer]) -> tuple[Tensor, float]:
        """The loss (gradient in p.grad) and the factor update; returns the loss and the time spent on factors."""
        if objective.micro_batch_size is not None:
            raise OptionError("optimizer=kfac reads its factors from one forward and backward pass over the whole "
                              "batch: objective.micro_batch_size must be null (for less memory, lower "
                              "trainer.batch_size).")
        kind = self.options.fisher
        clock = _Clock(self.params[0].device)
        with Capture(objective.model, layers) as capture:
            if kind == "empirical":
                with capture.recording():
                    loss = objective.backward()  # the gradient's own backward brings the output gradients
            else:
                with clock:
                    signals = self._signals(objective, kind)
                    for k, signal in enumerate(signals, 1):
                        capture.backward(signal)
                        self._extra_backwards += 1
                        step_monitor.current().report("K-FAC Fisher backward", k, of=len(signals))
                loss = objective.backward()
            with clock:
                self._update_factors(capture, layers, objective, mean_loss_signal=kind == "empirical")
        return loss, clock.seconds

    @staticmethod
    def _signals(objective: ObjectiveLike, kind: str) -> list[Tensor]:
        if objective.curvature_batch_size is not None:
            raise OptionError("optimizer=kfac takes its factors on the whole batch: objective.curvature_batch_size "
                              "must be null.")
        outputs = objective.outputs()  # the batch's one forward: the hooks record every covered layer's input
        if kind == "sampled":
            return [sampled_signal(objective.loss_fn, outputs)]
        return hessian_sqrt_signals(objective.loss_fn, outputs, objective.targets)

    def _update_factors(self, capture: Capture, layers: dict[str, Layer], objective: ObjectiveLike,
                        mean_loss_signal: bool) -> None:
        batch = {name: batch_factors(layer, capture.calls[name], mean_loss_signal) for name, layer in layers.items()}
        seen = [name for name, factors in batch.items() if factors is not None]
        if not seen:
            if layers:
                raise RuntimeError("K-FAC's hooks saw no forward and backward pass of the covered layers: the "
                                   "objective's forward must first run inside step() (one fresh Objective per step).")
            return
        parts = [t for name in seen for t in batch[name]]
        flat = objective.reduce(flatten(parts))  # the one all-reduce of the factors (identity in one process)
        self.factor_updates += 1
        pieces = unflatten(flat, parts)  # A, G, A, G, ... in the order of `seen`
        for k, name in enumerate(seen):
            self.blocks[name].update(pieces[2 * k], pieces[2 * k + 1], self.factor_updates, self.options.factor_decay)

    # ------------------------------------------------------------------ the direction
    def _direction(self, grad: Tensor, lr: float, damping: float) -> tuple[Tensor, Tensor | float]:
        """u: KL-clipped preconditioned gradient on covered layers, the fall-back elsewhere; and nu."""
        o = self.options
        grads = unflatten(grad, self.params)
        direction = torch.empty_like(grad)
        out = unflatten(direction, self.params)
        pre, plain = [], list(self.uncovered)
        for name, layer in self.layers.items():
            block = self.blocks[name]
            if not block.ready:  # a layer that has not been reached by any backward pass yet
                plain += [i for i in (layer.weight, layer.bias) if i is not None]
                continue
            v = layer.gradient_matrix(grads)
            pre.append((layer, v, block.precondition(v, damping, o.damping_mode)))
        nu = self._kl_clip(pre, lr)
        for layer, _, d in pre:
            layer.scatter(d * nu, out)
        for i in plain:
            out[i].copy_(grads[i])
        if o.uncovered == "adam" and self.uncovered:
            self._adam_scale([out[i] for i in self.uncovered])
        return direction, nu

    def _kl_clip(self, pre: list[tuple[Layer, Tensor, Tensor]], lr: float) -> Tensor | float:
        kappa = self.options.kl_clip
        if kappa is None or not pre:
            return 1.0
        vg = sum((d * v).sum() for _, v, d in pre) * lr**2
        return torch.sqrt(kappa / vg.clamp_min(torch.finfo(vg.dtype).tiny)).clamp(max=1.0)

    def _adam_scale(self, views: list[Tensor]) -> None:
        """In place: g / (sqrt(v_hat) + eps) with v the running mean of g^2 (Kingma & Ba 2014, Algorithm 1)."""
        o = self.options
        g = flatten(views)
        if self.adam_v is None:
            self.adam_v = torch.zeros_like(g)
        self.adam_v.mul_(o.adam_beta2).addcmul_(g, g, value=1.0 - o.adam_beta2)
        v_hat = self.adam_v / (1.0 - o.adam_beta2 ** (self.steps + 1))
        for view, scaled in zip(views, unflatten(g / (v_hat.sqrt() + o.adam_eps), views)):
            view.copy_(scaled)

    # ------------------------------------------------------------------ state
    def gradients_per_step(self) -> tuple[float, str]:
        """A rough cost per step, in gradients (one forward and backward pass over the batch), and how it comes about,
        for the runner's up-front estimate (runner/cost.py)."""
        o = self.options
        extra = {"empirical": 0.2, "sampled": 0.7}.get(o.fisher, 5.0)  # ggn: a backward per output (10 assumed)
        return 1 + extra, (f"optimizer.fisher={o.fisher}: ~{1 + extra:.2g} gradients per step, plus eigendecompositions "
                           f"every optimizer.inverse_every={o.inverse_every} steps")

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "factor_updates": self.factor_updates,
                "momentum": self.momentum_buffer.clone(),
                "adam_v": None if self.adam_v is None else self.adam_v.clone(),
                "blocks": {name: block.state_dict() for name, block in self.blocks.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.layers is not None and state["blocks"] and set(state["blocks"]) != set(self.layers):
            raise ValueError(f"the K-FAC state holds the layers {sorted(state['blocks'])}, but this model's covered "
                             f"layers are {sorted(self.layers)}.")
        self.steps, self.factor_updates = int(state["steps"]), int(state["factor_updates"])
        self.momentum_buffer = state["momentum"].clone()
        self.adam_v = None if state["adam_v"] is None else state["adam_v"].clone()
        self.blocks = {}
        for name, block_state in state["blocks"].items():
            self.blocks[name] = KroneckerBlock()
            self.blocks[name].load_state_dict(block_state)
        if not self.blocks:  # a state from before the first step: the next step finds the layers again
            self.layers = None


class _Clock:
    """Wall time accumulated over ``with clock:`` sections; CUDA is synchronised at both ends of each."""

    def __init__(self, device: torch.device):
        self.cuda, self.seconds, self._t0 = device.type == "cuda", 0.0, 0.0

    def __enter__(self) -> _Clock:
        if self.cuda:
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - self._t0

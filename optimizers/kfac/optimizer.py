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

With ``rescale=true`` steps 4 and 6 are Martens & Grosse 2015's own (sec. 6.4, 7; quadratic_model.py): the update is
alpha Delta + mu delta0, Delta = -u, delta0 the previous update, alpha and mu minimising the EXACT quadratic model
of the batch (two J v products a step; ``lr``, its schedule, ``momentum`` and the KL clip are not used);
``adaptive_damping=true`` adds its Levenberg-Marquardt rule on the model's lambda every T1 steps and the greedy
choice of the factors' gamma every T2 steps (sec. 6.5-6.6).

Why these are options and not the defaults (issue 17): on mini-batches of 64-128 the Levenberg-Marquardt test
measures the exact model on the very batch it was fitted to; over a two-dimensional span that model is accurate
(rho ~1), so lambda falls by omega1 at every test (1 -> 5.6e-59 in 3,000 steps on seed 003's MNIST MLP at batch
64), alpha and mu fit each batch's noise (mu between -15 and +14) and the run ends worse than it was (test accuracy
94.3 % at best, 87.0 % at step 3,000; the KL-clipped default: 96.1 %, its tuned file 97.0 %). Taking the
model's curvature on a quarter of the batch made it diverge. Martens & Grosse pair the rule with large and growing
mini-batches in their experiments. The KL-clipped default (lr 0.1, momentum 0.9, kappa 1e-3) trains every Quickstart and seed
model without degrading (docs/benchmarks/defaults.md).

Two covered layers that share a parameter (tied weights) are refused at the first step: a Kronecker block belongs to
one layer, so each block would precondition the shared gradient in turn and the KL clip would count it twice.

Weight decay eta comes from the base class (the gradient gains eta w); its curvature eta I joins the damping:
gamma + eta (Martens & Grosse 2015 sec. 6.1 add the regulariser's curvature to the damped Fisher the same way).
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from optimizers import monitor as step_monitor
from optimizers.base import Optimizer
from optimizers.interface import ObjectiveLike
from validation.checks import OptionError, boolean, fail, in_range, one_of, option, optional, positive, positive_int
from optimizers.kfac.factors import Capture, Layer, batch_factor_sums, covered_layers
from optimizers.kfac.fisher import FISHER_TYPES, hessian_sqrt_signals, sampled_signal
from optimizers.kfac.preconditioner import DAMPING_MODES, KroneckerBlock
from optimizers.kfac import quadratic_model
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
    rescale: bool = option(False, boolean)  # alpha, mu from the exact quadratic model (M&G 2015 sec. 6.4, 7)
    adaptive_damping: bool = option(False, boolean)  # LM on lambda, greedy gamma (M&G 2015 sec. 6.5-6.6)
    damping_every: int = option(5, positive_int)  # T1: Levenberg-Marquardt test of lambda every T1 steps
    gamma_every: int = option(20, positive_int)  # T2: greedy choice of gamma every T2 steps

    def validate(self) -> None:
        super().validate()
        if self.rescale and self.kl_clip is not None:
            fail(self.key("kl_clip"), self.kl_clip, f"must be null with {self.key('rescale')}=true: the quadratic "
                 "model sets the step length (Martens & Grosse 2015 sec. 6.4).")
        if self.adaptive_damping and not self.rescale:
            fail(self.key("adaptive_damping"), True, f"needs {self.key('rescale')}=true: lambda is adapted from "
                 "the exact quadratic model the rescaling computes (Martens & Grosse 2015 sec. 6.5).")


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
        o = self.options
        self.lam = o.damping            # rescale: lambda, the damping of the exact quadratic model
        self.gamma: float | None = None  # rescale: gamma, the factors' damping (lambda + eta on the first step)

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
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        stats = {"loss": loss, "kfac/factor_time": factor_time, "kfac/inverse_time": inverse_time,
                 "kfac/extra_backwards": self._extra_backwards}
        if o.rescale:
            stats.update(self._rescaled_step(objective, flatten(grads), loss))
            return {**stats, **objective.stats()}
        lr = self.learning_rate()
        stats["lr"] = lr
        damping = o.damping + float(objective.l2)
        direction, nu = self._direction(grads, lr, damping)
        buffer = self.momentum_buffer.mul_(o.momentum).add_(direction)
        objective.apply(buffer, alpha=-lr)
        return {**stats, "damping": damping, "kfac/kl_clip": nu, "update_norm": lr * buffer.norm(),
                **objective.stats()}

    def _rescaled_step(self, objective: ObjectiveLike, grad: Tensor, loss: Tensor) -> dict[str, Any]:
        """delta = alpha Delta + mu delta0 from the exact quadratic model (no learning rate, no KL clip), lambda and
        gamma adapted (Martens & Grosse 2015 sec. 6.4-6.6; optimizers/kfac/quadratic_model.py)."""
        o, eta = self.options, float(objective.l2)
        if self.gamma is None:
            self.gamma = self.lam + eta  # sec. 6.6: gamma_MG = sqrt(lambda + eta), i.e. gamma = lambda + eta here
        adapt = o.adaptive_damping
        omega2 = (19 / 20) ** o.gamma_every
        gammas = [self.gamma]
        if adapt and (self.steps + 1) % o.gamma_every == 0:
            gammas += [self.gamma * omega2, self.gamma / omega2]
        t0 = time.perf_counter()
        directions = [-self._direction(grad, 1.0, g, clip=False, update_adam=i == 0)[0] for i, g in enumerate(gammas)]
        prev = self.momentum_buffer  # delta0, the previous update as applied
        has_prev = bool(prev.ne(0).any())
        vectors = directions + ([prev] if has_prev else [])
        gram_c = quadratic_model.gram(objective, vectors)
        k = len(directions)
        best = None
        for i, (g, d) in enumerate(zip(gammas, directions)):
            idx = [i, k] if has_prev else [i]
            sol = quadratic_model.solve(gram_c[idx][:, idx], [d] + ([prev] if has_prev else []), grad, self.lam + eta)
            if best is None or sol.model_change < best[2].model_change:
                best = (g, d, sol)
        self.gamma, direction, sol = best
        step = direction * sol.alpha
        if has_prev and sol.mu != 0.0:
            step = step.add_(prev, alpha=sol.mu)
        stats: dict[str, Any] = {"damping": self.gamma, "kfac/lambda": self.lam, "kfac/alpha": sol.alpha,
                                 "kfac/mu": sol.mu, "kfac/model_change": sol.model_change}
        if adapt and (self.steps + 1) % o.damping_every == 0:
            predicted = sol.model_change  # M(delta) - M(0), the model with its damping lambda + eta
            rho = (float(objective.loss_at(step)) - float(loss)) / predicted if predicted < 0 else math.nan
            self.lam = quadratic_model.levenberg_marquardt(self.lam, rho, (19 / 20) ** o.damping_every)
            stats["kfac/rho"] = rho
        stats["kfac/model_time"] = time.perf_counter() - t0
        objective.apply(step)
        self.momentum_buffer = step
        stats["update_norm"] = step.norm()
        return stats

    def _cover(self, objective: ObjectiveLike) -> dict[str, Layer]:
        if self.layers is None:
            layers = covered_layers(objective.model, self.params)
            _refuse_shared(objective.model, layers, self.params)
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
        batch = {name: batch_factor_sums(layer, capture.calls[name], mean_loss_signal)
                 for name, layer in layers.items()}
        seen = [name for name, sums in batch.items() if sums is not None]
        if not seen:
            if layers:
                raise RuntimeError("K-FAC's hooks saw no forward and backward pass of the covered layers: the "
                                   "objective's forward must first run inside step() (one fresh Objective per step).")
            return
        self.factor_updates += 1
        k, decay = self.factor_updates, self.options.factor_decay
        if not _distributed():  # objective.reduce is the identity: the counts' division joins the moving average
            for name in seen:
                s = batch[name]
                self.blocks[name].update(s.a, s.g, k, decay, a_scale=1.0 / s.a_count, g_scale=1.0 / s.g_count)
            return
        parts = [t for name in seen for t in (batch[name].a / batch[name].a_count, batch[name].g / batch[name].g_count)]
        flat = objective.reduce(flatten(parts))  # the one all-reduce of the factors
        pieces = unflatten(flat, parts)  # A, G, A, G, ... in the order of `seen`
        for i, name in enumerate(seen):
            self.blocks[name].update(pieces[2 * i], pieces[2 * i + 1], k, decay)

    # ------------------------------------------------------------------ the direction
    def _direction(self, grad: Tensor | list[Tensor], lr: float, damping: float, *, clip: bool = True,
                   update_adam: bool = True) -> tuple[Tensor, Tensor | float]:
        """u: KL-clipped preconditioned gradient on covered layers, the fall-back elsewhere; and nu. ``grad`` is flat
        or one tensor per parameter."""
        o = self.options
        grads = unflatten(grad, self.params) if isinstance(grad, Tensor) else grad
        direction = torch.empty(self.numel, dtype=grads[0].dtype, device=grads[0].device)
        out = unflatten(direction, self.params)
        pre, plain = [], list(self.uncovered)
        for name, layer in self.layers.items():
            block = self.blocks[name]
            if not block.ready:  # a layer that has not been reached by any backward pass yet
                plain += [i for i in (layer.weight, layer.bias) if i is not None]
                continue
            v = layer.gradient_matrix(grads)
            pre.append((layer, v, block.precondition(v, damping, o.damping_mode)))
        nu = self._kl_clip(pre, lr) if clip else 1.0
        for layer, _, d in pre:
            layer.scatter(d, out, scale=nu)
        for i in plain:
            out[i].copy_(grads[i])
        if o.uncovered == "adam" and self.uncovered:
            self._adam_scale([out[i] for i in self.uncovered], update=update_adam)
        return direction, nu

    def _kl_clip(self, pre: list[tuple[Layer, Tensor, Tensor]], lr: float) -> Tensor | float:
        kappa = self.options.kl_clip
        if kappa is None or not pre:
            return 1.0
        vg = sum(torch.dot(d.reshape(-1), v.reshape(-1)) for _, v, d in pre) * lr**2
        return torch.sqrt(kappa / vg.clamp_min(torch.finfo(vg.dtype).tiny)).clamp(max=1.0)

    def _adam_scale(self, views: list[Tensor], update: bool = True) -> None:
        """In place: g / (sqrt(v_hat) + eps) with v the running mean of g^2 (Kingma & Ba 2014, Algorithm 1)."""
        o = self.options
        g = flatten(views)
        if self.adam_v is None:
            self.adam_v = torch.zeros_like(g)
        if update:
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
                "lambda": self.lam, "gamma": self.gamma,
                "blocks": {name: block.state_dict() for name, block in self.blocks.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.layers is not None and state["blocks"] and set(state["blocks"]) != set(self.layers):
            raise ValueError(f"the K-FAC state holds the layers {sorted(state['blocks'])}, but this model's covered "
                             f"layers are {sorted(self.layers)}.")
        self.steps, self.factor_updates = int(state["steps"]), int(state["factor_updates"])
        self.momentum_buffer = state["momentum"].clone()
        self.adam_v = None if state["adam_v"] is None else state["adam_v"].clone()
        self.lam, self.gamma = float(state.get("lambda", self.options.damping)), state.get("gamma")
        self.blocks = {}
        for name, block_state in state["blocks"].items():
            self.blocks[name] = KroneckerBlock()
            self.blocks[name].load_state_dict(block_state)
        if not self.blocks:  # a state from before the first step: the next step finds the layers again
            self.layers = None


def _refuse_shared(model: torch.nn.Module, layers: dict[str, Layer], params: list[Tensor]) -> None:
    """OptionError when two covered layers share a parameter (tied weights): K-FAC's blocks are per layer."""
    owners: dict[int, list[str]] = {}
    for name, layer in layers.items():
        for i in (layer.weight, layer.bias):
            if i is not None:
                owners.setdefault(i, []).append(name)
    shared = {i: names for i, names in owners.items() if len(names) > 1}
    if not shared:
        return
    i, names = next(iter(shared.items()))
    param_name = next((n for n, p in model.named_parameters() if p is params[i]), f"parameter {i}")
    raise OptionError(
        f"optimizer=kfac cannot precondition the parameter {param_name!r}: the layers "
        f"{' and '.join(repr(n) for n in names)} share it, and K-FAC's Kronecker blocks belong to one layer each (each "
        "layer's block would precondition the shared weight's whole gradient in turn, and the KL clip would count it "
        "once per layer). Give each layer its own parameter, or use a method with exact curvature products, which "
        "handle shared parameters (optimizer=hf, curveball or newton_cg).")


def _distributed() -> bool:
    """More than one rank: the objective's ``reduce`` is an all-reduce (else the identity)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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

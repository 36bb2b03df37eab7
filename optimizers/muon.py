"""Muon: momentum orthogonalised by Newton-Schulz for the hidden weight matrices, AdamW for everything else
([Jordan2024Muon]; the authors' reference code github.com/KellerJordan/Muon, muon.py, ``SingleDeviceMuonWithAuxAdam``).

For each hidden weight W (a matrix; a convolution's filters viewed as (out, in * kh * kw)) with gradient G:

    M <- beta M + (1 - beta) G                     momentum (beta = 0.95), an average as in the reference code
    U  = (1 - beta) G + beta M                     Nesterov (nesterov=false: U = M)
    O  = NS5(U)                                    ~ the polar factor U V^T of U = U S V^T (below)
    W <- W (1 - lr wd) - lr sqrt(max(1, rows / cols)) O

NS5 normalises U by its Frobenius norm (so every singular value is <= 1; rows > cols: the transpose, so that X X^T
is the small Gram matrix) and applies five times the quintic X <- a X + b (X X^T) X + c (X X^T)^2 X with
(a, b, c) = (3.4445, -4.7750, 2.0315). On singular values this is the scalar map p(s) = a s + b s^3 + c s^5, chosen
for its steep slope at 0 rather than convergence to 1: the result is U S' V^T with S' in about [0.68, 1.2] for the
singular values above ~2e-3 of the norm (tests/test_muon.py checks both against torch.linalg.svd). The reference
runs NS5 in bfloat16 (``ns_dtype``).

Every other parameter takes AdamW with Muon's own constants (lr 3e-4, betas (0.9, 0.95), eps 1e-10):

* vectors (biases, batch-norm gains) and scalars;
* the weights of ``nn.Embedding`` layers (the input layer of a language model);
* the output layer: the LAST ``nn.Linear`` or ``nn.Conv*`` module in the order the model registers its modules
  (``model.modules()``), the classifier of every model in models/ (``output_layer=muon`` treats it as hidden);
* ``input_layer=adamw``: the FIRST such module too (the authors' README advises it for ConvNets);
* any parameter named in ``adamw_params`` (names as in ``model.named_parameters()``, e.g. ``head.weight``).

Which parameter is which is decided at the first step from ``objective.model`` (the optimiser is built from the
parameters alone); the state holds one buffer list per parameter, so a checkpoint does not depend on it.

Weight decay: ``decoupled=true`` (the reference) shrinks every parameter by (1 - rate * weight_decay), with each
part's own rate; ``decoupled=false`` is the library's L2 (gradient + eta w, base class).

Differences from the reference, on purpose: the shape factor uses the matrix that is orthogonalised (for a
convolution, (out, in * kh * kw)), where the reference reads the last two dimensions of the 4-D gradient (kh, kw:
a factor 1 for square kernels); and a 2-D parameter with no gradient is skipped, where the reference gives it a zero
gradient (and so decays and moves it by its momentum). Data parallelism is the Objective's one all-reduce of the
gradient, so every rank orthogonalises every matrix (the reference's ``Muon`` splits the matrices over ranks and
all-gathers the results: the same numbers, less work per rank).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from optimizers.base import Optimizer
from optimizers.interface import ObjectiveLike
from optimizers.schedules import ScheduleOptions, Scheduled
from validation.checks import (OptionError, boolean, fail, in_range, one_of, option, positive, positive_int,
                               sequence_of)

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # [Jordan2024Muon]: the quintic's (a, b, c)
NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # the modules whose weight can be an input or output layer


def newton_schulz(g: Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16, eps: float = 1e-7) -> Tensor:
    """NS5 of a matrix ``g`` (rows, cols): approximately its polar factor U V^T, in ``dtype`` (module docstring)."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.mT                                 # (cols, rows): X X^T is the smaller Gram matrix
    x = x / (x.norm() + eps)                     # Frobenius norm >= spectral norm: singular values in [0, 1]
    for _ in range(steps):
        gram = x @ x.mT                          # (r, r)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


def _name_list(key: str, value: Any) -> list:
    def name(k: str, item: Any) -> str:
        if not isinstance(item, str) or not item:
            fail(k, item, "must be a parameter name as in model.named_parameters(), e.g. fc.weight.")
        return item

    return sequence_of(name)(key, value)


@dataclass(frozen=True)
class MuonOptions(ScheduleOptions):
    lr: float = option(0.02, positive)              # Muon's rate for the hidden matrices (spectral norm per step)
    momentum: float = option(0.95, in_range(0, 1, high_open=True))  # beta of the momentum average
    nesterov: bool = option(True, boolean)          # orthogonalise (1 - beta) G + beta M instead of M
    ns_steps: int = option(5, positive_int)         # Newton-Schulz iterations
    ns_dtype: str = option("bfloat16", one_of(*NS_DTYPES))  # dtype of the iterations (the reference: bfloat16)
    adam_lr: float = option(3e-4, positive)         # AdamW's rate for the other parameters (scheduled alike)
    adam_betas: list = option([0.9, 0.95], sequence_of(in_range(0, 1, high_open=True), length=2))  # AdamW's betas
    adam_eps: float = option(1e-10, positive)       # AdamW's epsilon
    decoupled: bool = option(True, boolean)         # weight_decay as p <- p (1 - rate wd) (reference); false: L2
    output_layer: str = option("adamw", one_of("adamw", "muon"))  # the last Linear/Conv module: adamw | muon
    input_layer: str = option("muon", one_of("muon", "adamw"))    # the first Linear/Conv module: muon | adamw
    adamw_params: list = option([], _name_list)     # more parameters for AdamW, by name (model.named_parameters())


class Muon(Scheduled, Optimizer):
    """Muon for the hidden matrices, AdamW for the rest (module docstring). One ``objective.backward()`` per step.

    Statistics: ``loss``, ``lr`` (Muon's scheduled rate), ``adam_lr``, and the objective's.
    """

    Options = MuonOptions

    def __init__(self, params, **options: Any):
        super().__init__(params, **options)
        n = len(self.params)
        self.use_muon: list[bool] | None = None             # decided at the first step (module docstring)
        self.momentum: list[Tensor | None] = [None] * n      # Muon's M, per parameter
        self.exp_avg: list[Tensor | None] = [None] * n       # AdamW's first moment
        self.exp_avg_sq: list[Tensor | None] = [None] * n    # AdamW's second moment

    @property
    def decays_through_objective(self) -> bool:
        return not self.options.decoupled

    def assign(self, model: nn.Module) -> list[bool]:
        """Whether each parameter takes Muon (True) or AdamW (False), from the model's layers (module docstring)."""
        o = self.options
        names = {id(p): name for name, p in model.named_parameters()}
        unknown = [n for n in o.adamw_params if n not in names.values()]
        if unknown:
            raise OptionError(f"optimizer.adamw_params names {unknown[0]}, which is not a parameter of the model. "
                              f"Parameters: {', '.join(list(names.values())[:12])}"
                              f"{', ...' if len(names) > 12 else ''}.")
        adamw = {names.get(id(m.weight)) for m in model.modules() if isinstance(m, nn.Embedding)}
        layers = [m for m in model.modules() if isinstance(m, LAYERS)]
        if layers and o.output_layer == "adamw":
            adamw.add(names.get(id(layers[-1].weight)))
        if layers and o.input_layer == "adamw":
            adamw.add(names.get(id(layers[0].weight)))
        adamw |= set(o.adamw_params)
        return [p.ndim >= 2 and names.get(id(p)) not in adamw for p in self.params]

    @torch.no_grad()
    def update(self, objective: ObjectiveLike) -> dict[str, Any]:
        if self.use_muon is None:
            self.use_muon = self.assign(objective.model)
        o = self.options
        lr = self.learning_rate()
        adam_lr = o.adam_lr * lr / o.lr                  # the same schedule multiplier
        with torch.enable_grad():
            loss = objective.backward()                  # p.grad: the (all-reduced) gradient, + eta w if coupled
        wd = o.weight_decay if o.decoupled else 0.0
        t = self.steps + 1                               # AdamW's bias corrections
        beta1, beta2 = o.adam_betas
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:
                continue
            if self.use_muon[i]:
                m = self.momentum[i] = torch.zeros_like(p) if self.momentum[i] is None else self.momentum[i]
                m.lerp_(g, 1 - o.momentum)
                u = g.lerp(m, o.momentum) if o.nesterov else m
                matrix = u.reshape(len(u), -1)           # (out, in * kh * kw) for convolution filters
                step = newton_schulz(matrix, o.ns_steps, NS_DTYPES[o.ns_dtype]).to(p.dtype)
                step *= max(1.0, matrix.size(0) / matrix.size(1)) ** 0.5
                rate = lr
            else:
                m = self.exp_avg[i] = torch.zeros_like(p) if self.exp_avg[i] is None else self.exp_avg[i]
                v = self.exp_avg_sq[i] = torch.zeros_like(p) if self.exp_avg_sq[i] is None else self.exp_avg_sq[i]
                m.lerp_(g, 1 - beta1)
                v.lerp_(g.square(), 1 - beta2)
                step = (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + o.adam_eps)
                rate = adam_lr
            if wd:
                p.mul_(1 - rate * wd)
            p.add_(step.reshape(p.shape), alpha=-rate)
            p.grad = None
        return {"loss": loss, "lr": lr, "adam_lr": adam_lr, **objective.stats()}

    def state_dict(self) -> dict[str, Any]:
        def copies(buffers):
            return [None if b is None else b.detach().clone() for b in buffers]

        return {"steps": self.steps, "momentum": copies(self.momentum), "exp_avg": copies(self.exp_avg),
                "exp_avg_sq": copies(self.exp_avg_sq)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for key in ("momentum", "exp_avg", "exp_avg_sq"):
            if len(state[key]) != len(self.params):
                raise ValueError(f"the saved Muon state holds {len(state[key])} parameters, this model "
                                 f"{len(self.params)}")
            setattr(self, key, [None if b is None else b.detach().clone().to(p) for b, p in
                                zip(state[key], self.params)])

"""CurveBall (Henriques, Ehrhardt, Albanie, Vedaldi 2019, "Small steps and giant leaps: Minimal Newton solvers for
deep learning" (seed 003), Algorithm 1): one gradient-descent step on the Newton system per parameter update.

Per step, with J = df/dw the network Jacobian, H_L the loss Hessian w.r.t. the outputs f, g_f = dL/df, and C the
curvature (GGN J^T H_L J by default, or the Hessian), the method keeps one extra vector z (like momentum) and does

    dz = (C + lambda I) z + grad                      Algorithm 1 line 3; GGN form J^T (H_L J z + g_f) + lambda z
                                                      needs ONE backward (eq. 16-17)
    [beta, -rho] = A^-1 b                             eq. 18 with the damping (shared/reference/algorithms.md, step 5)
    z <- rho z - beta dz ;  w <- w + lr z             Algorithm 1 lines 4-5 (lr: the authors' MATLAB multiplier)

and every ``lambda_every`` steps rescales lambda by the ratio of the actual to the predicted loss change (sec. 3).

Weight decay eta (the shared ``WeightDecayed`` objective): F = L + eta/2 |w|^2 has gradient grad + eta w and curvature
C + eta I. The GGN path works in output space, where only L lives, so it adds the regulariser's terms once: to dz
(eta z + eta w) and to the quadratic forms (``QuadForms.with_l2``); the Hessian path's products already hold them.

Cost per GGN step (``fast_path``, the default): the batch's forward pass carries J z by forward-mode AD, one backward
gives J^T u and keeps its graph, and J dz differentiates that graph w.r.t. u (double-backward trick; for networks with
batch norm a second forward-mode pass is cheaper); plus one forward every ``lambda_every`` steps for the lambda test.
Measured on the CPU (1 thread, CPU time per step, lambda test included), relative to an SGD step:

    model                          fast path   fixed rho, beta   Objective products (double_backward / forward_ad)
    MLP 784-800-10, batch 1000       2.2x           1.6x             2.7x / 4.4x
    basic CNN (seed 003), b. 128     2.6x           1.5x             3.8x / 3.5x
    basic CNN + batch norm           2.9x           1.6x             4.8x / 3.4x

A CurveBall step needs J z, J^T u and J dz in sequence, each about as costly as SGD's backward, so about 2x SGD is the
floor; fixed rho, beta drop J dz. The fused pass and the kept J^T u graph are ``Objective.forward_with_jvp`` and
``Objective.vjp(u, keep_for_jvp=True)``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from optimizers.backends import auto_jacobian_backend, has_batch_norm
from optimizers.base import Optimizer, OptimizerOptions, as_tensor_like
from validation.checks import boolean, finite, in_range, nonnegative, one_of, option, optional, positive, positive_int
from optimizers.interface import CURVATURES, ObjectiveLike
from optimizers.vec import flush_tiny

GAMMA_LOW, GAMMA_HIGH = 0.5, 1.5  # seed 003 sec. 3 (Nocedal & Wright 2006, Numerical Optimization, p. 69)


@dataclass(frozen=True)
class CurveBallOptions(OptimizerOptions):
    lr: float = option(1.0, positive)                  # multiplies z in w <- w + lr z (authors' MATLAB; seed 003: 1)
    damping: float | None = option(None, optional(nonnegative))  # initial lambda; null: 1 with batch norm, else 10
    curvature: str = option("ggn", one_of(*CURVATURES))  # ggn (eq. 10-12) | hessian (exact, may be indefinite)
    auto_rho_beta: bool = option(True, boolean)        # rho, beta from the 2x2 model (eq. 18); false: fixed below
    rho: float = option(0.9, finite)                   # fixed momentum rho (auto_rho_beta=false)
    beta: float = option(0.01, positive)               # fixed step size beta (auto_rho_beta=false; Theorem A.1: > 0)
    lambda_rescaling: bool = option(True, boolean)     # trust-region rescaling of lambda (seed 003 sec. 3)
    lambda_every: int = option(5, positive_int)        # rescale every this many steps (one extra forward each)
    lambda_decay: float = option(0.999, in_range(0, 1, low_open=True, high_open=True))  # omega per step
    fast_path: bool = option(True, boolean)            # J z fused into the forward; J dz from the kept J^T u graph
    jdz_method: str = option("auto", one_of("auto", "double_backward", "forward_ad"))  # J dz on the fast path
    log_grad_norm: bool = option(False, boolean)       # also log |gradient| (one extra backward on the fast path)


class QuadForms(NamedTuple):
    """The undamped quadratic forms of CurveBall's 2x2 system (seed 003 eq. 18), summed over the batch."""

    zCz: Tensor     # z^T C z
    dzCz: Tensor    # dz^T C z
    dzCdz: Tensor   # dz^T C dz
    g_dz: Tensor    # grad^T dz
    g_z: Tensor     # grad^T z

    def with_l2(self, objective: ObjectiveLike, z: Tensor, dz: Tensor) -> QuadForms:
        """The forms of F = L + eta/2 |w|^2: C + eta I and grad + eta w (no-op without weight decay)."""
        eta, g = objective.l2, objective.l2_gradient()
        if g is None:
            return self
        return QuadForms(self.zCz + eta * z.dot(z), self.dzCz + eta * dz.dot(z), self.dzCdz + eta * dz.dot(dz),
                         self.g_dz + g.dot(dz), self.g_z + g.dot(z))


class RhoBetaSystem(NamedTuple):
    """[[a11, a12], [a12, a22]] [beta, -rho]^T = [b1, b2]^T."""

    a11: Tensor
    a12: Tensor
    a22: Tensor
    b1: Tensor
    b2: Tensor


def assemble_system(forms: QuadForms, z: Tensor, dz: Tensor, damping: Tensor) -> RhoBetaSystem:
    """Eq. 18 with the damping lambda (shared/reference/algorithms.md, CurveBall step 5)."""
    return RhoBetaSystem(forms.dzCdz + damping * dz.dot(dz), forms.dzCz + damping * dz.dot(z),
                         forms.zCz + damping * z.dot(z), forms.g_dz, forms.g_z)


class CurveBall(Optimizer):
    """CurveBall with automatic rho, beta (eq. 18) and lambda rescaling (seed 003 sec. 3)."""

    Options = CurveBallOptions

    def __init__(self, params, **options: Any):
        super().__init__(params, **options)
        p0 = self.params[0]
        self.z = torch.zeros(self.numel, dtype=p0.dtype, device=p0.device)
        self.z_is_zero = True               # z = 0: skip the products with z (first step, Algorithm 1 line 1)
        self.damping: Tensor | None = None  # lambda, a 0-dim tensor so that rescaling needs no host sync
        self.fused = self.options.fast_path  # switched off if the model has an op without forward-mode AD

    def update(self, objective: ObjectiveLike) -> dict[str, Any]:
        o = self.options
        if self.damping is None:
            self.damping = as_tensor_like(initial_lambda(objective.model) if o.damping is None else o.damping, self.z)
        lam, z = self.damping, self.z
        rescale = o.lambda_rescaling and (self.steps + 1) % o.lambda_every == 0
        need_system = o.auto_rho_beta or rescale  # for eq. 18, and for the predicted change of the lambda test
        products = self._ggn_products if o.curvature == "ggn" else self._hessian_products
        dz, forms = products(objective, lam, need_system)  # dz = (C + lambda I) z + grad
        system = assemble_system(forms, z, dz, lam) if need_system else None
        if o.auto_rho_beta:
            rho, beta = solve_rho_beta(*system, first=self.z_is_zero)
        else:
            rho, beta = as_tensor_like(o.rho, z), as_tensor_like(o.beta, z)
        # Algorithm 1 line 4, z <- rho z - beta dz (one fused pass for beta dz; none for rho z while z = 0)
        z_new = torch.mul(dz, -beta) if self.z_is_zero else torch.addcmul(rho * z, beta, dz, value=-1.0)
        step = z_new if o.lr == 1.0 else o.lr * z_new  # Algorithm 1 line 5 (times the MATLAB learning rate)

        stats: dict[str, Any] = {"loss": objective.loss(), "lr": o.lr, "rho": rho, "beta": beta, "damping": lam}
        if o.log_grad_norm:
            stats["grad_norm"] = objective.gradient().norm()
        if rescale:
            stats.update(self._rescale_lambda(objective, system, rho, beta, step, stats["loss"]))
        objective.apply(step)
        if rescale:  # every lambda_every steps: z's subnormal-bound entries to 0 (optimizers.vec.flush_tiny)
            flush_tiny(z_new)
        self.z, self.z_is_zero = z_new, False
        stats.update({"z_norm": z_new.norm(), "dz_norm": dz.norm(), **objective.stats()})
        return stats

    def _rescale_lambda(self, objective: ObjectiveLike, a: RhoBetaSystem, rho: Tensor, beta: Tensor, step: Tensor,
                        loss: Tensor) -> dict[str, Tensor]:
        """Trust-region test (seed 003 sec. 3): gamma = actual / predicted loss change; gamma < 1/2 (the model
        over-promised) raises lambda, gamma > 3/2 lowers it; NaN compares false both ways and leaves it."""
        lr, omega = self.options.lr, self.options.lambda_decay ** self.options.lambda_every
        # The damped model q(s) = grad's + 1/2 s'(C + lambda I)s at s = lr (rho z - beta dz), from the 2x2
        # quantities. With the automatic rho, beta and lr = 1 it is -1/2 [beta, -rho].b, the authors' formula.
        lin = rho * a.b2 - beta * a.b1
        quad = rho * rho * a.a22 - 2.0 * rho * beta * a.a12 + beta * beta * a.a11
        predicted = lr * lin + 0.5 * lr ** 2 * quad
        gamma = (objective.loss_at(step) - loss) / predicted
        lam = self.damping
        self.damping = torch.where(gamma < GAMMA_LOW, lam / omega, torch.where(gamma > GAMMA_HIGH, lam * omega, lam))
        return {"lambda_ratio": gamma, "model_change": predicted}

    def _ggn_products(self, objective: ObjectiveLike, lam: Tensor, need_forms: bool) -> tuple[Tensor, QuadForms | None]:
        """dz = J^T (H_L J z + g_f) + lambda z (eq. 16-17, ONE backward), and the forms of eq. 18."""
        z, zero = self.z, self.z_is_zero
        jz = None if zero else self._jz(objective)
        g_f = objective.curvature_output_grad()
        hjz = None if zero else objective.loss_hessian_vp(jz)
        u = g_f if zero else g_f + hjz
        method = self._jdz_method(objective) if need_forms and self.fused else None
        dz = objective.vjp(u, keep_for_jvp=method == "double_backward")
        if not zero:  # + (lambda + eta) z in one fused pass
            dz = torch.addcmul(dz, lam + objective.l2, z)
        if objective.l2_gradient() is not None:
            dz = dz + objective.l2_gradient()
        if not need_forms:
            return dz, None
        jdz = objective.jvp(dz, backend=method)
        hjdz = objective.loss_hessian_vp(jdz)
        if zero:
            outs = torch.stack([_dot(jdz, hjdz), _dot(g_f, jdz)])
            outs = torch.cat([outs.new_zeros(2), outs[:1], outs[1:], outs.new_zeros(1)])
        else:
            outs = torch.stack([_dot(jz, hjz), _dot(jz, hjdz), _dot(jdz, hjdz), _dot(g_f, jdz), _dot(g_f, jz)])
        # Output-space sums are over this process's batch: average them across data-parallel ranks in one reduction.
        return dz, QuadForms(*objective.reduce(outs)).with_l2(objective, z, dz)

    def _jz(self, objective: ObjectiveLike) -> Tensor:
        """J z, fused into the batch's forward pass when possible."""
        if self.fused:
            try:
                return objective.forward_with_jvp(self.z)
            except NotImplementedError as err:  # an op of the model has no forward-mode AD formula
                warnings.warn(f"CurveBall: forward-mode AD failed ({err}); using the Objective's products instead "
                              "(set optimizer.fast_path=false to silence this).", stacklevel=3)
                self.fused = False
        return objective.jvp(self.z)

    def _jdz_method(self, objective: ObjectiveLike) -> str:
        if self.options.jdz_method != "auto":
            return self.options.jdz_method
        return auto_jacobian_backend(objective.model, jtu_graph_kept=True)

    def _hessian_products(self, objective: ObjectiveLike, lam: Tensor,
                          need_forms: bool) -> tuple[Tensor, QuadForms | None]:
        """dz = H z + grad + lambda z with Pearlmutter products (a backward more than the GGN path). H is symmetric,
        so z'H dz = dz'(H z) reuses H z. With negative curvature A may be indefinite: the 2x2 solution is then a
        saddle of the model, not a minimiser (raise the damping for non-convex problems)."""
        z, zero = self.z, self.z_is_zero
        grad = objective.gradient("hessian")
        hz = torch.zeros_like(z) if zero else objective.hvp(z)
        dz = hz + grad + lam * z
        if not need_forms:
            return dz, None
        hdz = objective.hvp(dz)
        return dz, QuadForms(z.dot(hz), dz.dot(hz), dz.dot(hdz), grad.dot(dz), grad.dot(z))

    def gradients_per_step(self) -> tuple[float, str]:
        """A rough cost per step, in gradients (one forward and backward pass over the batch), and how it comes about,
        for the runner's up-front estimate (runner/cost.py)."""
        return 2.5, "~2.5 gradients per step (a gradient and two curvature products)"

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "z": self.z.clone(), "z_is_zero": self.z_is_zero,
                "damping": None if self.damping is None else self.damping.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.z = state["z"].detach().clone().to(self.z)
        self.z_is_zero = bool(state["z_is_zero"])
        self.damping = None if state["damping"] is None else state["damping"].detach().clone().to(self.z)


def initial_lambda(model: nn.Module) -> float:
    """lambda0 of seed 003 sec. 3: 1 for networks with batch normalisation, 10 otherwise."""
    return 1.0 if has_batch_norm(model) else 10.0


def solve_rho_beta(a11: Tensor, a12: Tensor, a22: Tensor, b1: Tensor, b2: Tensor, *,
                   first: bool = False) -> tuple[Tensor, Tensor]:
    """Solve [[a11, a12], [a12, a22]] [beta, -rho]^T = [b1, b2]^T (seed 003 eq. 18) on the device, no host sync.

    When z = 0 (``first``) or z and dz are collinear the matrix is singular and the problem is one-dimensional: the
    answer is the exact line search along dz, rho = 0, beta = b1 / a11. Non-finite results become 0, as in the
    authors' MATLAB code (beta = rho = 0 then resets z, after which the next step is again a line search).
    """
    beta_1d = b1 / a11
    if first:
        rho, beta = torch.zeros_like(beta_1d), beta_1d
    else:
        det = a11 * a22 - a12 * a12
        beta_2d = (a22 * b1 - a12 * b2) / det
        rho_2d = (a12 * b1 - a11 * b2) / det
        # det / (a11 a22) = 1 - cos^2 of the angle between z and dz in the A inner product: ~0 means collinear.
        ok = det > 100.0 * torch.finfo(det.dtype).eps * a11 * a22
        rho = torch.where(ok, rho_2d, torch.zeros_like(rho_2d))
        beta = torch.where(ok, beta_2d, beta_1d)
    rho = torch.where(torch.isfinite(rho), rho, torch.zeros_like(rho))
    beta = torch.where(torch.isfinite(beta), beta, torch.zeros_like(beta))
    return rho, beta


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum()

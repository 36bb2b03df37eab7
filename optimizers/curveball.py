"""CurveBall (seed 003, Algorithm 1): one gradient-descent step on the Newton system per parameter update.

Per step, with J = df/dw the network Jacobian, H_L the loss Hessian w.r.t. the outputs f, g_f = dL/df, and C the
curvature (GGN J^T H_L J by default, or the Hessian), the method keeps one extra vector z (like momentum) and does

    dz = (C + lambda I) z + grad                      Algorithm 1 line 3; GGN form J^T (H_L J z + g_f) + lambda z
                                                      needs ONE backward (eq. 16-17)
    [beta, -rho] = A^-1 b                             eq. 18 with the damping (reference/algorithms.md, step 5)
    z <- rho z - beta dz ;  w <- w + lr z             Algorithm 1 lines 4-5 (lr: the authors' MATLAB multiplier)

and every ``lambda_every`` steps rescales lambda by the ratio of the actual to the predicted loss change (sec. 3).

Weight decay eta: the objective becomes f + eta/2 |w|^2, whose gradient is grad + eta w and whose curvature is
C + eta I (GGN of the regulariser = its Hessian = eta I). So eta enters dz as eta w + eta z, the 2x2 system through
the damping lambda + eta and b through eta w, and the loss change of the lambda test through eta/2 |w|^2.

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
``Objective.vjp(u, keep_jvp=True)``.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from optimizers.base import Optimizer, as_tensor_like
from optimizers.objective import Objective
from optimizers.vec import params_vector

CURVATURES = ("ggn", "hessian")
JDZ_METHODS = ("auto", "double_backward", "forward_ad")
GAMMA_LOW, GAMMA_HIGH = 0.5, 1.5  # seed 003 sec. 3 (Nocedal & Wright p. 69): thresholds on the ratio gamma


class CurveBall(Optimizer):
    """CurveBall with automatic rho, beta (eq. 18) and lambda rescaling (seed 003 sec. 3)."""

    def __init__(
        self,
        params: Iterable[Tensor],
        *,
        lr: float = 1.0,
        lambda0: float | None = None,
        curvature: str = "ggn",
        auto_rho_beta: bool = True,
        rho: float = 0.9,
        beta: float = 0.01,
        lambda_rescaling: bool = True,
        lambda_every: int = 5,
        lambda_decay: float = 0.999,
        weight_decay: float = 0.0,
        fast_path: bool = True,
        jdz_method: str = "auto",
        log_grad_norm: bool = False,
    ):
        super().__init__(params)
        if not lr > 0:
            raise ValueError(f"optimizer.lr={lr} must be positive (seed 003 / MATLAB default 1.0).")
        if lambda0 is not None and not lambda0 >= 0:
            raise ValueError(
                f"optimizer.lambda0={lambda0} must be a non-negative damping, or null to pick it from the model "
                "(1 with batch norm, 10 without, seed 003 sec. 3).")
        if curvature not in CURVATURES:
            raise ValueError(f"optimizer.curvature={curvature!r} is not one of {list(CURVATURES)}: 'ggn' is the "
                             "Gauss-Newton matrix of seed 003 eq. 10, 'hessian' the exact Hessian.")
        if not auto_rho_beta and not beta > 0:
            raise ValueError(f"optimizer.beta={beta} must be positive when optimizer.auto_rho_beta is false "
                             "(seed 003 Theorem A.1 needs beta > 0).")
        if isinstance(lambda_every, bool) or int(lambda_every) != lambda_every or lambda_every < 1:
            raise ValueError(f"optimizer.lambda_every={lambda_every!r} must be a positive integer "
                             "(seed 003 rescales lambda every 5 steps).")
        if not 0.0 < lambda_decay < 1.0:
            raise ValueError(f"optimizer.lambda_decay={lambda_decay} must be in (0, 1) (seed 003 uses 0.999).")
        if jdz_method not in JDZ_METHODS:
            raise ValueError(f"optimizer.jdz_method={jdz_method!r} is not one of {list(JDZ_METHODS)} (how the fast "
                             "path computes J dz: 'auto' picks forward_ad with batch norm, else double_backward).")
        if not weight_decay >= 0:
            raise ValueError(f"optimizer.weight_decay={weight_decay} must be non-negative.")
        self.lr, self.lambda0, self.curvature = float(lr), lambda0, curvature
        self.auto_rho_beta, self.rho, self.beta = bool(auto_rho_beta), float(rho), float(beta)
        self.lambda_rescaling, self.lambda_every = bool(lambda_rescaling), int(lambda_every)
        # The test runs every lambda_every steps, so one rescaling applies the per-step factor that many times.
        self.omega = float(lambda_decay) ** self.lambda_every
        self.weight_decay, self.log_grad_norm = float(weight_decay), bool(log_grad_norm)
        self.fast_path, self.jdz_method = bool(fast_path), jdz_method
        p0 = self.params[0]
        self.z = torch.zeros(sum(p.numel() for p in self.params), dtype=p0.dtype, device=p0.device)
        self.z_is_zero = True  # z = 0: skip the products with z (first step, Algorithm 1 line 1)
        self.damping: Tensor | None = None  # lambda, a 0-dim tensor so that rescaling needs no host sync

    # ------------------------------------------------------------------ the step
    def step(self, objective: Objective) -> dict[str, Any]:
        if self.damping is None:
            self.damping = as_tensor_like(initial_lambda(objective.model) if self.lambda0 is None else self.lambda0,
                                          self.z)
        lam, eta, z = self.damping, self.weight_decay, self.z
        damp = lam + eta  # the curvature of f + eta/2 |w|^2 is C + eta I; damped: C + (lambda + eta) I
        w = params_vector(self.params) if eta else None
        rescale = self.lambda_rescaling and (self.steps + 1) % self.lambda_every == 0
        need_a = self.auto_rho_beta or rescale  # the 2x2 system is needed for eq. 18 and for the predicted change

        # dz = (C + (lambda + eta) I) z + grad + eta w; cz = z'Cz, cdz = [z'Cz, dz'Cz, dz'Cdz] (undamped, no eta);
        # b = [grad'dz, grad'z] without eta.
        products = self._ggn_products if self.curvature == "ggn" else self._hessian_products
        dz, cz, cdz, b = products(objective, damp * z + (eta * w if eta else 0.0), need_a)
        if need_a:
            a11 = cdz[2] + damp * dz.dot(dz)
            a12 = cdz[1] + damp * dz.dot(z)
            a22 = cz + damp * z.dot(z)
            b1 = b[0] + (eta * w.dot(dz) if eta else 0.0)
            b2 = b[1] + (eta * w.dot(z) if eta else 0.0)
        if self.auto_rho_beta:
            rho, beta = solve_rho_beta(a11, a12, a22, b1, b2, first=self.z_is_zero)
        else:
            rho, beta = as_tensor_like(self.rho, z), as_tensor_like(self.beta, z)
        z_new = rho * z - beta * dz  # Algorithm 1 line 4
        step = self.lr * z_new       # Algorithm 1 line 5 (times the MATLAB learning rate)

        stats: dict[str, Any] = {"loss": objective.loss(), "lr": self.lr, "rho": rho, "beta": beta, "damping": lam}
        if self.log_grad_norm:
            grad = objective.gradient() + (eta * w if eta else 0.0)
            stats["grad_norm"] = grad.norm()
        if rescale:
            # Predicted change: the damped quadratic model q(s) = grad's + 1/2 s'(C + (lambda + eta) I)s at the step
            # s = lr (rho z - beta dz), written with the 2x2 quantities. With the automatic rho, beta (A x = b at
            # x = [beta, -rho]) and lr = 1 it reduces to -1/2 [beta, -rho].b, the formula of the authors' code.
            lin = rho * b2 - beta * b1
            quad = rho * rho * a22 - 2.0 * rho * beta * a12 + beta * beta * a11
            predicted = self.lr * lin + 0.5 * self.lr ** 2 * quad
            actual = objective.loss_at(step) - stats["loss"]
            if eta:
                actual = actual + eta * (w.dot(step) + 0.5 * step.dot(step))
            gamma = actual / predicted
            # gamma < 1/2: the model over-promised, shrink the trust region (raise lambda); gamma > 3/2: the loss fell
            # faster than predicted, lower lambda. NaN compares false both ways and leaves lambda unchanged.
            self.damping = torch.where(gamma < GAMMA_LOW, lam / self.omega,
                                       torch.where(gamma > GAMMA_HIGH, lam * self.omega, lam))
            stats["lambda_ratio"], stats["model_change"] = gamma, predicted
        objective.apply(step)
        self.z, self.z_is_zero = z_new, False
        self.steps += 1
        stats["z_norm"] = z_new.norm()
        stats["dz_norm"] = dz.norm()
        stats.update(objective.stats())
        return stats

    def _ggn_products(self, objective: Objective, extra: Tensor,
                      need_a: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """dz = J^T (H_L J z + g_f) + extra (eq. 17, extra = damping and weight decay) and the quadratic forms."""
        z, zero = self.z, self.z_is_zero
        fast = self.fast_path and objective.can_fuse_forward
        if fast:
            try:
                jz = None if zero else objective.forward_with_jvp(z)
            except NotImplementedError as err:  # an op of the model has no forward-mode AD formula
                warnings.warn(f"CurveBall: forward-mode AD failed ({err}); using the Objective's products instead "
                              "(set optimizer.fast_path=false to silence this).", stacklevel=2)
                self.fast_path = fast = False
        if not fast:
            jz = None if zero else objective.jvp(z)
        g_f = objective.curvature_output_grad()
        hjz = None if zero else objective.loss_hessian_vp(jz)
        u = g_f if zero else g_f + hjz
        if fast and need_a:
            method = self._jdz_method(objective)
            jtu = objective.vjp(u, keep_jvp=method == "double_backward")
            jvp_fn = lambda v: objective.jvp(v, method=method)  # noqa: E731
        else:
            jtu, jvp_fn = objective.vjp(u), objective.jvp
        dz = jtu + extra
        if not need_a:
            return dz, None, None, None
        jdz = jvp_fn(dz)
        hjdz = objective.loss_hessian_vp(jdz)
        if zero:
            outs = torch.stack([_dot(jdz, hjdz), _dot(g_f, jdz)])
            outs = torch.cat([outs.new_zeros(2), outs[:1], outs[1:], outs.new_zeros(1)])
        else:
            outs = torch.stack([_dot(jz, hjz), _dot(jz, hjdz), _dot(jdz, hjdz), _dot(g_f, jdz), _dot(g_f, jz)])
        # Output-space sums are over this process's batch: average them across data-parallel ranks in one reduction.
        outs = objective.reduce(outs)
        return dz, outs[0], outs[:3], outs[3:]

    def _jdz_method(self, objective: Objective) -> str:
        """Differentiating the kept J^T u graph costs about one tangent pass (MLP: 15 ms vs 30 ms for a forward-mode
        pass), except through batch norm, whose double backward is slower than a fresh forward-mode pass (CNN + BN:
        2.9x SGD per step with forward_ad, 3.4x with double_backward; CPU measurements)."""
        if self.jdz_method != "auto":
            return self.jdz_method
        return "forward_ad" if has_batch_norm(objective.model) else "double_backward"

    def _hessian_products(self, objective: Objective, extra: Tensor,
                          need_a: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """dz = H z + grad + extra with Pearlmutter products (prepare + H z + H dz: a backward more than the GGN)."""
        z, zero = self.z, self.z_is_zero
        grad = objective.prepare("hessian")
        hz = torch.zeros_like(z) if zero else objective.hvp(z)
        dz = hz + grad + extra
        if not need_a:
            return dz, None, None, None
        hdz = objective.hvp(dz)
        # H is symmetric, so z'H dz = dz'(H z) reuses H z. With negative curvature A may be indefinite: the 2x2
        # solution is then a saddle of the model, not a minimiser (raise lambda0 for non-convex problems).
        cz = z.dot(hz)
        return dz, cz, torch.stack([cz, dz.dot(hz), dz.dot(hdz)]), torch.stack([grad.dot(dz), grad.dot(z)])

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "z": self.z.clone(), "z_is_zero": self.z_is_zero,
                "damping": None if self.damping is None else self.damping.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.z = state["z"].detach().clone().to(self.z)
        self.z_is_zero = bool(state["z_is_zero"])
        self.damping = None if state["damping"] is None else state["damping"].detach().clone().to(self.z)


def has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


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

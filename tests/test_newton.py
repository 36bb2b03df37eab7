"""Newton (explicit and CG) and gradient descent on float64 problems with known answers: linear least squares (one
Newton step is exact), the deterministic Rosenbrock function (minimum (1, 1)), and 1 - cos(x) (plain Newton is drawn
to the maximum at pi, seed 004's diverging baseline)."""
import inspect
import math
import os
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from models.problems import Rosenbrock
from optimizers.gd import GradientDescent
from optimizers.cg import pcg
from optimizers.newton import Newton as _Newton
from optimizers.objective import Objective
from optimizers.vec import params_vector

CONF = Path(__file__).resolve().parents[1] / "conf" / "optimizer"
ONE = torch.ones(2, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------- problems
# Most tests here are about the algorithm the seeds run: plain Newton, or a fixed lambda, with the Hessian of the whole
# batch. The defaults (Levenberg-Marquardt from lambda = 1, the Hessian on a quarter of the batch; issue 17) are tested
# at the end of this file and in tests/test_defaults.py.
PLAIN = dict(damping=0.0, damping_factor=1.0, curvature_fraction=1.0, trust_radius=None)


def Newton(params, **options):  # noqa: N802 (the class under test, with the seeds' plain settings unless overridden)
    return _Newton(params, **{**PLAIN, **options})


def least_squares(seed: int = 0):
    """nn.Linear(4, 2) fitted by "mse" to random data, and its minimiser from an independent lstsq."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(12, 4, generator=g, dtype=torch.float64)
    y = torch.randn(12, 2, generator=g, dtype=torch.float64)
    torch.manual_seed(seed)
    model = nn.Linear(4, 2).double()
    xa = torch.cat([x, torch.ones(12, 1, dtype=torch.float64)], dim=1)
    theta = torch.linalg.lstsq(xa, y).solution  # (5, 2): rows 0-3 = W^T, row 4 = bias
    w_star = torch.cat([theta[:4].T.reshape(-1), theta[4]])
    return model, x, y, xa, theta, w_star


def rosenbrock(start) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """f(u, v) = (1 - u)^2 + 100 (v - u^2)^2: one noise sample eps = 1, residual targets 0, "sse" loss."""
    return Rosenbrock(start).double(), torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64)


def rosenbrock_grad(w: torch.Tensor) -> torch.Tensor:
    u, v = w
    return torch.stack([-2 * (1 - u) - 400 * u * (v - u * u), 200 * (v - u * u)])


class OneMinusCos(nn.Module):
    """Residual sqrt(2) sin(x/2): with "sse" the loss is 2 sin^2(x/2) = 1 - cos(x), minima 2 pi k, maxima pi + 2 pi k."""

    def __init__(self, x0: float):
        super().__init__()
        self.x = nn.Parameter(torch.tensor([x0], dtype=torch.float64))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return (math.sqrt(2.0) * torch.sin(self.x / 2)).expand(inputs.shape[0], 1)


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def mlp_data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(10, 3, generator=g, dtype=torch.float64), torch.randn(10, 2, generator=g, dtype=torch.float64)


def run(opt, model, x, y, steps, loss="sse"):
    return [opt.step(Objective(model, loss, x, y)) for _ in range(steps)]


# ---------------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("step_size", ["armijo", "fixed"])
def test_explicit_newton_solves_least_squares_in_one_step(step_size):
    model, x, y, _, _, w_star = least_squares()
    assert (params_vector(model.parameters()) - w_star).abs().max() > 0.1
    stats = run(Newton(model.parameters(), solver="explicit", step_size=step_size), model, x, y, 1, "mse")[0]
    assert (params_vector(model.parameters()) - w_star).abs().max() < 1e-10
    assert stats["solve"] == "solve" and stats["fallback"] == 0 and stats["step_size"] == 1.0
    assert stats["descent_cosine"] > 0


@pytest.mark.parametrize("cg_init", ["zero", "weights"])
def test_cg_newton_solves_least_squares_in_one_step(cg_init):
    model, x, y, _, _, w_star = least_squares()
    stats = run(Newton(model.parameters(), solver="cg", cg_init=cg_init), model, x, y, 1, "mse")[0]
    assert (params_vector(model.parameters()) - w_star).abs().max() < 1e-8
    assert stats["solve"] == "cg" and stats["cg/stop"] in ("martens", "tolerance")
    assert stats["cg/iters"] >= 10  # 10 unknowns: CG needs (at least) that many iterations to be exact
    # one Hessian-vector product per CG iteration, plus the initial residual of a warm start
    assert stats["curv/hvp_products"] == stats["cg/iters"] + (cg_init == "weights")


def test_damped_step_equals_independent_solve():
    model, (x, y), lam = tiny_mlp(), mlp_data(), 0.7
    w0 = params_vector(model.parameters())
    shapes = [p.shape for p in model.parameters()]

    def loss_of(w):  # the same network written out by hand
        w1, b1, w2, b2 = torch.split(w, [s.numel() for s in shapes])
        out = torch.tanh(x @ w1.view(shapes[0]).T + b1) @ w2.view(shapes[2]).T + b2
        return (out - y).pow(2).sum() / x.shape[0]

    g = torch.func.grad(loss_of)(w0)
    hess = torch.autograd.functional.hessian(loss_of, w0)
    expected = -torch.linalg.solve(hess + lam * torch.eye(w0.numel(), dtype=torch.float64), g)
    opt = Newton(model.parameters(), damping=lam, step_size="fixed", descent_check="none")
    stats = run(opt, model, x, y, 1)[0]
    assert ((params_vector(model.parameters()) - w0) - expected).abs().max() < 1e-10
    assert stats["damping"] == lam


def test_singular_hessian_uses_pseudo_inverse():
    class LinearWithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = nn.Linear(4, 2).double()
            self.unused = nn.Parameter(torch.ones(1, dtype=torch.float64))  # zero row and column in H

        def forward(self, inputs):
            return self.lin(inputs)

    _, x, y, _, _, w_star = least_squares()
    model = LinearWithUnused()
    stats = run(Newton(model.parameters(), step_size="fixed", descent_check="none"), model, x, y, 1, "mse")[0]
    assert stats["solve"] == "pinv" and abs(float(stats["min_eigenvalue"])) < 1e-12
    assert (params_vector(model.lin.parameters()) - w_star).abs().max() < 1e-10
    assert model.unused.item() == 1.0



def test_pseudo_inverse_survives_a_failing_float32_eigh(monkeypatch):
    """LAPACK's float32 eigh can fail to converge on a singular Hessian (seed 004's undamped Newton on MNIST, below):
    the pseudo-inverse is then taken in float64. The float32 failure is injected here; the answer must still be the
    minimum-norm solution of the least-squares problem, from an independent lstsq."""
    eigh = torch.linalg.eigh

    def failing_in_float32(a):
        if a.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge (injected)")
        return eigh(a)

    _, x, y, xa, theta, _ = least_squares()
    torch.manual_seed(0)
    model = nn.Linear(4, 2, bias=False)  # float32; a zero input column makes H singular
    w0 = model.weight.detach().clone()
    x0 = torch.cat([x[:, :3], torch.zeros(12, 1, dtype=torch.float64)], dim=1)
    monkeypatch.setattr(torch.linalg, "eigh", failing_in_float32)
    stats = run(Newton(model.parameters(), step_size="fixed", descent_check="none"), model, x0.float(), y.float(), 1,
                "mse")[0]
    expected = torch.linalg.lstsq(x0[:, :3], y).solution.T  # (2, 3): the fit on the three live inputs
    assert stats["solve"] == "pinv"
    assert (model.weight.detach()[:, :3].double() - expected).abs().max() < 1e-4
    assert torch.equal(model.weight.detach()[:, 3], w0[:, 3])  # a minimum-norm step leaves the dead column alone


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("CURVLAB_DATA"), reason="CURVLAB_DATA is not set (MNIST)")
def test_undamped_newton_on_seed004_net_with_a_dead_unit_keeps_going():
    """Seed 004's undamped Newton (alpha = 0.5, no descent check) with 2 hidden units on MNIST batches of 64: a unit
    dies and its 795 weights give H zero rows; float32 eigh then failed at step 7 (torch 2.14.1, CPU) and ended the
    run with a LinAlgError."""
    from data.vision import build_mnist
    from models.mlp import build_mlp

    torch.manual_seed(0)
    splits = build_mnist(os.environ["CURVLAB_DATA"])
    model = build_mlp((1, 28, 28), 10, hidden=[2], activation="relu")
    opt = Newton(model.parameters(), step_size="fixed", lr=0.5, descent_check="none")
    order = torch.randperm(len(splits.train.targets), generator=torch.Generator().manual_seed(0))
    solves = []
    for step in range(8):
        idx = order[64 * step:64 * (step + 1)]
        stats = opt.step(Objective(model, "cross_entropy", splits.train.inputs[idx], splits.train.targets[idx]))
        solves.append(stats["solve"])
    assert "pinv" in solves and all(torch.isfinite(p).all() for p in model.parameters())

# ---------------------------------------------------------------------------------------------------- Rosenbrock
def steps_to_minimum(opt, model, x, y, max_steps, tol=1e-6):
    for k in range(1, max_steps + 1):
        stats = opt.step(Objective(model, "sse", x, y))
        if (params_vector(model.parameters()) - ONE).abs().max() < tol:
            return k, stats
    return None, stats


@pytest.mark.parametrize("solver", ["explicit", "cg"])
def test_newton_armijo_reaches_rosenbrock_minimum(solver):
    model, x, y = rosenbrock((-1.2, 1.0))  # H positive definite along the way: no fall-back
    opt = Newton(model.parameters(), solver=solver)
    k, _ = steps_to_minimum(opt, model, x, y, 40)
    assert k is not None and k <= 25  # measured: 20 steps with either solver


@pytest.mark.parametrize("check, threshold", [("cosine", -1e-8), ("slope", 0.0)])
def test_indefinite_start_falls_back_to_gradient_and_converges(check, threshold):
    model, x, y = rosenbrock((-1.3, 1.7))  # H eigenvalues -0.258 and 1550; the Newton direction ascends
    u, v = model.xy.detach()
    hessian = torch.stack([torch.stack([2 - 400 * (v - u * u) + 800 * u * u, -400 * u]),
                           torch.stack([-400 * u, torch.tensor(200.0, dtype=torch.float64)])])
    opt = Newton(model.parameters(), descent_check=check, descent_threshold=threshold, track_min_eigenvalue=True)
    first = opt.step(Objective(model, "sse", x, y))
    assert first["fallback"] == 1 and first["descent_cosine"] < 0
    assert abs(float(first["min_eigenvalue"]) - float(torch.linalg.eigvalsh(hessian)[0])) < 1e-10
    assert float(first["min_eigenvalue"]) < -0.25
    assert first["line_search/success"] == 1 and 0 < first["line_search/rate"] < 1
    assert float(Objective(model, "sse", x, y).loss()) < float(first["loss"])
    k, last = steps_to_minimum(opt, model, x, y, 40)
    assert k is not None and k <= 30  # measured: 20 more steps with either check
    assert last["fallback"] == 0


def test_fixed_step_fallback_is_a_gradient_step_with_fallback_lr():
    model, x, y = rosenbrock((-1.3, 1.7))
    w0 = params_vector(model.parameters())
    stats = run(Newton(model.parameters(), step_size="fixed", fallback_lr=1e-4), model, x, y, 1)[0]
    assert stats["fallback"] == 1 and stats["step_size"] == 1e-4
    assert (params_vector(model.parameters()) - (w0 - 1e-4 * rosenbrock_grad(w0))).abs().max() < 1e-14


def test_cg_negative_curvature_at_once_falls_back_to_gradient():
    model, x, y = rosenbrock((-0.5, 2.5))  # g^T H g < 0: CG's first direction has negative curvature
    opt = Newton(model.parameters(), solver="cg")
    first = opt.step(Objective(model, "sse", x, y))
    assert first["cg/stop"] == "negative_curvature" and first["cg/iters"] == 0
    assert first["fallback"] == 1 and first["descent_cosine"] == 0 and first["line_search/success"] == 1
    k, _ = steps_to_minimum(opt, model, x, y, 40)
    assert k is not None and k <= 30  # measured: 21 more steps


def rosenbrock_hessian(w: torch.Tensor) -> torch.Tensor:
    u, v = w
    return torch.stack([torch.stack([2 - 400 * (v - u * u) + 800 * u * u, -400 * u]),
                        torch.stack([-400 * u, torch.tensor(200.0, dtype=torch.float64)])])


@pytest.mark.parametrize("start, fallback", [((-0.5, 2.5), 0), ((-1.3, 1.7), 1)])
def test_cg_continue_solves_the_indefinite_newton_system_and_the_descent_check_decides(start, fallback):
    # Seed 000 Algorithm 3: CG steps through p^T H p < 0 to its tolerance, giving the exact Newton step -H^-1 g of
    # the indefinite 2-D system; Algorithm 4's descent check then keeps it (from (-0.5, 2.5) it descends, cosine 0.71,
    # where the default CG stops at once and falls back) or falls back to -g (from (-1.3, 1.7) it ascends).
    model, x, y = rosenbrock(start)
    w0 = params_vector(model.parameters())
    hessian, g = rosenbrock_hessian(w0), rosenbrock_grad(w0)
    assert float(torch.linalg.eigvalsh(hessian)[0]) < 0
    newton_step = -torch.linalg.solve(hessian, g)
    opt = Newton(model.parameters(), solver="cg", cg_negative_curvature="continue", cg_martens_tol=0.0, cg_tol=1e-10,
                 step_size="fixed", fallback_lr=1e-4)
    stats = opt.step(Objective(model, "sse", x, y))
    assert (stats["cg/stop"], stats["cg/iters"], stats["cg/negative_directions"]) == ("tolerance", 2, 1)
    cosine = float(-g @ newton_step / (g.norm() * newton_step.norm()))
    assert float(stats["descent_cosine"]) == pytest.approx(cosine, abs=1e-9) and stats["fallback"] == fallback
    expected = w0 - 1e-4 * g if fallback else w0 + newton_step
    assert (params_vector(model.parameters()) - expected).abs().max() < 1e-9
    if not fallback:  # the default (stop) meets negative curvature at the first direction and falls back to -g
        model, x, y = rosenbrock(start)
        stop = Newton(model.parameters(), solver="cg").step(Objective(model, "sse", x, y))
        assert (stop["cg/stop"], stop["cg/iters"], stop["fallback"]) == ("negative_curvature", 0, 1)


def test_cg_continue_reaches_rosenbrock_minimum_from_an_indefinite_start():
    model, x, y = rosenbrock((-0.5, 2.5))
    opt = Newton(model.parameters(), solver="cg", cg_negative_curvature="continue", cg_martens_tol=0.0, cg_tol=1e-10)
    k, _ = steps_to_minimum(opt, model, x, y, 60)
    assert k is not None and k <= 25  # measured: 17 steps (the default, stopping CG, needs 22)


def test_cg_negative_curvature_is_checked():
    model, _, _ = rosenbrock((0.0, 0.0))
    with pytest.raises(ValueError, match=r"optimizer\.cg_negative_curvature=maybe.*stop.*continue"):
        Newton(model.parameters(), solver="cg", cg_negative_curvature="maybe")


def test_absolute_slope_threshold_stalls_near_the_minimum():
    # Why the default check is the cosine: seed 000's literal g^T s > T with a fixed T < 0 rejects every Newton step
    # once g^T s ~ -2 f is above T, so the method degrades to gradient descent next to the minimiser.
    model, x, y = rosenbrock((-1.3, 1.7))
    stats = run(Newton(model.parameters(), descent_check="slope", descent_threshold=-1e-8), model, x, y, 30)
    assert all(s["fallback"] == 1 for s in stats[-5:])
    assert (params_vector(model.parameters()) - ONE).abs().max() > 1e-7


def test_plain_newton_goes_to_the_maximum_damped_newton_to_the_minimum():
    # 1 - cos(x) from x0 = 2 (f'' = cos 2 < 0): seed 004's undamped Newton x <- x - tan(x) converges to the maximum
    # x = pi (loss 2); with lambda = 2 > max|cos| the damped step -sin x / (cos x + 2) always descends.
    x, y = torch.zeros(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
    plain = OneMinusCos(2.0)
    run(Newton(plain.parameters(), step_size="fixed", descent_check="none"), plain, x, y, 6)
    assert abs(plain.x.item() - math.pi) < 1e-10
    damped = OneMinusCos(2.0)
    run(Newton(damped.parameters(), damping=2.0, step_size="fixed", descent_check="none"), damped, x, y, 40)
    assert abs(damped.x.item()) < 1e-6
    # the globalised method (descent check + Armijo, no damping) also avoids the maximum
    guarded = OneMinusCos(2.0)
    stats = run(Newton(guarded.parameters()), guarded, x, y, 10)
    assert stats[0]["fallback"] == 1 and abs(guarded.x.item()) < 1e-8


# ---------------------------------------------------------------------------------------------------- gradient descent
def test_pretraining_steps_are_plain_gradient_steps():
    model, x, y = rosenbrock((-1.2, 1.0))
    gd_model, _, _ = rosenbrock((-1.2, 1.0))
    opt, gd = Newton(model.parameters(), pretrain_steps=3, pretrain_lr=1e-3), GradientDescent(gd_model.parameters(), lr=1e-3)
    w = params_vector(model.parameters())
    for _ in range(3):
        stats = opt.step(Objective(model, "sse", x, y))
        gd.step(Objective(gd_model, "sse", x, y))
        w = w - 1e-3 * rosenbrock_grad(w)
        assert stats["pretrain"] == 1 and "solve" not in stats
        assert (params_vector(model.parameters()) - w).abs().max() < 1e-13
        assert torch.equal(params_vector(model.parameters()), params_vector(gd_model.parameters()))
    stats = opt.step(Objective(model, "sse", x, y))
    assert stats["pretrain"] == 0 and stats["solve"] == "solve"


def test_gradient_descent_fixed_step_matches_closed_form():
    model, x, y, xa, theta_star, _ = least_squares()
    lr, steps = 0.3, 25
    theta0 = torch.cat([model.weight.detach().T, model.bias.detach()[None]])
    run(GradientDescent(model.parameters(), lr=lr), model, x, y, steps, "mse")
    # mse of a linear model: gradient A (theta - theta*) with A = 2 xa^T xa / (B o), so theta_k - theta* = (I - lr A)^k e_0
    a = 2.0 * xa.T @ xa / (x.shape[0] * y.shape[1])
    expected = theta_star + torch.linalg.matrix_power(torch.eye(5, dtype=torch.float64) - lr * a, steps) @ (theta0 - theta_star)
    assert (model.weight.detach() - expected[:4].T).abs().max() < 1e-12
    assert (model.bias.detach() - expected[4]).abs().max() < 1e-12


def test_gradient_descent_armijo_decreases_monotonically():
    model, x, y = rosenbrock((-1.2, 1.0))
    stats = run(GradientDescent(model.parameters(), step_size="armijo"), model, x, y, 60)
    losses = [float(s["loss"]) for s in stats]
    assert all(b < a for a, b in zip(losses, losses[1:]))
    assert all(s["line_search/success"] == 1 for s in stats) and losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------------------------------------------- state and errors
@pytest.mark.parametrize("adaptive", [{}, dict(damping_factor=1.5, curvature_fraction=0.5)], ids=["fixed", "lm"])
@pytest.mark.parametrize("solver", ["explicit", "cg"])
def test_state_dict_round_trip_is_bit_exact(solver, adaptive):
    (x, y), n = mlp_data(), 3
    hyper = dict(solver=solver, damping=1e-3, pretrain_steps=2, pretrain_lr=0.05, **adaptive)
    ref = tiny_mlp()
    ref_opt = Newton(ref.parameters(), **hyper)
    run(ref_opt, ref, x, y, 2 * n)

    first = tiny_mlp()
    opt = Newton(first.parameters(), **hyper)
    run(opt, first, x, y, n)
    model_state, opt_state = first.state_dict(), opt.state_dict()
    resumed = tiny_mlp(seed=7)
    resumed.load_state_dict(model_state)
    resumed_opt = Newton(resumed.parameters(), **hyper)
    resumed_opt.load_state_dict(opt_state)
    assert resumed_opt.steps == n  # past the pre-training steps: the next step is a Newton step
    assert resumed_opt.damping == opt.damping and (not adaptive or opt.damping != 1e-3)  # lambda moved and came back
    run(resumed_opt, resumed, x, y, n)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), resumed.parameters()))


def test_explicit_solver_refuses_large_models():
    model = nn.Linear(200, 100).double()  # 20,100 parameters
    with pytest.raises(ValueError, match=r"20,100 x 20,100 Hessian.*max_explicit_params=2,000.*optimizer=newton_cg"):
        _Newton(model.parameters())
    Newton(model.parameters(), solver="cg")
    Newton(model.parameters(), max_explicit_params=30_000)


def test_optimizer_newton_on_the_quickstart_mlp_is_refused_up_front_naming_newton_cg():
    """9,610 parameters: a dense Hessian costs ~46 s a step on one core (docs/benchmarks/defaults.md)."""
    from models.mlp import build_mlp
    with pytest.raises(ValueError, match=r"9,610 x 9,610 Hessian.*optimizer=newton_cg"):
        _Newton(build_mlp((1, 8, 8), 10, hidden=[128]).parameters())



# ---------------------------------------------------------------------------------------------- the defaults (issue 17)
def test_defaults_are_a_trust_region_with_levenberg_marquardt_on_a_quarter_of_the_batch():
    o = _Newton(tiny_mlp().parameters(), solver="cg").options
    assert (o.damping, o.damping_factor, o.curvature_fraction, o.max_explicit_params) == (1.0, 1.5, 0.25, 2000)
    assert (o.trust_radius, o.max_trust_radius, o.backtrack, o.warm_start_decay) == (1.0, 100.0, False, 0.0)
    assert _Newton(tiny_mlp().parameters(), solver="cg").radius == 1.0
    assert _Newton(tiny_mlp().parameters(), solver="explicit").radius is None  # the trust region is CG's (Steihaug)


@pytest.mark.parametrize("solver", ["explicit", "cg"])
def test_reduction_ratio_is_the_full_steps_and_drives_lambda(solver):
    """rho = (F(w + s) - F(w)) / (g^T s + 1/2 s^T H s) with the dense Hessian, for the FULL Newton step s (before the
    line search), and lambda / 1.5 when rho > 3/4, * 1.5 when rho < 1/4 (Levenberg-Marquardt, optimizers/damping.py)."""
    model, (x, y) = tiny_mlp(), mlp_data()
    opt = _Newton(model.parameters(), solver=solver, curvature_fraction=1.0, damping=0.3, cg_tol=1e-13, trust_radius=None,
                  cg_martens_tol=0.0, cg_max_iters=500, cg_negative_curvature="continue", descent_check="none")
    for _ in range(4):
        w0, lam = params_vector(model.parameters()).clone(), opt.damping
        shapes = [p.shape for p in model.parameters()]

        def loss_of(w):
            w1, b1, w2, b2 = torch.split(w, [s.numel() for s in shapes])
            out = torch.tanh(x @ w1.view(shapes[0]).T + b1) @ w2.view(shapes[2]).T + b2
            return (out - y).pow(2).sum() / x.shape[0]

        g, hess = torch.func.grad(loss_of)(w0), torch.autograd.functional.hessian(loss_of, w0)
        s = -torch.linalg.solve(hess + lam * torch.eye(w0.numel(), dtype=torch.float64), g)
        f0, f_s = float(loss_of(w0)), float(loss_of(w0 + s))
        q = float(g.dot(s) + 0.5 * s.dot(hess @ s))
        rho = -math.inf if f_s > f0 else (f_s - f0) / q
        stats = run(opt, model, x, y, 1)[0]
        assert stats["reduction_ratio"] == pytest.approx(rho, rel=1e-6, abs=1e-9)
        expected = lam / 1.5 if rho > 0.75 and stats["step_size"] > 0 else lam * 1.5 if not rho >= 0.25 else lam
        assert opt.damping == pytest.approx(expected, rel=1e-12)


def test_a_fall_back_to_the_gradient_raises_lambda():
    """Negative curvature at once (CG stops with s = 0): the step falls back to -g, and lambda grows by r."""
    model, x, y = rosenbrock((-0.5, 2.5))  # g^T H g < 0: CG's first direction has negative curvature
    opt = _Newton(model.parameters(), solver="cg", damping=1e-8, curvature_fraction=1.0, trust_radius=None)
    stats = opt.step(Objective(model, "sse", x, y))
    assert stats["fallback"] == 1 and opt.damping == pytest.approx(1.5e-8)


def test_the_trust_region_follows_negative_curvature_to_its_boundary():
    """Steihaug-Toint (the default): where plain CG stops on negative curvature at once (the test above), the step
    goes along CG's first direction, -g, to |s| = radius; no fall-back."""
    model, x, y = rosenbrock((-0.5, 2.5))
    opt = _Newton(model.parameters(), solver="cg", damping=1e-8, curvature_fraction=1.0, step_size="fixed")
    w0 = params_vector(model.parameters()).clone()
    obj = Objective(model, "sse", x, y)
    g = obj.gradient()
    stats = opt.step(obj)
    s = params_vector(model.parameters()) - w0
    assert stats["fallback"] == 0 and stats["cg/stop"] == "boundary" and stats["trust_radius"] == 1.0
    assert float(s.norm()) == pytest.approx(1.0, rel=1e-12)
    assert torch.allclose(s, -g / g.norm(), rtol=1e-12, atol=1e-15)


def test_the_trust_radius_follows_the_reduction_ratio():
    """Nocedal & Wright 2006 Algorithm 4.1 on the full step's rho: rho < 1/4 -> radius / 4; rho > 3/4 with the step
    on the boundary -> 2 radius (up to max_trust_radius); otherwise unchanged. Saved and restored with the state."""
    model, (x, y) = tiny_mlp(), mlp_data()
    opt = _Newton(model.parameters(), solver="cg", curvature_fraction=1.0, trust_radius=0.05, max_trust_radius=0.15)
    for _ in range(6):
        radius = opt.radius
        stats = run(opt, model, x, y, 1)[0]
        rho, boundary = stats["reduction_ratio"], stats["cg/stop"] == "boundary"
        expected = radius / 4 if not rho >= 0.25 else min(2 * radius, 0.15) if rho > 0.75 and boundary else radius
        assert stats["trust_radius"] == radius and opt.radius == pytest.approx(expected, rel=1e-12)
    other = _Newton(tiny_mlp().parameters(), solver="cg")
    other.load_state_dict(opt.state_dict())
    assert other.radius == opt.radius and other.damping == opt.damping


def test_trust_region_boundary_point_and_model_value():
    """pcg(radius=...): on an indefinite system it stops on |x| = radius with phis[-1] = q(x); a radius the solution
    lies well inside changes nothing."""
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(12, 12, generator=gen, dtype=torch.float64)
    b = torch.randn(12, generator=gen, dtype=torch.float64)
    for a, radius in ((m @ m.T / 12 - 0.5 * torch.eye(12, dtype=torch.float64), 0.7),
                      (m @ m.T / 12 + 0.1 * torch.eye(12, dtype=torch.float64), 0.3)):
        result = pcg(lambda v: a @ v, b, radius=radius, martens_tol=0.0, max_iters=100)
        x = result.x
        assert result.stop_reason == "boundary" and float(x.norm()) == pytest.approx(radius, rel=1e-12)
        assert result.phis[-1] == pytest.approx(float(0.5 * x @ a @ x - b @ x), rel=1e-12)
    spd = m @ m.T / 12 + torch.eye(12, dtype=torch.float64)
    free = pcg(lambda v: spd @ v, b, martens_tol=0.0, tol=1e-12, max_iters=100)
    inside = pcg(lambda v: spd @ v, b, martens_tol=0.0, tol=1e-12, max_iters=100, radius=1e6)
    assert inside.stop_reason == "tolerance" and torch.equal(inside.x, free.x)


def test_cg_backtracking_and_warm_start_options():
    """backtrack=true: Martens' backtracking over CG's iterates (optimizers/cg.py, as Hessian-free), whose loss at the
    chosen iterate is also rho's trial (no second evaluation); warm_start_decay: CG starts from the last solution."""
    model, (x, y) = tiny_mlp(), mlp_data()
    opt = _Newton(model.parameters(), solver="cg", trust_radius=None, backtrack=True, warm_start_decay=0.9,
                  cg_max_iters=30, cg_martens_tol=0.0)
    stats = run(opt, model, x, y, 2)
    for row in stats:
        assert 1 <= row["cg/backtrack_iter"] <= row["cg/iters"]
        assert row["loss_evals"] == row["cg/backtrack_evals"] + row.get("line_search/evals", 0)
    assert opt.warm_start is not None and "warm_start" in opt.state_dict()


def test_curvature_fraction_takes_the_hessian_on_the_first_quarter():
    model, (x, y) = tiny_mlp(), mlp_data()
    obj = Objective(model, "sse", x, y)
    _Newton(model.parameters(), solver="cg").step(obj)
    assert obj.curvature_batch_size == math.ceil(0.25 * x.shape[0])

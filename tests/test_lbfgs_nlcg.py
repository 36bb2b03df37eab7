"""L-BFGS, NLCG and the finite-difference gradient test (seed 001) on small float64 problems with known answers."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.optimize
import torch
from torch import nn

from conftest import least_squares
from models.problems import Rosenbrock
from optimizers.gradcheck import finite_difference_check
from optimizers.objective import Objective
from optimizers import LBFGS, NLCG
from optimizers.vec import params_vector

DTYPE = torch.float64


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    yield
    torch.set_default_dtype(previous)


def rosenbrock_objective(model: Rosenbrock) -> Objective:
    # eps = 1: the deterministic Rosenbrock function (1 - x)^2 + 100 (y - x^2)^2, minimum at (1, 1)
    return Objective(model, "sse", torch.ones(1, 1), torch.zeros(1, 2))


class Logistic(nn.Module):
    """Logistic regression as 2-class softmax with logits (0, w.x + b): p(y=1|x) = sigmoid(w.x + b)."""

    def __init__(self, features: int):
        super().__init__()
        self.linear = nn.Linear(features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.linear(x)
        return torch.cat([torch.zeros_like(z), z], dim=1)


def point_set(n: int = 80) -> tuple[torch.Tensor, torch.Tensor]:
    """Two overlapping 2-D Gaussian clouds (seed 001's logistic regression on a point set): not separable."""
    g = torch.Generator().manual_seed(1)
    y = torch.arange(n) % 2
    x = torch.randn(n, 2, generator=g) + 1.2 * (2.0 * y[:, None] - 1.0)
    return x, y


def small_net(dropout: float = 0.0, batch_norm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(4, 6)] + ([nn.BatchNorm1d(6)] if batch_norm else []) + [nn.Tanh()]
    layers += ([nn.Dropout(dropout)] if dropout else []) + [nn.Linear(6, 3)]
    return nn.Sequential(*layers)


def classification_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)


# ---------------------------------------------------------------- L-BFGS


def test_lbfgs_reaches_rosenbrock_minimum_in_40_steps():
    model = Rosenbrock().to(DTYPE)
    opt = LBFGS(model.parameters(), tolerance_grad=1e-12, tolerance_change=1e-15)
    for step in range(40):
        stats = opt.step(rosenbrock_objective(model))
        assert stats["lbfgs/iters"] == 1 and 1 <= stats["lbfgs/evals"] <= 25
        assert float(stats["loss_after"]) <= float(stats["loss"])  # strong Wolfe => sufficient decrease
        if torch.allclose(model.xy.detach(), torch.ones(2), rtol=0, atol=1e-6):
            break
    else:
        pytest.fail(f"L-BFGS did not reach (1, 1) in 40 steps: {model.xy.detach().tolist()}")
    assert step + 1 >= 20  # one iteration per step: Rosenbrock needs a few dozen (scipy: ~35)


def test_lbfgs_matches_scipy_lbfgsb_on_logistic_regression():
    x, y = point_set()
    model = Logistic(2).to(DTYPE)
    w0 = params_vector(model.parameters())

    def loss_and_grad(w: np.ndarray) -> tuple[float, np.ndarray]:
        probe = Logistic(2).to(DTYPE)
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(torch.from_numpy(w), probe.parameters())
        objective = Objective(probe, "cross_entropy", x, y)
        return float(objective.loss()), objective.gradient().numpy()

    reference = scipy.optimize.minimize(loss_and_grad, w0.numpy(), jac=True, method="L-BFGS-B",
                                        options={"gtol": 1e-12, "ftol": 0.0, "maxiter": 500})
    opt = LBFGS(model.parameters(), max_iter=100, tolerance_grad=1e-12, tolerance_change=0.0)
    for _ in range(3):
        opt.step(Objective(model, "cross_entropy", x, y))
    w = params_vector(model.parameters())
    assert np.abs(reference.jac).max() < 1e-8
    np.testing.assert_allclose(w.numpy(), reference.x, rtol=0, atol=1e-6)
    assert np.abs(w.numpy()).max() > 0.5  # a non-trivial minimiser


def test_lbfgs_fixed_step_without_line_search():
    x, y, w_true = least_squares()
    model = nn.Linear(8, 1, bias=False)
    opt = LBFGS(model.parameters(), line_search="none", lr=0.5, max_iter=5, history_size=5)
    losses = [float(opt.step(Objective(model, "mse", x, y))["loss"]) for _ in range(20)]
    assert losses[-1] < 1e-6 * losses[0]
    assert (model.weight.detach() - w_true).abs().max() < 1e-3


def test_lbfgs_closure_sees_fixed_dropout_masks_and_leaves_bn_statistics_alone():
    x, y = classification_batch()
    model = small_net(dropout=0.3, batch_norm=True).train()
    objective = Objective(model, "cross_entropy", x, y)
    loss, grad = objective.loss(), objective.gradient()
    fresh_loss, fresh_grad = objective.loss_and_gradient_at()  # evaluated again: same masks, same batch statistics
    assert torch.allclose(fresh_loss, loss, rtol=1e-14, atol=0)
    assert torch.allclose(fresh_grad, grad, rtol=1e-12, atol=1e-15)

    bn = model[1]
    stats_after_one_forward = bn.running_mean.clone()
    opt = LBFGS(model.parameters(), max_iter=4)
    stats = opt.step(objective)
    assert stats["lbfgs/evals"] > 4  # many closure calls ...
    assert torch.equal(bn.running_mean, stats_after_one_forward)  # ... but BN statistics moved once (the forward)
    assert float(stats["loss_after"]) < float(stats["loss"])
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- NLCG


def test_nlcg_pr_plus_strong_wolfe_reaches_rosenbrock_minimum_in_40_steps():
    model = Rosenbrock().to(DTYPE)
    opt = NLCG(model.parameters())
    restarts = 0
    for step in range(40):
        stats = opt.step(rosenbrock_objective(model))
        restarts += stats["restart"]
        assert float(stats["beta"]) >= 0.0 and stats["line_search/rate"] > 0
        assert float(stats["loss_after"]) < float(stats["loss"])
        if torch.allclose(model.xy.detach(), torch.ones(2), rtol=0, atol=1e-6):
            break
    else:
        pytest.fail(f"NLCG did not reach (1, 1) in 40 steps: {model.xy.detach().tolist()}")
    assert 1 <= restarts < step  # the first step is a restart; most are conjugate steps


@pytest.mark.parametrize("beta_rule", ["pr", "fr", "hs"])
def test_nlcg_with_exact_line_search_solves_an_n_dimensional_quadratic_in_n_steps(beta_rule):
    # With exact line searches every rule reduces to linear CG: the minimiser after n steps, up to rounding.
    x, y, w_true = least_squares(n=8)
    model = nn.Linear(8, 1, bias=False)
    opt = NLCG(model.parameters(), beta_rule=beta_rule, ls_c=1e-10, ls_c2=1e-8)
    errors = []
    for _ in range(9):
        opt.step(Objective(model, "mse", x, y))
        errors.append(float((model.weight.detach() - w_true).abs().max()))
    assert errors[5] > 1e-4  # not solved early ...
    assert errors[8] < 1e-10  # ... but after n + 1 = 9 steps


def test_nlcg_armijo_decreases_the_loss_monotonically():
    x, y, w_true = least_squares(n=4)
    model = nn.Linear(4, 1, bias=False)
    opt = NLCG(model.parameters(), line_search="armijo", ls_max_evals=60)
    losses = []
    for _ in range(60):
        stats = opt.step(Objective(model, "mse", x, y))
        losses.append(float(stats["loss"]))
        assert float(stats["loss_after"]) <= float(stats["loss"])
    assert losses[-1] < 1e-6 * losses[0]


def test_nlcg_restarts_every_n_steps():
    x, y, _ = least_squares(n=8)
    model = nn.Linear(8, 1, bias=False)
    opt = NLCG(model.parameters(), restart_every=3, ls_c=1e-10, ls_c2=1e-8)
    flags = [opt.step(Objective(model, "mse", x, y))["restart"] for _ in range(7)]
    assert flags == [1, 0, 0, 1, 0, 0, 1]


def test_nlcg_same_batch_rule_changes_nothing_on_a_fixed_batch():
    """On one batch the previous point re-evaluated is the previous step's own loss and gradient: the default
    (same_batch) and scipy's rule take the same steps; only the extra evaluation differs."""
    x, y, _ = least_squares(n=8)
    runs = {}
    for same_batch in (True, False):
        torch.manual_seed(0)
        model = nn.Linear(8, 1).to(DTYPE)
        opt = NLCG(model.parameters(), same_batch=same_batch)
        flags = [opt.step(Objective(model, "mse", x, y))["nlcg/reevaluated"] for _ in range(6)]
        runs[same_batch] = (torch.cat([p.detach().reshape(-1) for p in model.parameters()]), flags)
    assert torch.allclose(runs[True][0], runs[False][0], rtol=0, atol=1e-12)
    assert runs[True][1] == [0, 1, 1, 1, 1, 1] and runs[False][1] == [0] * 6


def test_nlcg_same_batch_beta_compares_two_points_of_the_current_batch():
    """Resampled batches: beta_PR = g'(g - g_prev) / |g_prev|^2 with g_prev the gradient at the PREVIOUS point on the
    CURRENT batch (Schraudolph et al. 2007), computed here with torch.func on copies of the model."""
    from oracles import dense_gradient
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(12, 5, generator=gen, dtype=DTYPE), torch.randint(0, 3, (12,), generator=gen))
               for _ in range(3)]
    opt = NLCG(model.parameters())
    for x, y in batches[:2]:
        before = copy.deepcopy(model)
        opt.step(Objective(model, "cross_entropy", x, y))
    x, y = batches[2]
    g_prev, g = dense_gradient(before, "cross_entropy", x, y), dense_gradient(model, "cross_entropy", x, y)
    stats = opt.step(Objective(model, "cross_entropy", x, y))
    expected = max(0.0, float(g.dot(g - g_prev) / g_prev.dot(g_prev)))
    assert float(stats["beta"]) == pytest.approx(expected, rel=1e-9) and expected > 0


# ---------------------------------------------------------------- checkpoints and configuration


@pytest.mark.parametrize("make", [lambda p: LBFGS(p, max_iter=3, history_size=4),
                                  lambda p: LBFGS(p, line_search="none", lr=0.1, max_iter=2),
                                  lambda p: NLCG(p),
                                  lambda p: NLCG(p, line_search="armijo", beta_rule="hs")],
                         ids=["lbfgs", "lbfgs_fixed_step", "nlcg", "nlcg_armijo"])
def test_state_dict_round_trip_is_bit_exact(make):
    x, y = classification_batch()

    def run(model: nn.Module, opt, steps: int) -> None:
        for _ in range(steps):
            opt.step(Objective(model, "cross_entropy", x, y))

    model = small_net()
    opt = make(model.parameters())
    run(model, opt, 6)
    straight = params_vector(model.parameters())

    model = small_net()
    opt = make(model.parameters())
    run(model, opt, 3)
    saved_model, saved_opt = {k: v.clone() for k, v in model.state_dict().items()}, opt.state_dict()
    run(model, opt, 1)  # moving on must not change the saved state (no aliasing of live buffers)
    resumed_model = small_net()
    resumed_model.load_state_dict(saved_model)
    resumed = make(resumed_model.parameters())
    resumed.load_state_dict(saved_opt)
    run(resumed_model, resumed, 3)
    assert torch.equal(params_vector(resumed_model.parameters()), straight)
    assert resumed.steps == 6


# ---------------------------------------------------------------- gradient test (seed 001 eq. 31)


def test_finite_difference_check_passes_for_autograd_gradients():
    x, y = classification_batch()
    objective = Objective(small_net(dropout=0.3).train(), "cross_entropy", x, y)
    report = finite_difference_check(objective, num_directions=4)
    assert len(report["relative_errors"]) == 4
    assert report["max_relative_error"] < 1e-7
    assert min(abs(d) for d in report["directional_derivatives"]) > 1e-4  # the test is not vacuous


class _WrongTanhGradient(torch.autograd.Function):
    """tanh whose backward forgets the chain-rule factor (1 - tanh^2): a deliberately wrong gradient."""

    @staticmethod
    def forward(ctx, x):
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output


class _WrongTanh(nn.Module):
    def forward(self, x):
        return _WrongTanhGradient.apply(x)


def test_finite_difference_check_detects_a_wrong_gradient():
    x, y = classification_batch()
    model = small_net()
    model[1] = _WrongTanh()
    report = finite_difference_check(Objective(model, "cross_entropy", x, y))
    assert report["max_relative_error"] > 1e-2


def test_finite_difference_check_rejects_a_direction_of_the_wrong_size():
    x, y = classification_batch()
    objective = Objective(small_net(), "cross_entropy", x, y)
    with pytest.raises(ValueError, match=r"direction has shape \(3,\), but the model has 51 parameters"):
        finite_difference_check(objective, direction=torch.ones(3))
    single = finite_difference_check(objective, direction=torch.ones(51))
    assert single["max_relative_error"] < 1e-7 and len(single["relative_errors"]) == 1


@pytest.mark.parametrize("method", [LBFGS, NLCG])
def test_weight_decay_reaches_the_ridge_minimiser(method):
    """Seed 001's regularised objective L + lambda/2 |w|^2 through the library's shared weight decay: L-BFGS and NLCG
    reach the ridge minimiser, written in closed form here: ((2/m) X^T X + eta I) w = (2/m) X^T y for the mean
    squared error (1/m) |X w - y|^2."""
    x, y, w_true = least_squares()
    eta, m = 0.3, x.shape[0]
    w_star = torch.linalg.solve(2 / m * x.T @ x + eta * torch.eye(x.shape[1]), 2 / m * x.T @ y).T  # (1, n)
    assert (w_star - w_true).abs().max() > 0.05  # the decay really moves the minimiser
    model = nn.Linear(8, 1, bias=False)
    tolerances = {"tolerance_grad": 1e-12, "tolerance_change": 0.0} if method is LBFGS else {}
    opt = method(model.parameters(), weight_decay=eta, **tolerances)
    for _ in range(60):
        opt.step(Objective(model, "mse", x, y))
    assert (model.weight.detach() - w_star).abs().max() < 1e-6


def test_nlcg_slope_initial_rule_repeats_the_last_first_order_change():
    """ls_initial_rule=slope: the first trial is alpha_prev g_prev^T d_prev / g^T d (Nocedal & Wright eq. 3.59), and
    the method still solves a least-squares problem."""
    x, y, _ = least_squares(n=8)
    model = nn.Linear(8, 1, bias=False).to(DTYPE)
    opt = NLCG(model.parameters(), ls_initial_rule="slope", ls_initial_rate=1e6)
    stats = opt.step(Objective(model, "mse", x, y))
    objective = Objective(model, "mse", x, y)
    g = objective.gradient()
    d, gtd, _, _ = opt._direction(g, g.dot(g))
    assert opt.prev_slope == pytest.approx(float(stats["line_search/rate"]) * float(-stats["grad_norm"] ** 2))
    assert opt._initial_rate(objective.loss(), g.dot(g), gtd) == pytest.approx(opt.prev_slope / float(gtd))
    losses = [float(opt.step(Objective(model, "mse", x, y))["loss"]) for _ in range(40)]
    assert losses[-1] < 1e-8 * losses[0]

"""CurveBall (seed 003): convergence region on quadratics, the 2x2 solve, lambda rescaling, weight decay, state."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
from oracles import dense_ggn, dense_hessian
import torch
from torch import nn

from models.problems import Rosenbrock
from optimizers.curveball import CurveBall
from optimizers.objective import Objective
from optimizers.vec import params_vector

DT = torch.float64


# ------------------------------------------------------------------------------------------------------------ problems
def quadratic(eigenvalues: list[float], seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """f(w) = 1/2 w'Aw - b'w (+ const) as least squares: a linear model on fixed inputs X with the "sse" loss.

    L = (1/B) |Xw - y|^2 has Hessian (2/B) X'X = A, exactly its GGN. With B = d and X = sqrt(B/2) diag(sqrt h) Q',
    A = Q diag(h) Q' and the minimiser solves X w = y.
    """
    g = torch.Generator().manual_seed(seed)
    d = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=DT))
    x = math.sqrt(d / 2) * torch.diag(torch.tensor(eigenvalues, dtype=DT).sqrt()) @ q.T
    y = torch.randn(d, 1, generator=g, dtype=DT)
    model = nn.Linear(d, 1, bias=False).to(DT)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, d, generator=g, dtype=DT))
    return model, x, y, torch.linalg.solve(x, y).reshape(-1)


def tanh_mlp(seed: int = 0, outputs: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, outputs)).to(DT)


def small_cnn(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU()]
    layers += [nn.Dropout(dropout)] if dropout else []
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(3 * 4 * 4, 3)).to(DT)


class Scalar(nn.Module):
    """out = fn(w x), one parameter: a tiny model whose quadratic (GGN) model can be made to predict badly."""

    def __init__(self, fn, init: float):
        super().__init__()
        self.fn, self.w = fn, nn.Parameter(torch.tensor([init], dtype=DT))

    def forward(self, x):
        return self.fn(self.w * x)


def batch(seed: int = 1, n: int = 6, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=DT), torch.randint(0, classes, (n,), generator=g)


def fixed_curveball(model: nn.Module, rho: float, beta: float) -> CurveBall:
    return CurveBall(model.parameters(), damping=0.0, auto_rho_beta=False, rho=rho, beta=beta, lambda_rescaling=False)


# --------------------------------------------------------------------------------------------------------- theorem A.1
def theorem_a1_converges(rho: float, beta: float, h: list[float]) -> bool:
    """Seed 003 eq. 26: 3/2 beta h_max - 1 < rho < 1 + beta h_min."""
    return 1.5 * beta * max(h) - 1 < rho < 1 + beta * min(h)


@pytest.mark.parametrize("rho,beta,converges", [
    (0.5, 0.08, True),    # inside eq. 26
    (0.5, 0.20, False),   # beta too large: 3/2 beta h_max - 1 = 2 > rho
    (1.2, 0.05, False),   # rho too large: rho > 1 + beta h_min = 1.05
])
def test_fixed_rho_beta_follow_theorem_a1_on_a_quadratic(rho, beta, converges):
    h = [1.0, 2.0, 5.0, 10.0]
    assert theorem_a1_converges(rho, beta, h) == converges
    model, x, y, w_star = quadratic(h)
    opt = fixed_curveball(model, rho, beta)
    for _ in range(250):
        opt.step(Objective(model, "sse", x, y))
    distance = (params_vector(model.parameters()) - w_star).norm().item()
    if converges:
        assert distance < 1e-8
    else:
        assert distance > 1e3


# -------------------------------------------------------------------------------------------------------------- eq. 18
def explicit_step(model, x, y, loss, curvature, z, lam):
    """rho, beta minimising q(rho z - beta dz) = g's + 1/2 s'(C + lam I)s, explicit matrices (seed 003 eq. 20-25)."""
    obj = Objective(model, loss, x, y)
    c = dense_ggn(model, loss, x, y) if curvature == "ggn" else dense_hessian(model, loss, x, y)
    g = obj.gradient()
    cd = c + lam * torch.eye(len(g), dtype=DT)
    dz = cd @ z + g
    p = torch.stack([z, dz], dim=1)                        # s = P [rho, -beta]
    coef = torch.linalg.solve(p.T @ cd @ p, -p.T @ g)
    rho, beta = coef[0], -coef[1]
    q = lambda s: g @ s + 0.5 * s @ cd @ s
    return rho, beta, dz, g, q


@pytest.mark.parametrize("curvature,fast_path,jdz_method,lr", [
    ("ggn", True, "double_backward", 1.0),
    ("ggn", True, "forward_ad", 1.0),
    ("ggn", False, "auto", 0.5),
    ("hessian", True, "auto", 1.0),
])
def test_automatic_rho_beta_minimise_the_2x2_model(curvature, fast_path, jdz_method, lr):
    model = tanh_mlp()
    x, y = batch()
    # Hessian of a tanh net may be indefinite: a larger lambda keeps C + lambda I positive definite.
    opt = CurveBall(model.parameters(), curvature=curvature, fast_path=fast_path, jdz_method=jdz_method, lr=lr,
                    damping=1.0 if curvature == "ggn" else 5.0, lambda_every=4)
    for _ in range(3):
        opt.step(Objective(model, "cross_entropy", x, y))
    z, lam = opt.z.clone(), opt.damping.item()
    assert z.norm() > 0
    rho, beta, dz, g, q = explicit_step(model, x, y, "cross_entropy", curvature, z, lam)
    w0 = params_vector(model.parameters())
    stats = opt.step(Objective(model, "cross_entropy", x, y))   # the 4th step also rescales lambda
    assert stats["rho"].item() == pytest.approx(rho.item(), abs=1e-10)
    assert stats["beta"].item() == pytest.approx(beta.item(), abs=1e-10)
    z_new = rho * z - beta * dz
    assert torch.allclose(opt.z, z_new, atol=1e-10, rtol=0)
    assert torch.allclose(params_vector(model.parameters()) - w0, lr * z_new, atol=1e-12, rtol=0)
    # Predicted change of the lambda test: the damped model at the step taken; with lr = 1 it is the closed form
    # -1/2 [beta, -rho] . b of the authors' code, b = [g'dz, g'z].
    assert stats["model_change"].item() == pytest.approx(q(lr * z_new).item(), rel=1e-9)
    if lr == 1.0:
        closed = -0.5 * (beta * (g @ dz) - rho * (g @ z))
        assert stats["model_change"].item() == pytest.approx(closed.item(), rel=1e-9)


def test_first_step_is_the_exact_line_search_along_the_gradient():
    model = tanh_mlp()
    x, y = batch()
    obj = Objective(model, "cross_entropy", x, y)
    g, lam = obj.gradient(), 10.0
    gg = dense_ggn(model, "cross_entropy", x, y) + lam * torch.eye(len(g), dtype=DT)
    expected_beta = (g @ g) / (g @ gg @ g)
    opt = CurveBall(model.parameters(), damping=lam)
    stats = opt.step(Objective(model, "cross_entropy", x, y))
    assert stats["rho"].item() == 0.0
    assert stats["beta"].item() == pytest.approx(expected_beta.item(), rel=1e-12)
    assert torch.allclose(opt.z, -expected_beta * g, atol=1e-14, rtol=0)
    assert stats["curv/jvp_products"] == 1 and stats["curv/vjp_products"] == 1  # no product with z = 0


def test_collinear_z_and_dz_fall_back_to_the_line_search():
    # One parameter: z and dz are always collinear, A is singular from the second step on, and the minimiser over
    # span{z, dz} is the damped Gauss-Newton step -g / (G + lambda).
    model = Scalar(torch.sin, 0.1)
    x, y = torch.ones(1, 1, dtype=DT), torch.full((1, 1), 0.5, dtype=DT)
    opt = CurveBall(model.parameters(), damping=0.1, lambda_rescaling=False)
    for _ in range(4):
        obj = Objective(model, "sse", x, y)
        newton = -obj.gradient() / (dense_ggn(model, "sse", x, y)[0, 0] + 0.1)
        w0 = model.w.detach().clone()
        stats = opt.step(Objective(model, "sse", x, y))
        assert stats["rho"].item() == 0.0
        assert (model.w.detach() - w0).item() == pytest.approx(newton.item(), rel=1e-12)


def test_fast_path_costs_two_j_products_and_one_backward_and_fixed_rho_beta_one():
    model = tanh_mlp()
    x, y = batch()
    auto = CurveBall(model.parameters(), lambda_rescaling=False)
    auto.step(Objective(model, "cross_entropy", x, y))
    stats = auto.step(Objective(model, "cross_entropy", x, y))
    assert (stats["curv/jvp_products"], stats["curv/vjp_products"]) == (2, 1)
    fixed = CurveBall(model.parameters(), auto_rho_beta=False, lambda_rescaling=False)
    fixed.step(Objective(model, "cross_entropy", x, y))
    stats = fixed.step(Objective(model, "cross_entropy", x, y))
    assert (stats["curv/jvp_products"], stats["curv/vjp_products"]) == (1, 1)


@pytest.mark.parametrize("jdz_method", ["double_backward", "forward_ad"])
def test_fast_path_equals_objective_products_with_batch_norm_and_dropout(jdz_method):
    """The fused forward must commit BN running statistics once, draw the same dropout masks, give the same J z."""
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(5, 1, 6, 6, generator=g, dtype=DT), torch.randint(0, 3, (5,), generator=g)) for _ in range(3)]
    runs = []
    for fast in (True, False):
        model = small_cnn(dropout=0.3)
        opt = CurveBall(model.parameters(), fast_path=fast, jdz_method=jdz_method, lambda_every=2)
        torch.manual_seed(7)
        for x, y in data + data[:1]:
            opt.step(Objective(model, "cross_entropy", x, y))
        runs.append((model.state_dict(), opt.damping))
    (state_a, lam_a), (state_b, lam_b) = runs
    assert lam_a.item() == pytest.approx(lam_b.item(), rel=1e-12)
    for key in state_a:
        assert torch.allclose(state_a[key].to(DT), state_b[key].to(DT), atol=1e-10, rtol=0), key
    assert state_a["1.num_batches_tracked"].item() == 4


class NoForwardAD(torch.autograd.Function):
    """x^2 with a backward but no jvp: forward-mode AD through it raises NotImplementedError."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class Square(nn.Module):
    def forward(self, h):
        return NoForwardAD.apply(h)


def test_fast_path_falls_back_to_the_objective_products_without_forward_ad():
    x, _ = batch()
    y = torch.randn(6, 3, dtype=DT)
    runs = []
    for fast in (True, False):
        model = nn.Sequential(tanh_mlp(), Square())
        opt = CurveBall(model.parameters(), fast_path=fast)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):
                opt.step(Objective(model, "sse", x, y))
        runs.append(params_vector(model.parameters()))
        fell_back = [w for w in caught if "forward-mode AD failed" in str(w.message)]
        assert len(fell_back) == (1 if fast else 0)
        assert not opt.fused
    assert torch.equal(runs[0], runs[1])


# ---------------------------------------------------------------------------------------------------------- Rosenbrock
@pytest.mark.parametrize("lambda0,min_steps,max_steps", [(1.0, 25, 40), (None, 180, 260)])
def test_reaches_the_rosenbrock_minimum(lambda0, min_steps, max_steps):
    """Deterministic Rosenbrock (eps = 1) from (-1.2, 1), tolerance 1e-4 as in seed 003 Table 1 (CurveBall: 13).

    Measured: 30 steps with lambda0 = 1 (loss < 1e-4 after 14), 213 with the default lambda0 = 10; lambda rescaling
    by 0.999^5 every 5 steps barely moves lambda in that time, so the count depends on lambda0.
    """
    model = Rosenbrock().to(DT)
    opt = CurveBall(model.parameters(), damping=lambda0)
    x, y = torch.ones(1, 1, dtype=DT), torch.zeros(1, 2, dtype=DT)
    target = torch.ones(2, dtype=DT)
    for step in range(1, max_steps + 1):
        opt.step(Objective(model, "sse", x, y))
        if (model.xy.detach() - target).norm() < 1e-4:
            break
    assert (model.xy.detach() - target).norm() < 1e-4, f"not at (1, 1) after {step} steps: {model.xy.tolist()}"
    assert step >= min_steps  # near the measured count: a much faster run would be a different method


# -------------------------------------------------------------------------------------------------------------- lambda
def one_rescaling_step(model, x, y, loss, lambda0):
    opt = CurveBall(model.parameters(), damping=lambda0, lambda_every=1)
    loss_before = Objective(model, loss, x, y).loss()
    stats = opt.step(Objective(model, loss, x, y))
    loss_after = Objective(model, loss, x, y).loss()
    return opt, stats, loss_before, loss_after


def test_lambda_decreases_when_the_loss_falls_faster_than_the_damped_model_predicts():
    # On a quadratic the undamped model is exact, so gamma = 1 + lambda |s|^2 / (2 |M|) > 3/2 iff lambda exceeds
    # the Rayleigh quotient of the gradient: lambda = 10 > h_max = 4.
    model, x, y, _ = quadratic([0.5, 1.0, 2.0, 4.0])
    opt, stats, before, after = one_rescaling_step(model, x, y, "sse", 10.0)
    gamma = stats["lambda_ratio"].item()
    assert gamma == pytest.approx(((after - before) / stats["model_change"]).item(), rel=1e-12)
    step = opt.z  # lr = 1
    assert gamma == pytest.approx(1 + 10.0 * (step @ step).item() / (2 * abs(stats["model_change"].item())), rel=1e-9)
    assert gamma > 1.5
    assert opt.damping.item() == pytest.approx(10.0 * 0.999, rel=1e-15)


def test_lambda_unchanged_when_the_model_predicts_well():
    model, x, y, _ = quadratic([0.5, 1.0, 2.0, 4.0])
    opt, stats, _, _ = one_rescaling_step(model, x, y, "sse", 0.01)
    assert 1.0 < stats["lambda_ratio"].item() < 1.01
    assert opt.damping.item() == 0.01


def test_lambda_increases_when_the_model_predicts_badly():
    # out = sin(w), target 3, w = 0: the linearised model promises the loss 9 -> 0 at w = 3, but sin(3) = 0.14.
    model = Scalar(torch.sin, 0.0)
    x, y = torch.ones(1, 1, dtype=DT), torch.full((1, 1), 3.0, dtype=DT)
    opt, stats, before, after = one_rescaling_step(model, x, y, "sse", 1e-3)
    assert stats["lambda_ratio"].item() < 0.5
    assert after < before  # the loss still fell, far less than predicted
    assert opt.damping.item() == pytest.approx(1e-3 / 0.999, rel=1e-15)


def test_nan_loss_leaves_lambda_unchanged():
    # out = log(w), target -10, w = 0.5: the Gauss-Newton step lands at w < 0 where the loss is NaN.
    model = Scalar(torch.log, 0.5)
    x, y = torch.ones(1, 1, dtype=DT), torch.full((1, 1), -10.0, dtype=DT)
    opt, stats, _, after = one_rescaling_step(model, x, y, "sse", 1e-6)
    assert model.w.item() < 0 and math.isnan(after.item())
    assert math.isnan(stats["lambda_ratio"].item())
    assert opt.damping.item() == 1e-6


def test_lambda0_auto_is_1_with_batch_norm_and_10_without():
    x, y = batch()
    plain = tanh_mlp()
    opt = CurveBall(plain.parameters(), lambda_rescaling=False)
    assert opt.step(Objective(plain, "cross_entropy", x, y))["damping"].item() == 10.0
    cnn = small_cnn()
    opt = CurveBall(cnn.parameters(), lambda_rescaling=False)
    images = torch.randn(4, 1, 6, 6, dtype=DT)
    assert opt.step(Objective(cnn, "cross_entropy", images, y[:4]))["damping"].item() == 1.0


# -------------------------------------------------------------------------------------------------------- weight decay
class Regularised(nn.Module):
    """Appends sqrt(eta/2) w to every output row (target 0): with "sse" that adds exactly eta/2 |w|^2 to the loss,
    and eta I to the GGN (its Jacobian is sqrt(eta/2) I per row, H_L = 2/B)."""

    def __init__(self, net: nn.Module, eta: float):
        super().__init__()
        self.net, self.scale = net, math.sqrt(eta / 2)

    def forward(self, x):
        w = torch.cat([p.reshape(-1) for p in self.net.parameters()])
        return torch.cat([self.net(x), self.scale * w.expand(x.shape[0], -1)], dim=1)


@pytest.mark.parametrize("fast_path", [True, False])
def test_weight_decay_equals_the_explicitly_regularised_objective(fast_path):
    eta = 0.05
    x, _ = batch()
    y = torch.randn(6, 2, dtype=DT)
    decayed = tanh_mlp(outputs=2)
    regularised = Regularised(copy.deepcopy(decayed), eta)
    n = sum(p.numel() for p in decayed.parameters())
    y_reg = torch.cat([y, torch.zeros(6, n, dtype=DT)], dim=1)
    opt_a = CurveBall(decayed.parameters(), weight_decay=eta, damping=1.0, lambda_every=2, fast_path=fast_path)
    opt_b = CurveBall(regularised.parameters(), damping=1.0, lambda_every=2, fast_path=fast_path)
    for _ in range(6):
        sa = opt_a.step(Objective(decayed, "sse", x, y))
        sb = opt_b.step(Objective(regularised, "sse", x, y_reg))
        assert sa["rho"].item() == pytest.approx(sb["rho"].item(), abs=1e-12)
        assert sa["beta"].item() == pytest.approx(sb["beta"].item(), abs=1e-12)
    assert torch.allclose(params_vector(decayed.parameters()), params_vector(regularised.parameters()), atol=1e-12,
                          rtol=0)
    assert opt_a.damping.item() == pytest.approx(opt_b.damping.item(), rel=1e-12)
    assert opt_a.damping.item() != 1.0  # the lambda test (with the eta/2 |w|^2 change) did act


# ------------------------------------------------------------------------------------------------------- state, errors
def test_state_dict_round_trip_is_bit_exact():
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(5, 1, 6, 6, generator=g, dtype=DT), torch.randint(0, 3, (5,), generator=g)) for _ in range(6)]

    def run(model, opt, batches):
        for x, y in batches:
            opt.step(Objective(model, "cross_entropy", x, y))

    hp = dict(lambda_every=2, weight_decay=1e-3)
    model = small_cnn()
    opt = CurveBall(model.parameters(), **hp)
    run(model, opt, data)

    first = small_cnn()
    opt_first = CurveBall(first.parameters(), **hp)
    run(first, opt_first, data[:3])
    saved_model, saved_opt = copy.deepcopy(first.state_dict()), opt_first.state_dict()
    run(first, opt_first, data[3:])  # must not alter the saved state
    resumed = small_cnn()
    with torch.no_grad():
        for p in resumed.parameters():
            p.add_(1.0)
    resumed.load_state_dict(saved_model)
    opt_resumed = CurveBall(resumed.parameters(), **hp)
    opt_resumed.load_state_dict(saved_opt)
    run(resumed, opt_resumed, data[3:])
    for key, value in model.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    assert torch.equal(opt.z, opt_resumed.z) and torch.equal(opt.damping, opt_resumed.damping)
    assert opt_resumed.steps == 6


"""Curvature diagnostics against ground truth that shares no code with them: dense float64 Hessians and GGNs built
here from torch.func alone (functional_call of the model on a flat parameter vector, torch.func.hessian / jacrev),
torch.linalg.eigh, exact traces, and the variance formulas of the stochastic estimators."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from optimizers import Objective
from optimizers import diagnostics as diag

DT = torch.float64


# ----------------------------------------------------------------------------------------------- test-side oracle
def flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def as_dict(model: nn.Module, w: torch.Tensor) -> dict:
    out, i = {}, 0
    for name, p in model.named_parameters():
        out[name] = w[i:i + p.numel()].view(p.shape)
        i += p.numel()
    return out


def oracle(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str = "ce"):
    """(loss function of the flat parameters, w0, dense Hessian, dense GGN), from torch.func only."""
    crit = (lambda f: F.cross_entropy(f, y)) if loss == "ce" else (lambda f: F.mse_loss(f, y))

    def outputs(w):
        return torch.func.functional_call(model, as_dict(model, w), (x,))

    def loss_of(w):
        return crit(outputs(w))

    w0 = flat_params(model)
    hess = torch.func.hessian(loss_of)(w0)
    jac = torch.func.jacrev(outputs)(w0)                                       # (B, o, n)
    f0 = outputs(w0).detach()
    h_out = torch.func.hessian(crit)(f0)                                       # (B, o, B, o)
    ggn = torch.einsum("bip,bicj,cjq->pq", jac, h_out, jac)
    return loss_of, w0, hess, ggn


def tanh_mlp(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 5), nn.Tanh()] + ([nn.Dropout(dropout)] if dropout else []) + [nn.Linear(5, 3)]
    return nn.Sequential(*layers).double()


def batch(n: int = 40, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


@pytest.fixture(scope="module")
def problem():
    model = tanh_mlp()
    x, y = batch()
    loss_of, w0, hess, ggn = oracle(model, x, y)
    return model, x, y, loss_of, w0, {"hessian": hess, "ggn": ggn}


def objective(problem) -> Objective:
    model, x, y = problem[:3]
    return Objective(model, "cross_entropy", x, y)


def aligned_error(v: torch.Tensor, u: torch.Tensor) -> float:
    """||v - u|| after fixing the sign ambiguity of eigenvectors."""
    return float(min((v - u).norm(), (v + u).norm()))


# ----------------------------------------------------------------------------------------------- spectrum
@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_lanczos_eigenpairs_match_dense_eigh(problem, curvature, which):
    dense = problem[5][curvature]
    exact_vals, exact_vecs = torch.linalg.eigh(dense)                      # ascending
    k = 4
    idx = torch.arange(exact_vals.numel()).flip(0)[:k] if which == "largest" else torch.arange(k)
    result = diag.eigenpairs(objective(problem), k=k, which=which, curvature=curvature, tol=1e-12)
    assert result.converged and result.eigenvalues.shape == (k,) and result.eigenvectors.shape == (k, 53)
    assert (result.eigenvalues - exact_vals[idx]).abs().max() < 1e-8
    assert result.cost.products == result.iterations <= 53
    vecs = result.eigenvectors
    assert torch.allclose(vecs @ vecs.T, torch.eye(k, dtype=DT), atol=1e-10)
    assert (dense @ vecs.T - vecs.T * result.eigenvalues).norm(dim=0).max() < 1e-8
    gaps = (exact_vals[1:] - exact_vals[:-1]).abs()
    if curvature == "ggn" and which == "smallest":     # the GGN's null space (softmax shift invariance): 6 zeros
        assert exact_vals[:6].abs().max() < 1e-12 and gaps[5] > 1e-6
        return
    assert gaps[idx.clamp(max=gaps.numel() - 1)].min() > 1e-4             # eigenvectors are well defined
    assert result.cost.products < 53                                        # fewer products than the dense matrix
    for v, i in zip(vecs, idx):
        assert aligned_error(v, exact_vecs[:, i]) < 1e-8


def test_hessian_has_negative_curvature_and_ggn_does_not(problem):
    hess_bottom = diag.eigenpairs(objective(problem), k=1, which="smallest", curvature="hessian", tol=1e-10)
    ggn_bottom = diag.eigenpairs(objective(problem), k=1, which="smallest", curvature="ggn", tol=1e-10)
    assert hess_bottom.eigenvalues[0] < -0.01                               # the bottom test is not vacuous
    assert ggn_bottom.eigenvalues[0] > -1e-12
    assert "hessian_bottom1" in hess_bottom.scalars()


@pytest.mark.parametrize("which", ["largest", pytest.param("smallest", marks=pytest.mark.slow)])
def test_power_iteration_agrees_with_lanczos_and_costs_more(problem, which):
    obj = objective(problem)
    power = diag.power_iteration(obj, k=2, which=which, tol=1e-9, max_iters=4000)
    lanczos = diag.lanczos_eigenpairs(obj, k=2, which=which, tol=1e-12)
    assert power.converged
    assert (power.eigenvalues - lanczos.eigenvalues).abs().max() < 1e-8
    for v, u in zip(power.eigenvectors, lanczos.eigenvectors):
        assert aligned_error(v, u) < 1e-6
    assert power.cost.products > 3 * lanczos.cost.products


def test_power_iteration_reaches_the_wanted_end_when_the_other_dominates():
    # eigenvalues -5, -1, 0.5, 2: the magnitude-dominant one is negative
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0), dtype=DT))
    a = q @ torch.diag(torch.tensor([-5.0, -1.0, 0.5, 2.0], dtype=DT)) @ q.T
    top = diag.power_iteration(diag.MatrixOperator(a), k=2, which="largest", tol=1e-12, max_iters=5000)
    bottom = diag.power_iteration(diag.MatrixOperator(a), k=2, which="smallest", tol=1e-12, max_iters=5000)
    assert torch.allclose(top.eigenvalues, torch.tensor([2.0, 0.5], dtype=DT), atol=1e-9)
    assert torch.allclose(bottom.eigenvalues, torch.tensor([-5.0, -1.0], dtype=DT), atol=1e-9)


def test_lanczos_handles_repeated_eigenvalues():
    # an invariant subspace closes the Krylov space early: the restart must still find every copy
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=torch.Generator().manual_seed(1), dtype=DT))
    values = torch.tensor([3.0, 3.0, 3.0, 1.0] + [0.0] * 26, dtype=DT)
    a = q @ torch.diag(values) @ q.T
    result = diag.lanczos_eigenpairs(diag.MatrixOperator(a), k=4, tol=1e-10)
    assert torch.allclose(result.eigenvalues, values[:4], atol=1e-10)
    assert torch.allclose(result.eigenvectors @ result.eigenvectors.T, torch.eye(4, dtype=DT), atol=1e-10)


# ----------------------------------------------------------------------------------------------- traces
def hutchinson_std(a: torch.Tensor, probes: int) -> float:
    """Standard deviation of Hutchinson's estimate with Rademacher probes: sqrt(2 sum_{i != j} A_ij^2 / N)."""
    off = a - torch.diag(torch.diag(a))
    return math.sqrt(2 * float(off.pow(2).sum()) / probes)


def test_hutchinson_through_the_objective_equals_the_dense_matrix_with_the_same_probes(problem):
    hess = problem[5]["hessian"]
    obj = objective(problem)
    before = obj.product_count["hvp"]
    via_objective = diag.hutchinson_trace(obj, num_probes=30, seed=5)
    via_matrix = diag.hutchinson_trace(diag.MatrixOperator(hess), num_probes=30, seed=5)
    assert abs(via_objective.trace - via_matrix.trace) < 1e-10
    assert via_objective.cost.products == 30 == obj.product_count["hvp"] - before
    assert abs(via_objective.trace - float(torch.trace(hess))) < 5 * hutchinson_std(hess, 30)


def test_hutchinson_error_falls_as_one_over_sqrt_probes(problem):
    hess = problem[5]["hessian"]
    exact = float(torch.trace(hess))
    counts, seeds = [4, 16, 64, 256], range(24)
    rms = []
    for n in counts:
        errors = [diag.hutchinson_trace(diag.MatrixOperator(hess), n, seed=s).trace - exact for s in seeds]
        rms.append(math.sqrt(sum(e * e for e in errors) / len(errors)))
    logs = torch.tensor([[math.log(n), math.log(r)] for n, r in zip(counts, rms)], dtype=DT)
    x, y = logs[:, 0] - logs[:, 0].mean(), logs[:, 1] - logs[:, 1].mean()
    slope = float((x * y).sum() / (x * x).sum())
    assert -0.65 < slope < -0.35
    for n, r in zip(counts, rms):                          # and at the size the variance formula predicts
        assert 0.6 < r / hutchinson_std(hess, n) < 1.5


def test_hutchpp_beats_hutchinson_on_a_low_rank_dominated_hessian():
    # least squares y = X w with 5 large singular values of X: H = (2/B) X^T X is low-rank dominated
    g = torch.Generator().manual_seed(3)
    u, _ = torch.linalg.qr(torch.randn(100, 60, generator=g, dtype=DT))
    v, _ = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=DT))
    s = torch.cat([torch.tensor([20.0, 15.0, 12.0, 10.0, 8.0], dtype=DT), torch.full((55,), 0.3, dtype=DT)])
    x = u @ torch.diag(s) @ v.T
    model = nn.Linear(60, 1, bias=False).double()
    y = torch.randn(100, 1, generator=g, dtype=DT)
    hess = oracle(model, x, y, loss="mse")[2]
    exact = float(torch.trace(hess))
    obj = Objective(model, "mse", x, y)
    plain = [diag.hutchinson_trace(obj, 30, seed=i).trace - exact for i in range(12)]
    plus = [diag.hutchpp_trace(obj, 30, seed=i) for i in range(12)]
    assert all(p.cost.products == 30 for p in plus)
    rms_plain = math.sqrt(sum(e * e for e in plain) / 12)
    rms_plus = math.sqrt(sum((p.trace - exact) ** 2 for p in plus) / 12)
    assert rms_plus < 0.1 * rms_plain


def test_hutchpp_is_exact_when_the_sketch_spans_the_range():
    q, _ = torch.linalg.qr(torch.randn(50, 5, generator=torch.Generator().manual_seed(2), dtype=DT))
    a = q @ torch.diag(torch.tensor([5.0, 4.0, -3.0, 2.0, 1.0], dtype=DT)) @ q.T
    assert abs(diag.hutchpp_trace(diag.MatrixOperator(a), 30).trace - 9.0) < 1e-10


def test_hutchinson_diagonal_within_its_standard_error(problem):
    hess = problem[5]["hessian"]
    n = 2000
    est = diag.hutchinson_diagonal(diag.MatrixOperator(hess), num_probes=n, seed=1)
    off = hess - torch.diag(torch.diag(hess))
    std = (off.pow(2).sum(1) / n).sqrt()                   # per entry: sqrt(sum_{j != i} A_ij^2 / N)
    z = (est.diagonal - torch.diag(hess)).abs() / std
    assert float(z.max()) < 5 and float(z.mean()) > 0.1   # inside 5 sigma, and not suspiciously exact
    assert est.cost.products == n and "diagonal" not in est.to_dict()


# ----------------------------------------------------------------------------------------------- density
def test_slq_density_integrates_to_one_and_matches_the_moments(problem):
    hess = problem[5]["hessian"]
    n, probes = hess.shape[0], 40
    density = diag.spectral_density(objective(problem), num_probes=probes, num_steps=12, seed=0)
    assert density.cost.products == probes * 12
    assert torch.allclose(density.weights.sum(1), torch.ones(probes, dtype=DT), atol=1e-12)
    grid, phi = density.density(num_points=4000)
    assert abs(float(torch.trapezoid(phi, grid)) - 1.0) < 1e-3
    assert abs(float(density.histogram(20)[1].sum()) - 1.0) < 1e-12
    power = torch.eye(n, dtype=DT)
    for k in (1, 2, 3):
        power = power @ hess
        exact = float(torch.trace(power)) / n
        std = hutchinson_std(power, probes) / n            # Rademacher probes: v^T A^k v / n is Hutchinson / n
        assert abs(density.moment(k) - exact) < 5 * std + 1e-12
    exact_vals = torch.linalg.eigvalsh(hess)
    assert abs(float(density.nodes.max()) - float(exact_vals[-1])) < 1e-4   # the extremes converge first
    assert abs(float(density.nodes.min()) - float(exact_vals[0])) < 1e-4


# ----------------------------------------------------------------------------------------------- Taylor test
def test_taylor_slopes_are_one_two_three_on_a_smooth_model(problem):
    result = diag.taylor_test(objective(problem), seed=0)
    assert result.cost.products == 1 and result.cost.loss_evals == 7 and result.cost.gradients == 1
    assert abs(float(result.slopes[0]) - 1) < 0.05
    assert abs(float(result.slopes[1]) - 2) < 0.05
    assert abs(float(result.slopes[2]) - 3) < 0.1
    assert int(result.fitted[2].sum()) >= 3


def test_taylor_test_along_the_top_eigenvector_and_with_the_wrong_curvature(problem):
    obj = objective(problem)
    top = diag.eigenpairs(obj, k=1, tol=1e-10)
    along = diag.taylor_test(obj, direction=top.eigenvectors[0])
    assert abs(along.directional_curvature - float(top.eigenvalues[0])) < 1e-10
    assert abs(float(along.slopes[2]) - 3) < 0.1
    # the GGN differs from the Hessian along a random direction: its second-order remainder is only O(h^2), so
    # the fitted slope falls well short of 3 (it tends to 2 as h -> 0)
    wrong = diag.taylor_test(obj, curvature="ggn", seed=0)
    assert float(wrong.slopes[2]) < 2.5 and abs(float(wrong.slopes[1]) - 2) < 0.05


# ----------------------------------------------------------------------------------------------- surfaces
def test_surface_equals_the_loss_at_the_origin_and_on_the_grid(problem):
    model, _, _, loss_of, w0, _ = problem
    obj = objective(problem)
    d1 = diag.filter_normalized_direction(obj, seed=0)
    d2 = diag.filter_normalized_direction(obj, seed=1)
    alphas, betas = [-0.5, 0.0, 0.25], [-1.0, 0.0, 1.0]
    surface = diag.loss_surface(obj, (d1, d2), alphas, betas)
    assert surface.losses.shape == (3, 3) and surface.cost.loss_evals == 9
    assert abs(float(surface.losses[1, 1]) - float(loss_of(w0))) < 1e-14
    assert abs(surface.loss - float(loss_of(w0))) < 1e-14
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            assert abs(float(surface.losses[i, j]) - float(loss_of(w0 + a * d1 + b * d2))) < 1e-13
    assert torch.equal(flat_params(model), w0)                # the parameters never moved
    line = diag.loss_line(obj, d1, [0.0, 0.5])
    assert abs(float(line.losses[1]) - float(loss_of(w0 + 0.5 * d1))) < 1e-13


def test_filter_normalized_direction_has_the_filter_norms_of_the_weights(problem):
    model = problem[0]
    d = diag.filter_normalized_direction(objective(problem), seed=3)
    parts = as_dict(model, d)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            assert torch.equal(parts[name], torch.zeros_like(p))
        else:
            assert torch.allclose(parts[name].norm(dim=1), p.detach().norm(dim=1), rtol=1e-12)


# ----------------------------------------------------------------------------------------------- determinism, records
def run_all(obj: Objective, seed: int) -> list[torch.Tensor]:
    return [
        diag.eigenpairs(obj, k=2, seed=seed, max_steps=6).eigenvalues,
        diag.power_iteration(obj, k=1, seed=seed, max_iters=5).eigenvectors,
        diag.hutchinson_trace(obj, 5, seed=seed).samples,
        diag.hutchpp_trace(obj, 9, seed=seed).samples,
        diag.hutchinson_diagonal(obj, 3, seed=seed).diagonal,
        diag.spectral_density(obj, 2, 4, seed=seed).nodes,
        diag.taylor_test(obj, seed=seed).losses,
        diag.filter_normalized_direction(obj, seed=seed),
        torch.tensor(diag.gradient_check(obj, seed=seed).finite_differences),
    ]


def test_deterministic_for_a_seed_and_global_rng_untouched():
    x, y = batch(12)
    obj = Objective(tanh_mlp(dropout=0.2).train(), "cross_entropy", x, y)
    obj.loss()                                             # the batch's own forward draws its dropout mask
    state = torch.get_rng_state()
    first, again, other = run_all(obj, 7), run_all(obj, 7), run_all(obj, 8)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not any(torch.equal(a, b) for a, b in zip(first, other))


def test_records_serialise_without_parameter_sized_vectors(problem):
    obj = objective(problem)
    top = diag.eigenpairs(obj, k=2, max_steps=8)
    records = [top, diag.hutchinson_trace(obj, 3), diag.spectral_density(obj, 2, 3), diag.taylor_test(obj),
               diag.loss_line(obj, top.eigenvectors[0], [0.0, 1.0]), diag.gradient_check(obj)]
    for record in records:
        data = json.loads(json.dumps(record.to_dict()))
        assert "cost" in data and data["cost"]["seconds"] >= 0
        assert all(isinstance(v, float) for v in record.scalars().values())
    assert "eigenvectors" not in top.to_dict() and top.to_dict()["eigenvalues"] == top.eigenvalues.tolist()
    assert set(top.scalars()) == {"hessian_top1", "hessian_top2", "hessian_top_products", "hessian_top_seconds"}


@pytest.mark.parametrize("call, message", [
    (lambda o: diag.eigenpairs(o, k=0), r"k=0 must be an integer between 1 and the number of parameters \(53\)"),
    (lambda o: diag.eigenpairs(o, which="top"), r"which='top' is not one of \['largest', 'smallest'\]"),
    (lambda o: diag.eigenpairs(o, method="arnoldi"), r"method='arnoldi' is not one of \['lanczos', 'power'\]"),
    (lambda o: diag.hutchinson_trace(o, curvature="fisher"), r"curvature=fisher is not one of: ggn, hessian\."),
    (lambda o: diag.hutchinson_trace(o, 0), r"num_probes=0 must be an integer >= 1"),
    (lambda o: diag.hutchpp_trace(o, 2), r"num_products=2 must be an integer >= 3"),
    (lambda o: diag.taylor_test(o, direction=torch.ones(3, dtype=DT)), r"direction must be a non-zero flat vector"),
    (lambda o: diag.loss_surface(o, [torch.ones(53, dtype=DT)]), r"loss_surface needs two directions, got 1"),
    (lambda o: diag.filter_normalized_direction(o, one_dim="skip"), r"one_dim='skip' is not one of"),
])
def test_bad_arguments_name_the_key(problem, call, message):
    with pytest.raises(ValueError, match=message):
        call(objective(problem))


def test_plots_write_pngs(problem, tmp_path):
    from optimizers.diagnostics import plots
    obj = objective(problem)
    top = diag.eigenpairs(obj, k=2, max_steps=10)
    d = top.eigenvectors
    figures = {
        "spectrum": plots.plot_spectrum([top, diag.eigenpairs(obj, k=2, which="smallest", max_steps=10)],
                                        diag.spectral_density(obj, 2, 5),
                                        full=torch.linalg.eigvalsh(problem[5]["hessian"])),
        "taylor": plots.plot_taylor(diag.taylor_test(obj)),
        "contour": plots.plot_surface(diag.loss_surface(obj, (d[0], d[1]), [-1, 0, 1], [-1, 0, 1])),
        "surface3d": plots.plot_surface(diag.loss_surface(obj, (d[0], d[1]), [-1, 0, 1], [-1, 0, 1]), kind="3d"),
        "line": plots.plot_line(diag.loss_line(obj, d[0], [-1, 0, 1])),
    }
    for name, fig in figures.items():
        fig.savefig(tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def bn_dropout_net() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)).double()


def sgd_trajectory(model: nn.Module, diagnose_at: int | None) -> list[torch.Tensor]:
    """Three SGD steps on fixed batches; optionally every diagnostic on another batch before step ``diagnose_at``."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    torch.manual_seed(11)
    for step in range(3):
        if step == diagnose_at:
            with diag.isolated(model):
                x, y = batch(16, seed=9)
                obj = Objective(model, "cross_entropy", x, y)
                run_all(obj, seed=0)
                diag.loss_surface(obj, [diag.filter_normalized_direction(obj)] * 2, [0.0, 1.0], [0.0])
        x, y = batch(16, seed=step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return [t.detach().clone() for t in model.state_dict().values()] + [torch.get_rng_state()]


def test_isolated_diagnostics_leave_a_training_trajectory_bitwise_unchanged():
    plain = sgd_trajectory(bn_dropout_net().train(), diagnose_at=None)
    with_diagnostics = sgd_trajectory(bn_dropout_net().train(), diagnose_at=1)
    assert all(torch.equal(a, b) for a, b in zip(plain, with_diagnostics))
    # without the guard the diagnostic batch's forward moves the BN statistics and the dropout RNG
    model = bn_dropout_net().train()
    before = model[1].running_mean.clone()
    Objective(model, "cross_entropy", *batch(16, seed=9)).loss()
    assert not torch.equal(model[1].running_mean, before)

"""Preconditioned CG (optimizers/cg.py): exact solves, Martens' stopping rule, negative curvature, stored iterates,
tracked model values and CG backtracking, on small float64 systems with known answers."""
import math

import pytest
import torch

from optimizers.cg import cg_backtrack, pcg

DT = torch.float64
N = 50


def spd(n: int = N, cond: float = 1e3, seed: int = 0) -> torch.Tensor:
    """Q diag(linspace(1, cond)) Q^T: symmetric positive definite with condition number ``cond``."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    return q @ torch.diag(torch.linspace(1.0, cond, n, dtype=DT)) @ q.T


def rhs(n: int = N, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=DT)


def badly_scaled(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """A = D S D with S = spd() and D spanning 4 orders of magnitude; M = D^2 undoes the scaling exactly."""
    g = torch.Generator().manual_seed(seed)
    d = torch.logspace(-2, 2, N, dtype=DT)[torch.randperm(N, generator=g)]
    return d[:, None] * spd() * d[None, :], d**2


def q_of(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> float:
    return float(0.5 * x @ a @ x - b @ x)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm())


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny systems: on a busy 2-core machine more intra-op threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


EXACT = dict(martens_tol=0.0, tol=1e-13, max_iters=1000)


def test_solves_spd_system_like_linalg_solve():
    a, b = spd(), rhs()
    result = pcg(lambda v: a @ v, b, **EXACT)
    assert result.stop_reason == "tolerance"
    assert rel_err(result.x, torch.linalg.solve(a, b)) < 1e-10
    assert result.residual_norm == pytest.approx(float((a @ result.x - b).norm()), abs=1e-11)


def test_preconditioned_solve_is_exact_and_undoes_bad_scaling():
    a, m = badly_scaled()
    b = rhs()
    ref = torch.linalg.solve(a, b)
    plain = pcg(lambda v: a @ v, b, **EXACT)
    pre = pcg(lambda v: a @ v, b, precond=m, **EXACT)
    jacobi = pcg(lambda v: a @ v, b, precond=a.diagonal(), **EXACT)
    for result in (pre, jacobi):
        assert result.stop_reason == "tolerance"
        assert rel_err(result.x, ref) < 1e-10
    # PCG with M = D^2 on D S D is CG on S: at most n steps in exact arithmetic (+ 10 % slack for rounding, whose
    # size depends on the CPU's BLAS kernels: 53 steps on one AVX2 machine, 54 on an AVX-512 one); without the
    # preconditioner the condition number is ~1e11 and CG needs many times n.
    assert pre.iterations <= N + N // 10
    assert plain.iterations > 5 * N


def test_unpreconditioned_cg_converges_within_n_iterations():
    a, b = spd(), rhs()
    result = pcg(lambda v: a @ v, b, martens_tol=0.0, tol=1e-10, max_iters=1000)
    assert result.stop_reason == "tolerance"
    assert result.iterations <= N
    assert rel_err(result.x, torch.linalg.solve(a, b)) < 1e-10


def test_warm_start_from_near_solution_converges_faster():
    a, b = spd(), rhs()
    ref = torch.linalg.solve(a, b)
    x0 = ref + 1e-6 * rhs(seed=5)
    cold = pcg(lambda v: a @ v, b, **EXACT)
    warm = pcg(lambda v: a @ v, b, x0=x0, **EXACT)
    assert rel_err(warm.x, ref) < 1e-10
    assert warm.iterations < cold.iterations
    assert warm.phis[0] == pytest.approx(q_of(a, b, x0), rel=1e-12)
    assert torch.equal(x0, ref + 1e-6 * rhs(seed=5))  # the caller's x0 is not modified


def stalling_system() -> tuple[torch.Tensor, torch.Tensor]:
    """Three stiff directions carry all of b but 1e-6 of it; 97 soft ones (eigenvalues 1e-3 .. 1e-9) carry the rest.
    CG solves the stiff part at once, then q creeps down by ~1e-5 relative per iteration for hundreds of steps."""
    eig = torch.cat([torch.ones(3, dtype=DT), torch.logspace(-3, -9, 97, dtype=DT)])
    b = torch.cat([torch.ones(3, dtype=DT), 1e-6 * torch.ones(97, dtype=DT)])
    return torch.diag(eig), b


def test_martens_rule_stops_early_when_progress_stalls():
    a, b = stalling_system()
    result = pcg(lambda v: a @ v, b, max_iters=250)
    full = pcg(lambda v: a @ v, b, max_iters=250, martens_tol=0.0)
    assert result.stop_reason == "martens"
    assert full.stop_reason == "max_iters" and full.iterations == 250
    # First i at which the rule can fire: i > k = 10.
    assert result.iterations == 11
    phi, i, k = result.phis, result.iterations, 10
    assert phi[i] < 0 and (phi[i] - phi[i - k]) / phi[i] < k * 5e-4
    # Stopping cost little: the model value is within 0.3 % of what 250 iterations reach.
    assert result.phis[-1] == pytest.approx(full.phis[-1], rel=3e-3)


def test_martens_rule_window_floor_is_configurable():
    # Seed 002 Algorithm 2 opens the window at the minimum number of steps t: with k = 3 the rule fires at i = 4.
    a, b = stalling_system()
    result = pcg(lambda v: a @ v, b, min_iters=3, martens_gap=3)
    assert (result.stop_reason, result.iterations) == ("martens", 4)


def test_martens_rule_never_stops_before_min_iters():
    a, b = stalling_system()
    result = pcg(lambda v: a @ v, b, min_iters=30, max_iters=250)
    assert (result.stop_reason, result.iterations) == ("martens", 30)


def test_max_iters_is_respected():
    a, b = spd(), rhs()
    result = pcg(lambda v: a @ v, b, martens_tol=0.0, max_iters=7)
    assert (result.stop_reason, result.iterations, len(result.phis)) == ("max_iters", 7, 8)


def test_negative_curvature_returns_last_good_iterate():
    a = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0, -1.0], dtype=DT))
    b = torch.ones(5, dtype=DT)
    result = pcg(lambda v: a @ v, b, martens_tol=0.0, max_iters=50)
    assert result.stop_reason == "negative_curvature"
    assert 1 <= result.iterations < 5
    assert len(result.phis) == result.iterations + 1
    assert result.phis[-1] == pytest.approx(q_of(a, b, result.x), rel=1e-12)
    assert result.residual_norm == pytest.approx(float((a @ result.x - b).norm()), rel=1e-10)
    assert result.iterates[-1][0] == result.iterations and torch.equal(result.iterates[-1][1], result.x)
    # The very first direction (b) has negative curvature: nothing is done and x0 comes back.
    flipped = pcg(lambda v: -(a @ v), b)
    assert (flipped.stop_reason, flipped.iterations) == ("negative_curvature", 0)
    assert torch.equal(flipped.x, torch.zeros(5, dtype=DT))


def test_phis_are_the_model_values_of_the_iterates():
    a, m = badly_scaled()
    b = rhs()
    x0 = rhs(seed=7)
    result = pcg(lambda v: a @ v, b, x0=x0, precond=m, martens_tol=0.0, max_iters=40)
    assert len(result.iterates) == 9
    for i, x in result.iterates:
        assert result.phis[i] == pytest.approx(q_of(a, b, x), rel=1e-10)
    assert result.model_decrease == pytest.approx(q_of(a, b, result.x) - q_of(a, b, x0), rel=1e-10)
    assert result.model_decrease < 0


def test_stored_iterates_follow_ceil_5_times_1_3_to_the_j_and_include_the_last():
    a, b = spd(), rhs()
    result = pcg(lambda v: a @ v, b, martens_tol=0.0, max_iters=40)
    expected = sorted({math.ceil(5 * 1.3**j) for j in range(8)} | {40})
    assert [i for i, _ in result.iterates] == expected == [5, 7, 9, 11, 15, 19, 25, 32, 40]
    assert torch.equal(result.iterates[-1][1], result.x)
    # Stored iterates are distinct snapshots: the 5th iterate solves less of the system than the last.
    assert (a @ result.iterates[0][1] - b).norm() > (a @ result.x - b).norm()
    last_only = pcg(lambda v: a @ v, b, martens_tol=0.0, max_iters=40, store_iterates=False)
    assert [i for i, _ in last_only.iterates] == [40]


def test_backtracking_walks_back_to_the_best_stored_iterate():
    iterates = [(i, torch.full((2,), float(i), dtype=DT)) for i in (5, 7, 9, 11, 15, 19)]
    calls = []

    def loss_at(x: torch.Tensor) -> torch.Tensor:
        calls.append(int(x[0]))
        return (x[0] - 8.5) ** 2

    index, x, loss = cg_backtrack(iterates, loss_at)
    assert index == 9 and torch.equal(x, iterates[2][1]) and float(loss) == 0.25
    assert calls == [19, 15, 11, 9, 7]  # stops at the first iterate that does not improve

    # The last iterate is best: one evaluation past it, then stop.
    calls.clear()
    index, _, loss = cg_backtrack(iterates, lambda x: (calls.append(1), (x[0] - 30.0) ** 2)[1])
    assert (index, float(loss), len(calls)) == (19, 121.0, 2)

    # Non-finite losses never win: walk past them to a finite one.
    index, _, loss = cg_backtrack(iterates, lambda x: torch.tensor(math.nan) if x[0] > 10 else -x[0])
    assert (index, float(loss)) == (9, -9.0)


def test_bad_arguments_raise():
    a, b = spd(), rhs()
    with pytest.raises(ValueError, match="min_iters"):
        pcg(lambda v: a @ v, b, min_iters=10, max_iters=5)
    with pytest.raises(ValueError, match="martens_tol"):
        pcg(lambda v: a @ v, b, martens_tol=-1.0)
    with pytest.raises(ValueError, match="at least one stored iterate"):
        cg_backtrack([], lambda x: x.sum())


# ---------------------------------------------------------------------------------------------------- seed 000's CG
def indefinite(n: int = 8, seed: int = 3) -> torch.Tensor:
    """Q diag(-3, -2, -1, 1, 2, 3, 4, 5) Q^T: symmetric, non-singular, with three negative eigenvalues."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DT))
    return q @ torch.diag(torch.tensor([-3.0, -2, -1, 1, 2, 3, 4, 5], dtype=DT)) @ q.T


def seed000_cg(a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, iterations: int) -> tuple[torch.Tensor, int]:
    """Seed 000 Algorithm 3 written out (residual r = b - A x, no curvature test); also counts p^T A p < 0."""
    r = b - a @ x
    p, negatives = r.clone(), 0
    for _ in range(iterations):
        pap = p @ a @ p
        negatives += int(pap < 0)
        alpha = (r @ r) / pap
        x, r_new = x + alpha * p, r - alpha * (a @ p)
        p, r = r_new + (r_new @ r_new) / (r @ r) * p, r_new
    return x, negatives


def test_continue_through_negative_curvature_is_seed000_algorithm3_and_solves_the_system():
    a, b = indefinite(), rhs(8)
    for k in (1, 2, 3, 5):   # iterate by iterate, the same points as the algorithm written out
        result = pcg(lambda v: a @ v, b, martens_tol=0.0, max_iters=k, negative_curvature="continue")
        expected, negatives = seed000_cg(a, b, torch.zeros(8, dtype=DT), k)
        assert (result.iterations, result.negative_directions) == (k, negatives)
        assert rel_err(result.x, expected) < 1e-10
    full = pcg(lambda v: a @ v, b, martens_tol=0.0, tol=1e-12, max_iters=50, negative_curvature="continue")
    assert full.stop_reason == "tolerance" and full.negative_directions >= 1
    assert rel_err(full.x, torch.linalg.solve(a, b)) < 1e-9  # the indefinite system's solution, not a truncation
    assert full.phis[-1] == pytest.approx(q_of(a, b, full.x), rel=1e-9)
    # The default stops at the first direction of negative curvature, short of the solution.
    stopped = pcg(lambda v: a @ v, b, martens_tol=0.0, tol=1e-12, max_iters=50)
    assert stopped.stop_reason == "negative_curvature" and stopped.iterations < full.iterations
    assert rel_err(stopped.x, torch.linalg.solve(a, b)) > 0.1
    # Warm start (seed 000 sec. 14.3 starts from w/|w|): the same points as the algorithm from that x0.
    x0 = rhs(8, seed=9)
    warm = pcg(lambda v: a @ v, b, x0=x0, martens_tol=0.0, max_iters=3, negative_curvature="continue")
    assert rel_err(warm.x, seed000_cg(a, b, x0, 3)[0]) < 1e-10


def test_continue_stops_only_at_zero_curvature_breakdown():
    a = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=DT)   # b^T A b = 0: alpha is undefined at once
    b = torch.tensor([1.0, 0.0], dtype=DT)
    result = pcg(lambda v: a @ v, b, martens_tol=0.0, negative_curvature="continue")
    assert (result.stop_reason, result.iterations) == ("breakdown", 0) and torch.equal(result.x, torch.zeros(2, dtype=DT))
    assert pcg(lambda v: a @ v, b, martens_tol=0.0).stop_reason == "negative_curvature"
    with pytest.raises(ValueError, match="negative_curvature"):
        pcg(lambda v: a @ v, b, negative_curvature="maybe")

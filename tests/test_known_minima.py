"""Every optimiser reaches the deterministic Rosenbrock minimum (1, 1) (seed 003 eq. 19 with l1 = l2 = 1) from the
textbook start (-1.2, 1) within a stated number of steps, in float64 and in float32, and the minimiser of a convex
quadratic (zero-residual linear least squares) in both dtypes.

The methods, their settings and their measured step counts come from the one registry (tests/registry.py,
``Method.minima``); the budgets are the measured counts (CPU, this code) with ~25 % slack. Seed 003 Table 1 reports,
for its own start and tolerance, SGD+momentum 370, Adam 799, LM 16, BFGS 19, exact Hessian 14 and CurveBall 13
iterations. Print the counts with
``python -c 'import sys; sys.path[:0] = ["tests"]; from test_known_minima import measure; measure()'``.
"""
import pytest
import torch

from conftest import least_squares
from models.problems import build_rosenbrock
from optimizers import Objective
from tests.registry import METHODS, factory, seed_draws

TOL = 1e-4  # distance to (1, 1)
QUADRATIC_TOL = {torch.float64: 1e-5, torch.float32: 1e-3}  # max |w - w*|; L-BFGS's default tolerances stop near 1e-6
DTYPES = {"float64": torch.float64, "float32": torch.float32}
QUADRATIC = list(METHODS)
ROSENBROCK = [name for name, method in METHODS.items() if method.minima.rosenbrock is not None]


def steps_until(factory, model: torch.nn.Module, loss: str, x: torch.Tensor, y: torch.Tensor, reached,
                limit: int, total_steps: int | None = None) -> int | None:
    """Steps of ``factory``'s optimiser on (model, loss, x, y) until ``reached()`` at its eval point (the iterate
    itself but for Schedule-Free's average), or None after ``limit`` steps. ``total_steps``: the schedule's length."""
    assert all(p.dtype == x.dtype for p in model.parameters())  # the dtype the test asks for
    opt = factory(model.parameters())
    if total_steps is not None:
        opt.configure(total_steps=total_steps)
    for step in range(limit + 1):
        with opt.eval_point():
            if reached():
                return step
        opt.step(Objective(model, loss, x, y))
    return None


def steps_to_minimum(factory, budget: int, dtype: torch.dtype = torch.float64, tol: float = TOL,
                     total_steps: int | None = None) -> int | None:
    seed_draws(0)  # methods that draw random numbers in their steps (PSGD) draw the same ones every time
    model = build_rosenbrock((1,), 2).to(dtype)
    x, y = torch.ones(1, 1, dtype=dtype), torch.zeros(1, 2, dtype=dtype)
    return steps_until(factory, model, "sse", x, y, lambda: (model.xy.detach() - 1).norm() < tol, budget,
                       total_steps)


def budget(measured: int) -> int:
    return int(1.25 * measured) + 2


def minimiser_factory(name: str):
    return factory(name, **METHODS[name].minima.options)


def steps_to_quadratic_minimiser(name: str, dtype: torch.dtype, limit: int) -> int | None:
    x, y, w_star = least_squares(n=6, m=32, dtype=dtype)
    seed_draws(0)
    model = torch.nn.Linear(6, 1, bias=False).to(dtype)
    return steps_until(minimiser_factory(name), model, "mse", x, y,
                       lambda: (model.weight.detach() - w_star).abs().max() < QUADRATIC_TOL[dtype], limit,
                       METHODS[name].minima.total_steps)


def steps_to_rosenbrock_minimum(name: str, dtype: torch.dtype, limit: int) -> int | None:
    return steps_to_minimum(minimiser_factory(name), limit, dtype=dtype, tol=TOL if dtype == torch.float64 else 1e-3,
                            total_steps=METHODS[name].minima.total_steps)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", QUADRATIC)
def test_reaches_the_minimiser_of_a_convex_quadratic(name, dtype):
    limit = budget(METHODS[name].minima.quadratic[list(DTYPES).index(dtype)])
    steps = steps_to_quadratic_minimiser(name, DTYPES[dtype], limit)
    assert steps is not None, f"{name} did not reach the minimiser within {limit} steps in {dtype}"
    assert steps > 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ROSENBROCK)
def test_reaches_rosenbrock_minimum(name, dtype):
    limit = budget(METHODS[name].minima.rosenbrock[list(DTYPES).index(dtype)])
    steps = steps_to_rosenbrock_minimum(name, DTYPES[dtype], limit)  # float64 asks 1e-4, float32 1e-3
    assert steps is not None, f"{name} did not reach (1, 1) within {limit} steps in {dtype}"
    assert steps > 0


def measure(limit: int = 5000, names=None) -> None:
    """Print every method's step counts (or those of ``names``), in the registry's order: quadratic (float64,
    float32), Rosenbrock (same)."""
    for name in names or METHODS:
        quadratic = tuple(steps_to_quadratic_minimiser(name, dtype, limit) for dtype in DTYPES.values())
        rosenbrock = (tuple(steps_to_rosenbrock_minimum(name, dtype, limit) for dtype in DTYPES.values())
                      if name in ROSENBROCK else None)
        print(f"{name}: quadratic={quadratic}, rosenbrock={rosenbrock}")

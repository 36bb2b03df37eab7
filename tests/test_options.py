"""Hyperparameters: one Options record per method, its YAML file in step with it, and one message format for bad input.

Every key a method accepts is a field of ``Method.Options`` (validated once); every YAML file in conf/optimizer/
lists exactly those fields at their defaults (newton_cg overrides only ``solver``); a bad value or an unknown key is
an OptionError naming the key as the user types it. The choices and classes come from the one registry
(tests/registry.py), so a new method is checked here without editing this file.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from optimizers import LBFGS, NLCG, SGD, Adam, CurveBall, GradientDescent, HessianFree, Newton, Optimizer, OptionError
from tests import registry
from validation import checks

CONF = Path(__file__).resolve().parents[1] / "conf"
METHODS = registry.library_classes()
CONFIG_OVERRIDES = {"newton_cg": {"solver": "cg"}}  # what a config file deliberately changes from the class default
# A ready config of the torch_optim adapter (soap, adahessian, ...) deliberately names its class and that class's
# learning rate, options and backward mode (issue 10); its other keys stay at the adapter's defaults.
ADAPTER_CHOICES = ("cls", "lr", "options", "backward")


def params():
    return nn.Linear(3, 2).parameters()


@pytest.mark.parametrize("name", registry.choices())
def test_each_config_lists_exactly_the_options_at_their_defaults(name):
    cls, node = registry.method_class(name), registry.options(name)
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    assert set(node) == set(fields), f"{name}.yaml and {cls.__name__}.Options differ: {set(node) ^ set(fields)}"
    defaults = dataclasses.asdict(cls.Options())
    expected = {**defaults, **CONFIG_OVERRIDES.get(name, {})}
    if registry.is_adapter_choice(name) and name != "torch_optim":
        expected |= {key: node[key] for key in ADAPTER_CHOICES}
    for key in node:
        assert node[key] == expected[key], f"{name}.{key}: yaml {node[key]!r} vs Options {expected[key]!r}"
    assert isinstance(registry.make(name, params()), cls)


def test_every_choice_is_registered():
    """A library method's choice has its test settings in tests/registry.py (an adapter choice needs none), and every
    method the library exports has a choice."""
    unregistered = [n for n in registry.choices() if not registry.is_adapter_choice(n) and n not in registry.METHODS]
    assert not unregistered, f"add {unregistered} to tests/registry.py METHODS (what the generic tests need to know)"
    assert set(registry.METHODS) <= set(registry.choices())
    import optimizers

    exported = {cls for cls in (getattr(optimizers, n) for n in optimizers.__all__)
                if isinstance(cls, type) and issubclass(cls, Optimizer)} - {Optimizer, optimizers.TorchAdapter}
    assert exported <= set(METHODS), f"{exported - set(METHODS)} have no conf/optimizer choice"


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.__name__)
def test_every_numeric_option_rejects_nan_and_text_naming_the_key(cls):
    for f in dataclasses.fields(cls.Options):
        default = getattr(cls.Options(), f.name)
        if isinstance(default, bool) or not isinstance(default, (int, float)):
            continue
        for bad in (math.nan, math.inf, "abc", True):
            shown = {True: "True", "abc": "abc"}.get(bad, str(bad))
            with pytest.raises(OptionError, match=rf"^optimizer\.{f.name}={shown} must be "):
                cls(params(), **{f.name: bad})


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.__name__)
def test_an_unknown_key_lists_the_valid_ones(cls):
    with pytest.raises(OptionError, match=rf"optimizer\.lrr is not an option of {cls.__name__}\. Valid keys: "
                                          r"weight_decay, "):
        cls(params(), lrr=0.1)


@pytest.mark.parametrize("cls, kwargs, match", [
    (HessianFree, dict(curvature="fisher"), r"optimizer\.curvature=fisher is not one of: ggn, hessian\."),
    (HessianFree, dict(damping_factor=0.5), r"optimizer\.damping_factor=0\.5 must be a finite number >= 1\."),
    (HessianFree, dict(damping=1e9), r"optimizer\.damping=1000000000\.0 \(the initial lambda\) must lie in"),
    (HessianFree, dict(min_damping=2.0, max_damping=1.0), r"optimizer\.min_damping=2\.0 must not exceed"),
    (HessianFree, dict(precond_exponent=1.5), r"optimizer\.precond_exponent=1\.5 must lie in \(0, 1\]"),
    (HessianFree, dict(cg_min_iters=300), r"optimizer\.cg_min_iters=300 must not exceed optimizer\.cg_max_iters=250"),
    (HessianFree, dict(cg_gap=0), r"optimizer\.cg_gap=0 must be an integer >= 1"),
    (HessianFree, dict(ls_shrink=1.0), r"optimizer\.ls_shrink=1\.0 must lie in \(0, 1\)"),
    (HessianFree, dict(cg_max_iters=2.5), r"optimizer\.cg_max_iters=2\.5 must be an integer >= 1"),
    (HessianFree, dict(weight_decay=-1e-4), r"optimizer\.weight_decay=-0\.0001 must be a finite number >= 0"),
    (CurveBall, dict(damping=-1.0), r"optimizer\.damping=-1\.0 must be a finite number >= 0"),
    (CurveBall, dict(lambda_decay=1.0), r"optimizer\.lambda_decay=1\.0 must lie in \(0, 1\)"),
    (CurveBall, dict(lambda_every=0), r"optimizer\.lambda_every=0 must be an integer >= 1"),
    (CurveBall, dict(jdz_method="magic"), r"optimizer\.jdz_method=magic is not one of: auto, double_backward"),
    (Newton, dict(solver="lu"), r"optimizer\.solver=lu is not one of: explicit, cg"),
    (Newton, dict(descent_threshold=0.5), r"optimizer\.descent_threshold=0\.5 must be a finite number <= 0"),
    (Newton, dict(cg_init="random"), r"optimizer\.cg_init=random is not one of: zero, weights"),
    (GradientDescent, dict(step_size="exact"), r"optimizer\.step_size=exact is not one of: fixed, armijo"),
    (NLCG, dict(ls_c=0.5, ls_c2=0.4), r"optimizer\.ls_c2=0\.4 must exceed optimizer\.ls_c=0\.5"),
    (NLCG, dict(beta_rule="dy"), r"optimizer\.beta_rule=dy is not one of: pr, fr, hs"),
    (LBFGS, dict(line_search="wolfe"), r"optimizer\.line_search=wolfe is not one of: strong_wolfe, none"),
    (LBFGS, dict(history_size=0), r"optimizer\.history_size=0 must be an integer >= 1"),
    (SGD, dict(momentum=-1), r"optimizer\.momentum=-1 must lie in \[0, 1\]"),
    (SGD, dict(nesterov=True, momentum=0.0), r"optimizer\.nesterov=True needs optimizer\.momentum > 0"),
    (Adam, dict(betas=[0.9]), r"optimizer\.betas=\[0\.9\] must be a list of 2 items"),
    (Adam, dict(betas=[0.9, 1.0]), r"optimizer\.betas\[1\]=1\.0 must lie in \[0, 1\)"),
])
def test_bad_values_give_one_message_naming_the_key(cls, kwargs, match):
    with pytest.raises(OptionError, match=match):
        cls(params(), **kwargs)


def test_newton_explicit_refuses_large_models():
    message = r"optimizer\.solver=explicit \(optimizer=newton\) builds the dense 110 x 110 Hessian"
    with pytest.raises(OptionError, match=message):
        Newton(nn.Linear(10, 10).parameters(), solver="explicit", max_explicit_params=100)


def test_options_are_frozen_and_validated_once():
    opt = HessianFree(params(), damping=3)
    assert opt.options.damping == 3.0 and isinstance(opt.options.damping, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opt.options.damping = 1.0  # type: ignore[misc]


def test_check_call_reports_builder_arguments_by_key():
    def build(input_shape, num_outputs, hidden: list[int] = (128,), activation: str = "relu", p: float | None = None):
        return None

    supplied = ("input_shape", "num_outputs")
    assert checks.check_call("model", build, {"hidden": [3, 4]}, supplied=supplied) == {"hidden": [3, 4]}
    for kwargs, match in [({"hidden": "abc"}, r"model\.hidden=abc must be a list of integers"),
                          ({"hidden": [1, 2.5]}, r"model\.hidden=\[1,2\.5\] must be a list of integers"),
                          ({"p": math.nan}, r"model\.p=nan must be a finite number or null"),
                          ({"hiden": [1]}, r"model\.hiden is not an option of model 'test_check_call.*Valid keys: "
                                           r"hidden, activation, p")]:
        with pytest.raises(OptionError, match=match):
            checks.check_call("model", build, kwargs, supplied=supplied)


@pytest.mark.parametrize("name", registry.METHODS)
def test_weight_decay_reaches_the_ridge_minimiser(name):
    """Weight decay is one mechanism for every method (F = L + eta/2 |w|^2 through the shared wrapper): each method
    reaches the closed-form ridge-regression minimiser, solved here with torch.linalg."""
    from optimizers import Objective

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 3, generator=g, dtype=torch.float64), torch.randn(40, 2, generator=g, dtype=torch.float64)
    eta, n, o = 0.3, 40, 2
    a = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], dim=1)               # (n, 4)
    theta = torch.linalg.solve(2 / (n * o) * a.T @ a + eta * torch.eye(4, dtype=torch.float64),
                               2 / (n * o) * a.T @ y)                              # (4, 2): [W^T; b]
    torch.manual_seed(1)
    model = nn.Linear(3, 2).double()
    kwargs, steps = registry.METHODS[name].ridge
    opt = registry.make(name, model.parameters(), weight_decay=eta, **kwargs)
    opt.configure(total_steps=steps)  # a decaying schedule in the options spans the steps
    for _ in range(steps):
        stats = opt.step(Objective(model, "mse", x, y))
    with opt.eval_point():  # the point the method returns (Schedule-Free: its average)
        got = torch.cat([model.weight.detach().T, model.bias.detach()[None]])
    assert torch.allclose(got, theta, rtol=0, atol=1e-6), (got - theta).abs().max()
    # the logged loss is the data loss L, not F (Schedule-Free's: at y, the point it took the gradient at)
    assert float(stats["loss"]) == pytest.approx(((model(x) - y) ** 2).mean().item(), rel=1e-2)

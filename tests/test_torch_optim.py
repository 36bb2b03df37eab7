"""The torch_optim adapter: any torch.optim.Optimizer through the step contract.

* torch's SGD through the adapter is bit-identical to the built-in ``optimizers.first_order.SGD`` (momentum, Nesterov,
  weight decay, cosine schedule);
* torch's L-BFGS with a closure reaches scipy's L-BFGS-B minimum of an L2-regularised logistic regression (the L2 from
  the library's weight-decay wrapper, seen by every closure evaluation);
* AdaHessian's Hutchinson estimate read through the create_graph backward equals the exact Hessian diagonal of a
  diagonal quadratic (torch.autograd.functional.hessian);
* every adapter choice (conf/optimizer/*.yaml with the adapter as _target_, from tests/registry.py) trains MNIST for a
  few real steps through the runner; heavyball compiled with torch.compile is marked slow (it compiles for 1-2 minutes on the CPU);
* state dicts round trip bit for bit through torch.load(weights_only=True), heavyball's SOAP included (also through a
  resumed run); bad classes and options are one-paragraph errors naming optimizer.cls / optimizer.options.<key>;
* a missing optional package (hidden from a real run.py) exits 2 naming the extra to install.
"""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from torch import nn

from validation.checks import OptionError
from optimizers.first_order import SGD
from optimizers.objective import Objective
from optimizers.torch_optim import TorchOptim
from tests import registry

REPO = Path(__file__).resolve().parents[1]
DATA = os.environ.get("CURVLAB_DATA")
F64 = torch.float64
EXTERNAL = registry.adapter_choices()  # torch_optim, soap, shampoo, psgd, adahessian, sophia, heavyball_soap, ...


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def batches(n=6, b=16):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(b, 6, generator=g), torch.randint(0, 3, (b,), generator=g)) for _ in range(n)]


@pytest.fixture
def eager_heavyball():
    """heavyball without torch.compile (its kernels run eagerly); restored afterwards."""
    utils = pytest.importorskip("heavyball.utils", reason="heavyball needs Python >= 3.11 (the optimizers extra)")
    saved = utils.compile_mode
    utils.compile_mode = None
    yield
    utils.compile_mode = saved


# ---------------------------------------------------------------- torch's SGD = the built-in SGD, bit for bit


@pytest.mark.parametrize("case", ["momentum", "nesterov_torch_decay", "library_decay", "cosine"])
def test_torch_sgd_through_the_adapter_is_bit_identical_to_the_builtin(case):
    builtin_extra, adapter_extra, options = {}, {}, {"momentum": 0.9}
    if case == "nesterov_torch_decay":  # torch's own coupled decay against the library's: the same arithmetic
        builtin_extra = {"nesterov": True, "weight_decay": 1e-3}
        options.update(nesterov=True, weight_decay=1e-3)
    elif case == "library_decay":  # the library's L2 (wrapper) on both sides
        builtin_extra, adapter_extra = {"weight_decay": 1e-3}, {"weight_decay": 1e-3}
    elif case == "cosine":
        builtin_extra, adapter_extra = {"schedule": "cosine"}, {"schedule": "cosine"}
    a, b = mlp(), mlp()
    builtin = SGD(a.parameters(), lr=0.05, momentum=0.9, **builtin_extra)
    adapter = TorchOptim(b.parameters(), cls="torch.optim.SGD", lr=0.05, options=options, **adapter_extra)
    for opt in (builtin, adapter):
        opt.configure(total_steps=6)
    for x, y in batches():
        s1, s2 = builtin.step(Objective(a, "cross_entropy", x, y)), adapter.step(Objective(b, "cross_entropy", x, y))
        assert torch.equal(s1["loss"], s2["loss"]) and s1["lr"] == s2["lr"]
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


# ---------------------------------------------------------------- L-BFGS with a closure


def test_lbfgs_with_a_closure_reaches_scipys_regularised_logistic_regression_minimum():
    from scipy.optimize import minimize

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g, dtype=F64)
    y = (x @ torch.tensor([1.5, -2.0, 0.5], dtype=F64) + 0.3 * torch.randn(200, generator=g, dtype=F64) > 0).long()
    eta = 0.01
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(F64)
    # max_iter=20 per step: torch's L-BFGS with max_iter=1 can stall on a failed line search (t = 0) near the
    # minimum, through this adapter and with a hand-written closure alike.
    opt = TorchOptim(model.parameters(), cls="torch.optim.LBFGS", weight_decay=eta,
                     lr=1.0, options={"max_iter": 20, "history_size": 10, "line_search_fn": "strong_wolfe"})
    assert opt.mode == "closure"  # auto: torch.optim.LBFGS.step requires a closure
    evals = []
    for _ in range(5):
        stats = opt.step(Objective(model, "cross_entropy", x, y))
        evals.append(stats["closure_evals"])
    w = torch.cat([model.weight.reshape(-1), model.bias]).detach().numpy()

    def objective(v):
        v = torch.tensor(v, dtype=F64, requires_grad=True)
        loss = F.cross_entropy(x @ v[:6].reshape(2, 3).T + v[6:], y) + 0.5 * eta * v.dot(v)
        loss.backward()
        return loss.item(), v.grad.numpy()

    reference = minimize(objective, torch.zeros(8, dtype=F64).numpy(), jac=True, method="L-BFGS-B",
                         options={"gtol": 1e-12, "ftol": 1e-15})
    assert objective(w)[0] == pytest.approx(reference.fun, abs=1e-9)  # measured: 1.4e-11
    assert abs(w - reference.x).max() < 1e-4
    assert max(evals) > 1  # the line search re-evaluated the batch through the closure


# ---------------------------------------------------------------- a Hessian-diagonal method: create_graph


class DiagonalQuadratic(nn.Module):
    """f(w) = sqrt(d) * w, so the sse loss sum_i d_i w_i^2 has the diagonal Hessian 2 diag(d)."""

    def __init__(self, d):
        super().__init__()
        self.d, self.w = d, nn.Parameter(torch.ones(len(d), dtype=F64))

    def forward(self, x):
        return (self.w * self.d.sqrt()).expand(x.shape[0], -1)


def test_adahessian_reads_the_exact_hessian_diagonal_through_create_graph():
    pytest.importorskip("pytorch_optimizer")
    d = torch.tensor([1.0, 4.0, 9.0, 0.5], dtype=F64)
    model = DiagonalQuadratic(d)
    opt = TorchOptim(model.parameters(), cls="pytorch_optimizer.AdaHessian", lr=0.1)
    assert opt.mode == "create_graph"  # auto: the class documents backward(create_graph=True)
    x, y = torch.zeros(1, 1, dtype=F64), torch.zeros(1, 4, dtype=F64)
    exact = torch.autograd.functional.hessian(lambda w: ((w * d.sqrt()) ** 2).sum(), torch.ones(4, dtype=F64))
    opt.step(Objective(model, "sse", x, y))
    # Hutchinson with Rademacher probes is exact for a diagonal Hessian: z * (H z) = diag(H)
    torch.testing.assert_close(opt.inner.state[model.w]["hessian"], torch.diagonal(exact), rtol=0, atol=1e-12)
    assert model.w.grad is None  # the graph held by p.grad is released after the step


def test_a_hessian_diagonal_method_trains_for_a_few_steps():
    pytest.importorskip("pytorch_optimizer")
    model = mlp()
    opt = TorchOptim(model.parameters(), cls="pytorch_optimizer.SophiaH", lr=1.0, options={"update_period": 1})
    x, y = batches(1, 64)[0]
    losses = [float(opt.step(Objective(model, "cross_entropy", x, y))["loss"]) for _ in range(8)]
    assert losses[-1] < losses[0] - 0.05, losses  # measured: 1.192 -> 1.087 (Sophia clips every coordinate's step)


# ---------------------------------------------------------------- every external config, real MNIST steps


def config(*overrides):
    from runner.schema import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=["device=cpu", "threads=1", "trainer.progress=false",
                                            "trainer.checkpoint=false", *overrides])


@pytest.mark.skipif(not DATA, reason="CURVLAB_DATA is not set (folder holding MNIST/raw)")
@pytest.mark.parametrize("name", sorted(EXTERNAL))
def test_external_config_trains_mnist_for_a_few_real_steps(name, tmp_path, eager_heavyball):
    from runner.metrics import read_jsonl
    from runner.train import train

    cfg = config(f"optimizer={name}", "dataset=mnist", "model=mlp", "model.hidden=[32]", "trainer.max_steps=6",
                 "trainer.max_epochs=null", "trainer.batch_size=128", "trainer.eval_every=1")
    result = train(cfg, tmp_path)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert result.status == "ok" and [r["step"] for r in rows] == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows) and "lr" in rows[0]
    assert rows[-1]["eval/loss"] < rows[0]["eval/loss"], [r["eval/loss"] for r in rows]  # test loss went down


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                    reason="heavyball compiles its kernels with torch.compile: needs a C++ compiler on the CPU")
def test_heavyball_compiled_with_torch_compile_takes_real_steps():
    pytest.importorskip("heavyball", reason="heavyball needs Python >= 3.11 (the optimizers extra)")
    model = mlp()
    opt = TorchOptim(model.parameters(), cls="heavyball.SOAP", lr=0.01)
    x, y = batches(1, 64)[0]
    losses = [float(opt.step(Objective(model, "cross_entropy", x, y))["loss"]) for _ in range(4)]
    assert losses[-1] < losses[0], losses


# ---------------------------------------------------------------- state, schedules, errors


@pytest.mark.parametrize("cls", ["pytorch_optimizer.SOAP", "pytorch_optimizer.Kron", "heavyball.SOAP",
                                 "torch.optim.LBFGS"])
def test_state_dict_round_trips_bit_for_bit(cls, eager_heavyball):
    pytest.importorskip(cls.split(".")[0])
    data = batches(7)

    def run(opt, model, chunk):
        for x, y in chunk:
            opt.step(Objective(model, "cross_entropy", x, y))

    model = mlp()
    opt = TorchOptim(model.parameters(), cls=cls, lr=0.01)
    run(opt, model, data[:3])
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": torch.get_rng_state()}, buffer)
    run(opt, model, data[3:])
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = mlp(seed=5)
    resumed.load_state_dict(saved["model"])
    opt2 = TorchOptim(resumed.parameters(), cls=cls, lr=0.01)
    opt2.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"])  # Kron updates its preconditioner with a random probability
    run(opt2, resumed, data[3:])
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)


def test_a_step_schedule_scales_every_parameter_group():
    model = mlp()
    opt = TorchOptim(model.parameters(), cls="torch.optim.Adam", lr=0.01, schedule="step",
                     milestones=[0.5], gamma=0.1)
    opt.configure(total_steps=4)
    lrs = [opt.step(Objective(model, "cross_entropy", x, y))["lr"] for x, y in batches(4)]
    assert lrs == pytest.approx([0.01, 0.01, 0.001, 0.001])
    assert opt.inner.param_groups[0]["lr"] == pytest.approx(0.001)


@pytest.mark.parametrize("options, message", [
    ({"cls": "torch.optim.Nope"}, r"optimizer\.cls=torch\.optim\.Nope cannot be imported \(AttributeError"),
    ({"cls": "no_such_package.Opt"}, r"optimizer\.cls=no_such_package\.Opt cannot be imported \(ModuleNotFoundError"),
    ({"cls": "torch.nn.Linear"}, r"optimizer\.cls=torch\.nn\.Linear is not a torch\.optim\.Optimizer subclass\."),
    ({"cls": "SGD"}, r"optimizer\.cls=SGD must be the import path of a torch\.optim\.Optimizer subclass"),
    ({"cls": "torch.optim.Adam", "options": {"betaz": [0.9, 0.99]}},
     r"optimizer\.options\.betaz is not an argument of torch\.optim\.Adam\. Valid keys: betas, eps"),
    ({"cls": "pytorch_optimizer.SOAP", "options": {"beta": 0.1}},
     r"optimizer\.options\.beta is not an argument of pytorch_optimizer\.SOAP \(it also takes \*\*kwargs: set "
     r"optimizer\.check_options=false"),
    ({"cls": "torch.optim.SGD", "options": {"momentum": -1.0}},
     r"torch\.optim\.SGD rejected optimizer\.lr=0\.1 with optimizer\.options=\{momentum: -1\.0\}: Invalid momentum"),
    ({"options": {"lr": 0.1}}, r"optimizer\.options\.lr=0\.1 is not used: the learning rate is optimizer\.lr"),
    ({"cls": "torch.optim.SGD", "options": {"nesterov": "yes"}}, r"optimizer\.options\.nesterov=yes must be true or false"),
    ({"backward": "double"}, r"optimizer\.backward=double is not one of: auto, plain, closure, create_graph\."),
    ({"options": [1, 2]}, r"optimizer\.options=\[1,2\] must be a mapping of keyword arguments"),
    ({"rate": 0.1}, r"optimizer\.rate is not an option of TorchOptim\. Valid keys: weight_decay, lr, schedule"),
])
def test_bad_classes_and_options_name_the_key(options, message):
    with pytest.raises(OptionError, match=message):
        TorchOptim(mlp().parameters(), **options)


def test_run_py_reports_a_bad_class_in_one_paragraph(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CURVLAB_DEBUG"}
    done = subprocess.run([sys.executable, str(REPO / "run.py"), "optimizer=torch_optim",
                           "optimizer.cls=heavyball.NoSuchOptimizer", f"hydra.run.dir={tmp_path}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "optimizer.cls=heavyball.NoSuchOptimizer cannot be imported" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_heavyball_compiled_on_cuda_takes_real_steps():
    """heavyball's default path on a GPU: torch.compile with triton kernels."""
    pytest.importorskip("heavyball", reason="heavyball needs Python >= 3.11 (the optimizers extra)")
    model = mlp().cuda()
    opt = TorchOptim(model.parameters(), cls="heavyball.SOAP", lr=0.01)
    x, y = (t.cuda() for t in batches(1, 64)[0])
    losses = [float(opt.step(Objective(model, "cross_entropy", x, y))["loss"]) for _ in range(4)]
    assert losses[-1] < losses[0], losses


# ---------------------------------------------------------------- a missing optional package


@pytest.mark.parametrize("module, choice, key", [
    ("schedulefree", "schedule_free", "optimizer=schedule_free"),
    ("pytorch_optimizer", "soap", "optimizer.cls=pytorch_optimizer.SOAP"),
    ("heavyball", "heavyball_soap", "optimizer.cls=heavyball.SOAP"),
])
def test_a_missing_package_exits_2_naming_the_extra_to_install(module, choice, key, tmp_path):
    """The package is hidden from a real `python run.py` (a sitecustomize puts None into sys.modules, as if it were
    not installed): one paragraph naming the choice's key and the extra, exit code 2, no traceback."""
    from runner.errors import EXIT_USER_ERROR
    from tests.runs import env

    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(f"import sys\nsys.modules[{module!r}] = None\n")
    done = subprocess.run([sys.executable, str(REPO / "run.py"), f"optimizer={choice}", "trainer.max_steps=1",
                           "device=cpu", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path,
                          env=env(PYTHONPATH=f"{hide}{os.pathsep}{REPO}"), capture_output=True, text=True, timeout=300)
    assert done.returncode == EXIT_USER_ERROR, done.stderr
    assert f"{key} needs the {module.replace('_', '-')} package, which is not installed" in done.stderr, done.stderr
    assert 'pip install -e ".[optimizers]"' in done.stderr and "Traceback" not in done.stderr


def test_heavyball_soap_resumes_through_the_runner_bit_for_bit(tmp_path, eager_heavyball):
    """heavyball's SOAP (its kernels eager here) checkpoints since the adapter stores its sets as lists and leaves its
    pickled schedule out: a run resumed from step 9 ends as the uninterrupted one."""
    from runner.checkpoint import CHECKPOINT, load_checkpoint
    from runner.train import train
    from tests.runs import assert_same_tensors, make_config, metrics, without_times

    args = ["optimizer=heavyball_soap", "model.hidden=[16]", "trainer.batch_size=64", "trainer.max_epochs=null",
            "trainer.log_every=1", "trainer.eval_every=3", "trainer.checkpoint_every=5"]
    train(make_config(*args, "trainer.max_steps=9"), tmp_path / "first")
    resumed = train(make_config(*args, "trainer.max_steps=14", f"trainer.resume={tmp_path / 'first'}"),
                    tmp_path / "resumed")
    train(make_config(*args, "trainer.max_steps=14"), tmp_path / "reference")
    assert resumed.summary["resumed_from"]["step"] == 9
    assert without_times(metrics(tmp_path / "resumed")) == without_times(metrics(tmp_path / "reference"))
    final = [load_checkpoint(tmp_path / f / CHECKPOINT) for f in ("resumed", "reference")]
    for key in ("model", "optimizer"):
        assert_same_tensors(final[0][key], final[1][key], key)

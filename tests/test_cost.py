"""The up-front cost estimate (runner/cost.py): a long configuration warns before its first step, the default does
not, and the estimate changes no bit of the run (batch norm, dropout and the random generators included)."""

from __future__ import annotations

import logging
import os
import signal

import pytest
import torch
from hydra.utils import instantiate

from runner import cost
from runner.train import train
from tests import registry
from tests.runs import make_config, metrics, without_times


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
            and r.getMessage().startswith("expected ")]


def test_the_estimate_changes_nothing_the_run_computes(tmp_path):
    """Batch-norm statistics, dropout masks (drawn from the global generator) and the batch order: with and without
    the estimate the metrics are identical."""
    args = ["model=cifar_basic_cnn_bn", "model.dropout=0.3", "optimizer=sgd", "trainer.max_steps=4",
            "trainer.batch_size=32", "trainer.eval_every=2", "trainer.log_every=1"]
    with_estimate = train(make_config(*args), tmp_path / "with")
    without = train(make_config(*args, "trainer.estimate_cost=false"), tmp_path / "without")
    assert with_estimate.status == without.status == "ok"
    assert without_times(metrics(tmp_path / "with")) == without_times(metrics(tmp_path / "without"))


def test_the_default_run_does_not_warn(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="curvlab")
    train(make_config("trainer.max_steps=2"), tmp_path / "a")
    assert not _warnings(caplog)
    debug = [r.getMessage() for r in caplog.records if r.getMessage().startswith("expected ")]
    assert len(debug) == 1 and "one gradient per step" in debug[0] and "on a batch of 128" in debug[0]


class _Warned(logging.Handler):
    """SIGTERM to this process at the estimate's warning: the run stops before its first step."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("expected "):
            self.messages.append(record.getMessage())
            os.kill(os.getpid(), signal.SIGTERM)


def test_hf_on_resnet50_warns_before_its_first_step(tmp_path):
    """`python run.py optimizer=hf model=resnet50` (digits, ResNet-50 with the small-image stem, batch 128)."""
    handler = _Warned()
    logger = logging.getLogger("curvlab")
    logger.addHandler(handler)
    try:
        result = train(make_config("optimizer=hf", "model=resnet50"), tmp_path / "a")
    finally:
        logger.removeHandler(handler)
    assert result.status == "interrupted" and result.steps == 0
    [message] = handler.messages
    assert message.startswith("expected up to about ") and " per step on cpu (one gradient ~" in message
    assert "on a batch of 128, timed on 16 samples; HessianFree with up to optimizer.cg_max_iters=250 CG " \
           "iterations: up to ~302 gradients per step); 120 steps ~ " in message
    assert "To shorten it: " in message and "trainer.estimate_cost=false" in message


def test_the_estimate_scales_one_gradient_by_the_method_and_the_budget(monkeypatch):
    monkeypatch.setattr(cost, "gradient_seconds", lambda *args: (0.5, 16))

    class Method:
        def gradients_per_step(self):
            return 30.0, "up to 25 products: up to ~30 gradients per step"

    found = cost.estimate(None, Method(), None, None, 128, 1000, torch.device("cpu"), torch.float32)
    assert found["step_seconds"] == 15.0 and found["run_seconds"] == 15_000 and found["warn"]
    assert found["text"].startswith("expected up to about 15 s per step on cpu (one gradient ~0.5 s on a batch of "
                                    "128, timed on 16 samples; Method with up to 25 products")
    assert "; 1000 steps ~ 4.2 h." in found["text"]
    found = cost.estimate(None, Method(), None, None, 128, 10, torch.device("cpu"), torch.float32)
    assert found["warn"]  # a step over 10 s, although the run takes 2.5 min
    monkeypatch.setattr(cost, "gradient_seconds", lambda *args: (0.01, 16))
    assert not cost.estimate(None, Method(), None, None, 128, 1000, torch.device("cpu"), torch.float32)["warn"]


def test_gradient_seconds_leaves_buffers_gradients_and_random_state_alone():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.Dropout(0.5),
                                torch.nn.Linear(6, 3))
    data = type("Split", (), {"inputs": torch.randn(40, 4), "targets": torch.randint(0, 3, (40,)),
                              "__len__": lambda self: 40})()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    seconds, timed = cost.gradient_seconds(model, torch.nn.functional.cross_entropy, data, 32, torch.device("cpu"),
                                           torch.float32)
    assert seconds > 0 and timed == 16
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in model.parameters()) and torch.equal(rng, torch.get_rng_state())


@pytest.mark.parametrize("name", sorted(registry.choices()))
def test_every_method_declares_its_cost_per_step(name):
    package = registry.choices()[name].get("cls", "torch").split(".")[0]
    pytest.importorskip(package)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    count, how = instantiate(make_config(f"optimizer={name}").optimizer)(model.parameters()).gradients_per_step()
    assert count >= 1 and isinstance(how, str) and "gradient" in how

"""Schedule-Free AdamW (optimizers/schedule_free.py) and the eval point it needs (runner/state.py).

* The eval point is the package's x (its own ``eval()``), and x is the uniform average of the z iterates (the paper's
  x_{t+1} = (1 - 1/(t+1)) x_t + z_{t+1}/(t+1) for a constant rate, from the z's recorded step by step); leaving the
  eval point restores y bit for bit, so a run that evaluates every step takes the steps of one that never does.
* A state taken at the eval point (as the runner saves it: the model at x) continues bit for bit.
* Through the runner, with batch norm: evaluation and checkpoints at x with statistics recomputed there (checked
  against the mean of the first layer's outputs over the batches); evaluating does not change the training losses;
  a resumed run equals the uninterrupted one, bit for bit.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from optimizers import Objective
from runner.checkpoint import CHECKPOINT, load_checkpoint
from runner.train import train
from tests.runs import assert_same_tensors, make_config, metrics, without_times

schedulefree = pytest.importorskip("schedulefree", reason="the optimizers extra: pip install -e '.[optimizers]'")
from optimizers.schedule_free import ScheduleFreeAdamW  # noqa: E402

F64 = torch.float64


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def batches(n: int = 6, b: int = 16):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(b, 6, generator=g, dtype=F64), torch.randint(0, 3, (b,), generator=g)) for _ in range(n)]


def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_the_eval_point_is_the_packages_x_and_the_average_of_the_z_iterates():
    ours, theirs = net(), net()
    opt = ScheduleFreeAdamW(ours.parameters(), lr=0.01, betas=[0.9, 0.999])
    reference = schedulefree.AdamWScheduleFree(theirs.parameters(), lr=0.01, betas=(0.9, 0.999))
    reference.train()
    zs = []
    for x, y in batches():
        opt.step(Objective(ours, "cross_entropy", x, y))
        reference.zero_grad()
        nn.functional.cross_entropy(theirs(x), y).backward()
        reference.step()
        zs.append([opt.inner.state[p]["z"].clone() for p in ours.parameters()])
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), theirs.parameters()))  # y: the same steps
    y_before = params(ours)
    with opt.eval_point():
        x_ours = params(ours)
    reference.eval()
    for p, q, *z in zip(x_ours, theirs.parameters(), *zs):
        assert torch.equal(p, q.detach())  # the package's x
        torch.testing.assert_close(p, torch.stack(z).mean(0), rtol=0, atol=1e-14)  # constant rate: the mean of z
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), y_before))  # back at y, bit for bit


def test_evaluating_at_every_step_changes_no_step():
    quiet, busy = net(), net()
    a, b = ScheduleFreeAdamW(quiet.parameters(), lr=0.01), ScheduleFreeAdamW(busy.parameters(), lr=0.01)
    for x, y in batches():
        a.step(Objective(quiet, "cross_entropy", x, y))
        b.step(Objective(busy, "cross_entropy", x, y))
        with b.eval_point():
            busy(x)
    assert all(torch.equal(p, q) for p, q in zip(quiet.parameters(), busy.parameters()))
    # the package's own round trip, eval() then train(), does not come back to the last bit
    a.inner.eval()
    a.inner.train()
    assert not all(torch.equal(p, q) for p, q in zip(quiet.parameters(), busy.parameters()))


def test_a_state_saved_at_the_eval_point_continues_bit_for_bit():
    import io

    data = batches(8)
    model = net()
    opt = ScheduleFreeAdamW(model.parameters(), lr=0.01, weight_decay=0.01, warmup_steps=3)
    for x, y in data[:4]:
        opt.step(Objective(model, "cross_entropy", x, y))
    buffer = io.BytesIO()
    with opt.eval_point():  # as the runner saves it: the model at x, the optimiser's state (with y)
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
        x_point = params(model)
    for x, y in data[4:]:
        opt.step(Objective(model, "cross_entropy", x, y))
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert all(torch.equal(p, q) for p, q in zip(saved["model"].values(), x_point))
    resumed = net()
    resumed.load_state_dict(saved["model"])
    again = ScheduleFreeAdamW(resumed.parameters(), lr=0.01, weight_decay=0.01, warmup_steps=3)
    again.load_state_dict(saved["optimizer"])  # puts the parameters back at y
    for x, y in data[4:]:
        again.step(Objective(resumed, "cross_entropy", x, y))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))
    with opt.eval_point(), again.eval_point():
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))


# ------------------------------------------------------------------------------------------ through the runner


def bn_mlp(input_shape, num_outputs: int, hidden: list[int] = (16,), activation: str = "relu", bias: bool = True):
    """An MLP with batch norm after its first layer and dropout (whose masks the forward passes that recompute the
    statistics must not take from the run's random stream); the runner builds it from model._target_."""
    width = int(torch.tensor(input_shape).prod())
    return nn.Sequential(nn.Flatten(), nn.Linear(width, hidden[0]), nn.BatchNorm1d(hidden[0]), nn.ReLU(),
                         nn.Dropout(0.2), nn.Linear(hidden[0], num_outputs))


BN_RUN = ["optimizer=schedule_free", "optimizer.lr=0.01", "optimizer.bn_batches=4", "model.hidden=[16]",
          f"model._target_={__name__}.bn_mlp", "trainer.batch_size=64", "trainer.max_epochs=null",
          "trainer.log_every=1"]


def test_the_runner_evaluates_and_saves_x_with_batch_norm_statistics_recomputed_there(tmp_path):
    cfg = make_config(*BN_RUN, "trainer.max_steps=10", "trainer.eval_every=5")
    result = train(cfg, tmp_path / "run")
    saved = load_checkpoint(tmp_path / "run" / CHECKPOINT)
    model = bn_mlp((1, 8, 8), 10)
    model.load_state_dict(saved["model"])
    # the checkpoint's parameters are the optimiser's x: the saved y moved by the package's own eval() rule
    beta1 = 0.9
    for (name, p), y in zip(model.named_parameters(), saved["optimizer"]["train_point"]):
        z = saved["optimizer"]["inner"]["state"][list(dict(model.named_parameters())).index(name)]["z"]
        torch.testing.assert_close(p.detach(), y + (1 - 1 / beta1) * (z - y), rtol=0, atol=1e-6)
    # its batch-norm statistics: the mean over the first 4 training batches (stored order) of the first layer's
    # output means, at x, here from the data directly
    from data.digits import build_digits

    train_split = build_digits(root="", num_test=300, split_seed=0).train
    inputs = train_split.inputs[:4 * 64].float().flatten(1)
    with torch.no_grad():
        h = model[1](inputs)
    means = torch.stack([h[i * 64:(i + 1) * 64].mean(0) for i in range(4)]).mean(0)
    variances = torch.stack([h[i * 64:(i + 1) * 64].var(0) for i in range(4)]).mean(0)  # unbiased, as BN keeps
    torch.testing.assert_close(model[2].running_mean, means, rtol=0, atol=1e-5)
    torch.testing.assert_close(model[2].running_var, variances, rtol=1e-5, atol=1e-6)
    assert int(model[2].num_batches_tracked) == 4
    # and the final evaluation was made with that model
    test = build_digits(root="", num_test=300, split_seed=0).test
    model.eval()
    with torch.no_grad():
        loss = nn.functional.cross_entropy(model(test.inputs.float()), test.targets)
    assert result.summary["eval"]["eval/loss"] == pytest.approx(loss.item(), rel=1e-5)


def test_evaluation_at_x_leaves_the_training_steps_as_they_were(tmp_path):
    often = train(make_config(*BN_RUN, "trainer.max_steps=12", "trainer.eval_every=1"), tmp_path / "often")
    once = train(make_config(*BN_RUN, "trainer.max_steps=12", "trainer.eval_every=12"), tmp_path / "once")
    assert often.status == once.status == "ok"
    assert [r["loss"] for r in metrics(tmp_path / "often")] == [r["loss"] for r in metrics(tmp_path / "once")]
    final = [load_checkpoint(tmp_path / f / CHECKPOINT) for f in ("often", "once")]
    assert_same_tensors(final[0]["model"], final[1]["model"], "model")
    assert_same_tensors(final[0]["optimizer"], final[1]["optimizer"], "optimizer")


def test_a_resumed_run_with_batch_norm_equals_the_uninterrupted_one(tmp_path):
    args = [*BN_RUN, "trainer.eval_every=3", "trainer.checkpoint_every=5"]  # step 9 evaluates in both runs
    train(make_config(*args, "trainer.max_steps=9"), tmp_path / "first")  # stops after 9: its last checkpoint
    resumed = train(make_config(*args, "trainer.max_steps=20", f"trainer.resume={tmp_path / 'first'}"),
                    tmp_path / "resumed")
    reference = train(make_config(*args, "trainer.max_steps=20"), tmp_path / "reference")
    assert resumed.summary["resumed_from"]["step"] == 9 and resumed.status == reference.status == "ok"
    assert without_times(metrics(tmp_path / "resumed")) == without_times(metrics(tmp_path / "reference"))
    final = [load_checkpoint(tmp_path / f / CHECKPOINT) for f in ("resumed", "reference")]
    for key in ("model", "optimizer"):
        assert_same_tensors(final[0][key], final[1][key], key)

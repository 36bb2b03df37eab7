"""The curvature engine against ground truth: dense float64 matrices from tests/oracles.py (torch.func alone), the
closed-form H_L against autograd, and the batch policies (dropout masks, batch-norm statistics, curvature sub-batch)."""
import pytest
import torch
from torch import nn

from conftest import dense_matrices
from oracles import dense_ggn, dense_gradient, dense_hessian, dense_jacobian, flat_params, rel
from optimizers.losses import CrossEntropy, SquaredError, get_loss
from optimizers.objective import GGN_BACKENDS, HVP_BACKENDS, Objective
from optimizers.vec import flatten

TOL = 1e-10  # relative error in float64 (issue 3 sec. 5)


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.Tanh(), nn.Linear(7, 4)).double()


def tiny_bn_cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).double().train()


@pytest.mark.parametrize("ggn_backend", GGN_BACKENDS)
@pytest.mark.parametrize("hvp_backend", HVP_BACKENDS)
def test_products_equal_dense_matrices(curvature_case, ggn_backend, hvp_backend):
    """Every backend pair, every case of the shared grid, float64 and float32, against the float64 oracle."""
    c = curvature_case
    G, H = dense_matrices(c.name, c.dtype)
    obj = Objective(c.model, c.loss, c.x, c.y, ggn_backend=ggn_backend, hvp_backend=hvp_backend)
    v = torch.randn(obj.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert rel(obj.ggn_vp(v.to(c.dtype)).double(), G @ v) < c.tol
    assert rel(obj.hvp(v.to(c.dtype)).double(), H @ v) < c.tol
    assert obj.stats()["curv/ggn_products"] == 1 and obj.stats()["curv/hvp_products"] == 1


def test_gradient_jacobian_and_explicit_hessian_equal_dense(curvature_case):
    c, ref = curvature_case, curvature_case.float64()
    obj = Objective(c.model, c.loss, c.x, c.y)
    assert rel(obj.gradient().double(), dense_gradient(ref.model, ref.loss, ref.x, ref.y)) < c.tol
    v = torch.randn(obj.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    jac = dense_jacobian(ref.model, ref.x)
    assert rel(obj.jvp(v.to(c.dtype)).double().reshape(-1), jac @ v) < c.tol
    w = torch.randn(jac.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert rel(obj.vjp(w.to(c.dtype).view_as(obj.outputs())).double(), jac.T @ w) < c.tol
    assert rel(obj.hessian_matrix().double(), dense_hessian(ref.model, ref.loss, ref.x, ref.y)) < c.tol


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_gradient_shared_with_the_products_setup_is_exact(float64_case, curvature):
    c = float64_case
    obj = Objective(c.model, c.loss, c.x, c.y, ggn_backend="double_backward")
    assert rel(obj.gradient(curvature), dense_gradient(c.model, c.loss, c.x, c.y)) < 1e-14


def test_ggn_is_symmetric_psd(float64_case):
    c = float64_case
    obj = Objective(c.model, c.loss, c.x, c.y)
    G = torch.stack([obj.ggn_vp(e) for e in torch.eye(obj.numel, dtype=torch.float64)], dim=1)
    assert rel(G, G.T) < 1e-13
    assert torch.linalg.eigvalsh((G + G.T) / 2).min() > -1e-12 * G.norm()


def test_ggn_equals_hessian_for_linear_least_squares():
    # f linear in w and L quadratic: the GGN is the exact Hessian (Martens 2010 sec. 4.2)
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randn(20, 3, dtype=torch.float64)
    obj = Objective(model, "mse", x, y)
    v = torch.randn(obj.numel, dtype=torch.float64)
    assert rel(obj.ggn_vp(v), obj.hvp(v)) < 1e-13
    assert rel(obj.ggn_vp(v), dense_hessian(model, "mse", x, y) @ v) < 1e-13


@pytest.mark.parametrize("loss", [CrossEntropy(), SquaredError("mean"), SquaredError("sum")], ids=lambda l: l.name)
def test_closed_form_loss_hessian_matches_autograd(loss):
    g = torch.Generator().manual_seed(4)
    f = torch.randn(7, 5, dtype=torch.float64, generator=g)
    y = torch.randint(0, 5, (7,), generator=g) if loss.name == "cross_entropy" else torch.randn(7, 5, dtype=torch.float64, generator=g)
    full = torch.autograd.functional.hessian(lambda out: loss(out, y), f).reshape(35, 35)
    blocks = torch.block_diag(*loss.hessian_blocks(f, y))
    assert rel(blocks, full) < 1e-14
    u = torch.randn(7, 5, dtype=torch.float64, generator=g)
    assert rel(loss.hessian_vp(f, y, u).reshape(-1), full @ u.reshape(-1)) < 1e-14
    f_req = f.clone().requires_grad_(True)
    (g_auto,) = torch.autograd.grad(loss(f_req, y), f_req)
    assert rel(loss.output_grad(f, y), g_auto) < 1e-14


def test_products_reuse_one_forward_pass():
    model = tiny_mlp()
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    x, y = torch.randn(9, 12, dtype=torch.float64), torch.randint(0, 4, (9,))
    obj = Objective(model, "cross_entropy", x, y)
    obj.gradient("ggn")
    for _ in range(5):
        obj.ggn_vp(torch.randn(obj.numel, dtype=torch.float64))
    assert len(calls) == 1


def test_trial_losses_leave_batchnorm_running_stats_untouched():
    model = tiny_bn_cnn()
    x, y = torch.randn(6, 2, 8, 8, dtype=torch.float64), torch.randint(0, 5, (6,))
    obj = Objective(model, "cross_entropy", x, y, curvature_batch_size=4)
    obj.loss()  # the batch's forward updates the running statistics once, as in ordinary training
    after_forward = model[1].running_mean.clone(), model[1].num_batches_tracked.clone()
    obj.loss_at(torch.full((obj.numel,), 0.1, dtype=torch.float64))
    obj.ggn_vp(torch.ones(obj.numel, dtype=torch.float64))
    obj.hvp(torch.ones(obj.numel, dtype=torch.float64))
    assert torch.equal(model[1].running_mean, after_forward[0])
    assert torch.equal(model[1].num_batches_tracked, after_forward[1])
    assert obj.loss_at(torch.zeros(obj.numel, dtype=torch.float64)).item() == pytest.approx(obj.loss().item(), rel=1e-15)


def test_dropout_masks_are_replayed_for_trial_points_and_products():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)).double()
    x, y = torch.randn(10, 5, dtype=torch.float64), torch.randint(0, 3, (10,))
    torch.manual_seed(6)
    obj = Objective(model, "cross_entropy", x, y, ggn_backend="forward_ad", hvp_backend="forward_over_reverse")
    assert obj.loss_at(torch.zeros(obj.numel, dtype=torch.float64)).item() == obj.loss().item()
    # products taken by re-running the network (forward_ad, forward-over-reverse) see the same masks as the graph
    # (the double-backward products of a second objective whose forward drew the same masks)
    torch.manual_seed(6)
    ref = Objective(model, "cross_entropy", x, y)
    assert ref.loss().item() == obj.loss().item()
    v = torch.randn(obj.numel, dtype=torch.float64)
    assert rel(obj.jvp(v), obj.jvp(v, backend="double_backward")) < 1e-13
    assert rel(obj.ggn_vp(v), ref.ggn_vp(v)) < 1e-13
    assert rel(obj.hvp(v), ref.hvp(v)) < 1e-13


def test_curvature_sub_batch_products_use_the_sub_batch():
    model = tiny_mlp()
    x, y = torch.randn(12, 12, dtype=torch.float64), torch.randint(0, 4, (12,))
    obj = Objective(model, "cross_entropy", x, y, curvature_batch_size=5)
    v = torch.randn(obj.numel, dtype=torch.float64)
    assert rel(obj.ggn_vp(v), dense_ggn(model, "cross_entropy", x[:5], y[:5]) @ v) < TOL
    assert rel(obj.hvp(v), dense_hessian(model, "cross_entropy", x[:5], y[:5]) @ v) < TOL
    full = Objective(model, "cross_entropy", x, y)
    assert rel(obj.gradient(), full.gradient()) < 1e-14  # the gradient stays on the whole batch


def test_per_sample_squared_gradients():
    model = tiny_mlp()
    x, y = torch.randn(6, 12, dtype=torch.float64), torch.randint(0, 4, (6,))
    obj = Objective(model, "cross_entropy", x, y, per_sample_chunk=4)
    expected = torch.zeros(obj.numel, dtype=torch.float64)
    for i in range(6):
        model.zero_grad()
        get_loss("cross_entropy")(model(x[i:i + 1]), y[i:i + 1]).backward()
        expected += flatten([p.grad for p in model.parameters()]) ** 2
    assert rel(obj.per_sample_grad_sq_mean(), expected / 6) < 1e-13


def test_per_sample_squared_gradients_conv_bn_and_other_layers():
    """Closed forms (conv, linear) and the vmap fallback (batch norm, a bare parameter) against a per-sample loop."""

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.tensor([1.5], dtype=torch.float64))

        def forward(self, x):
            return x * self.s

    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, stride=2), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(12, 5), Scale(), nn.Tanh(), nn.Linear(5, 4)).double().train()
    model(torch.randn(8, 2, 9, 9, dtype=torch.float64))  # non-trivial running statistics
    x, y = torch.randn(7, 2, 9, 9, dtype=torch.float64), torch.randint(0, 4, (7,))
    obj = Objective(model, "cross_entropy", x, y, per_sample_chunk=3)
    got = obj.per_sample_grad_sq_mean()
    assert model.training  # restored
    model.eval()
    expected = torch.zeros(obj.numel, dtype=torch.float64)
    for i in range(7):
        model.zero_grad()
        get_loss("cross_entropy")(model(x[i:i + 1]), y[i:i + 1]).backward()
        expected += flatten([p.grad for p in model.parameters()]) ** 2
    assert rel(got, expected / 7) < 1e-13


def test_apply_moves_parameters_and_drops_caches():
    model = tiny_mlp()
    x, y = torch.randn(6, 12, dtype=torch.float64), torch.randint(0, 4, (6,))
    obj = Objective(model, "cross_entropy", x, y)
    delta = 1e-2 * torch.ones(obj.numel, dtype=torch.float64)
    predicted = obj.loss_at(delta)
    before = flatten([p.detach().clone() for p in model.parameters()])
    obj.apply(delta)
    assert torch.allclose(flatten([p.detach() for p in model.parameters()]), before + delta, rtol=0, atol=1e-15)
    assert obj.loss().item() == pytest.approx(predicted.item(), rel=1e-14)


@pytest.mark.parametrize("key,value", [("ggn_backend", "fast"), ("hvp_backend", "magic"), ("curvature_batch_size", 0)])
def test_bad_options_name_the_key(key, value):
    with pytest.raises(ValueError, match=key):
        Objective(tiny_mlp(), "cross_entropy", torch.zeros(2, 12), torch.zeros(2, dtype=torch.long), **{key: value})


def test_unknown_loss_lists_choices():
    with pytest.raises(ValueError, match="cross_entropy"):
        get_loss("hinge")


# ---------------------------------------------------------------------- the seeds' own networks
def _mnist_like(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g, dtype=torch.float64), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.slow
def test_simple_cnn_b100_products_equal_explicit_matrices():
    from models.simple_cnn import build_simple_cnn

    torch.manual_seed(0)
    model = build_simple_cnn((1, 28, 28), 10).double()
    x, y = _mnist_like(100, 6)
    obj = Objective(model, "cross_entropy", x, y)
    assert obj.numel == 3192
    H, G = dense_hessian(model, "cross_entropy", x, y), dense_ggn(model, "cross_entropy", x, y)
    assert rel(H, H.T) < 1e-12
    for seed in range(2):
        v = torch.randn(obj.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        assert rel(obj.hvp(v), H @ v) < TOL
        assert rel(obj.ggn_vp(v), G @ v) < TOL


def test_mlp_products_equal_explicit_matrices():
    from models.mlp import build_mlp

    torch.manual_seed(0)
    model = build_mlp((1, 8, 8), 10, hidden=[16], activation="tanh").double()
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(32, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 10, (32,), generator=g)
    obj = Objective(model, "cross_entropy", x, y)
    v = torch.randn(obj.numel, dtype=torch.float64, generator=g)
    assert rel(obj.hvp(v), dense_hessian(model, "cross_entropy", x, y) @ v) < TOL
    assert rel(obj.ggn_vp(v), dense_ggn(model, "cross_entropy", x, y) @ v) < TOL


@pytest.mark.slow
def test_cifar_basic_cnn_with_batch_norm_products():
    """~96k parameters: the GGN against an explicit Jacobian J (B*o x p), the Hessian against an explicit block."""
    from models.basic_cnn import build_cifar_basic_cnn

    torch.manual_seed(0)
    model = build_cifar_basic_cnn((3, 16, 16), 10, batch_norm=True).double().train()
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 10, (4,), generator=g)
    obj = Objective(model, "cross_entropy", x, y)
    names = obj.names
    flat0 = flat_params(model)
    jac = dense_jacobian(model, x)  # (B*o, p), independent of the products
    f = obj.outputs()
    blocks = torch.func.hessian(lambda out: nn.functional.cross_entropy(out, y))(f).reshape(f.numel(), f.numel())
    v = torch.randn(obj.numel, dtype=torch.float64, generator=g)
    assert rel(obj.ggn_vp(v), jac.T @ (blocks @ (jac @ v))) < TOL

    # exact Hessian block of the last four parameter tensors (last batch norm's scale/shift and the classifier)
    last = list(range(len(names) - 4, len(names)))
    sizes = [obj.params[i].numel() for i in range(len(names))]
    offsets = torch.tensor([0] + sizes).cumsum(0)
    idx = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in last])
    from oracles import loss_fn

    full_loss = loss_fn(model, "cross_entropy", x, y)

    def loss_of_block(wb):
        w = flat0.clone()
        w[idx] = wb
        return full_loss(w)

    H_block = torch.func.hessian(loss_of_block)(flat0[idx])
    vb = torch.zeros(obj.numel, dtype=torch.float64)
    vb[idx] = torch.randn(idx.numel(), dtype=torch.float64, generator=g)
    assert rel(obj.hvp(vb)[idx], H_block @ vb[idx]) < TOL
    # and the full H v agrees with the independent functorch forward-over-reverse product
    fo = Objective(model, "cross_entropy", x, y, hvp_backend="forward_over_reverse")
    assert rel(obj.hvp(v), fo.hvp(v)) < TOL


def test_auto_backend_picks_forward_ad_for_conv_nets_and_double_backward_otherwise():
    x, y = torch.randn(4, 2, 8, 8, dtype=torch.float64), torch.randint(0, 5, (4,))
    assert Objective(tiny_bn_cnn(), "cross_entropy", x, y).jacobian_backend == "forward_ad"
    assert Objective(tiny_mlp(), "cross_entropy", torch.randn(4, 12), torch.randint(0, 4, (4,))).jacobian_backend == "double_backward"
    assert Objective(tiny_mlp(), "cross_entropy", x, y, ggn_backend="linearize").jacobian_backend == "linearize"


def test_in_place_parameter_moves_are_noticed_without_a_call_order():
    """Caches belong to the parameters they were computed at: an in-place update (as torch.optim makes) drops them,
    and the re-evaluation uses the same dropout masks and leaves batch-norm running statistics alone."""
    model = tiny_bn_cnn()
    x, y = torch.randn(6, 2, 8, 8, dtype=torch.float64), torch.randint(0, 5, (6,))
    obj = Objective(model, "cross_entropy", x, y)
    g0 = obj.gradient()
    stats = model[1].running_mean.clone()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    assert torch.equal(model[1].running_mean, stats)
    moved = obj.gradient()
    assert not torch.equal(moved, g0)
    fresh = Objective(model, "cross_entropy", x, y)
    fresh.loss()
    assert rel(moved, fresh.gradient()) < 1e-14


def test_forward_with_jvp_matches_jvp_and_falls_back_after_the_forward():
    model = tiny_mlp()
    x, y = torch.randn(9, 12, dtype=torch.float64), torch.randint(0, 4, (9,))
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    fused = Objective(model, "cross_entropy", x, y)
    jv = fused.forward_with_jvp(v)
    plain = Objective(model, "cross_entropy", x, y)
    assert rel(jv, plain.jvp(v)) < 1e-14
    assert rel(plain.forward_with_jvp(v), jv) < 1e-14  # the forward ran already: an ordinary jvp
    assert fused.loss().item() == plain.loss().item()


def test_a_new_backend_is_one_class_and_one_registry_line(monkeypatch, float64_case):
    """Issue 6: adding a Jacobian backend touches nothing but the registry. This one computes J v with
    ``torch.func.jvp`` (a path no built-in backend takes) and must give the dense GGN's product. A backend sees the
    batch's function ``self.net`` (optimizers.functional.FunctionalModel) and the batch, never the Objective."""
    from optimizers.backends import JACOBIAN_BACKENDS, JacobianBackend
    from optimizers.vec import unflatten

    class FuncJvp(JacobianBackend):
        name = "func_jvp"

        def jvp(self, v):
            net = self.net
            primals = net.by_name([p.detach() for p in net.params])
            tangents = net.by_name(unflatten(v, net.params))
            with net.replay_rng():
                return torch.func.jvp(lambda p: net(p, self.batch.inputs), (primals,), (tangents,))[1]

    c = float64_case
    with pytest.raises(ValueError, match="objective.ggn_backend=func_jvp"):
        Objective(c.model, c.loss, c.x, c.y, ggn_backend="func_jvp")
    monkeypatch.setitem(JACOBIAN_BACKENDS, "func_jvp", FuncJvp)
    obj = Objective(c.model, c.loss, c.x, c.y, ggn_backend="func_jvp")
    v = torch.randn(obj.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    assert rel(obj.ggn_vp(v), dense_ggn(c.model, c.loss, c.x, c.y) @ v) < TOL

"""The curvature engine against ground truth: explicit float64 matrices built by torch.func, closed-form H_L against
autograd, and the batch policies (dropout masks, batch-norm statistics, curvature sub-batch)."""
import pytest
import torch
from torch import nn

from optimizers.losses import CrossEntropy, SquaredError, get_loss
from optimizers.objective import GGN_BACKENDS, HVP_BACKENDS, Objective
from optimizers.vec import flatten

TOL = 1e-10  # relative error in float64 (issue 3 sec. 5)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.Tanh(), nn.Linear(7, 4)).double()


def tiny_bn_cnn() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).double().train()


def cases():
    g = torch.Generator().manual_seed(2)
    yield "mlp-ce", tiny_mlp(), torch.randn(9, 12, generator=g, dtype=torch.float64), torch.randint(0, 4, (9,), generator=g), "cross_entropy"
    yield "mlp-mse", tiny_mlp(), torch.randn(9, 12, generator=g, dtype=torch.float64), torch.randn(9, 4, generator=g, dtype=torch.float64), "mse"
    yield "mlp-sse", tiny_mlp(), torch.randn(9, 12, generator=g, dtype=torch.float64), torch.randn(9, 4, generator=g, dtype=torch.float64), "sse"
    yield "bn-cnn-ce", tiny_bn_cnn(), torch.randn(6, 2, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (6,), generator=g), "cross_entropy"


CASES = list(cases())


@pytest.mark.parametrize("ggn_backend", GGN_BACKENDS)
@pytest.mark.parametrize("hvp_backend", HVP_BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_products_equal_explicit_matrices(case, ggn_backend, hvp_backend):
    _, model, x, y, loss = case
    obj = Objective(model, loss, x, y, ggn_backend=ggn_backend, hvp_backend=hvp_backend)
    G, H = obj.ggn_matrix(), obj.hessian_matrix()
    v = torch.randn(obj.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert rel(obj.ggn_vp(v), G @ v) < TOL
    assert rel(obj.hvp(v), H @ v) < TOL
    assert obj.stats()["curv/ggn_products"] == 1 and obj.stats()["curv/hvp_products"] == 1


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_ggn_is_symmetric_psd_and_gradient_exact(case):
    _, model, x, y, loss = case
    obj = Objective(model, loss, x, y)
    G = obj.ggn_matrix()
    assert rel(G, G.T) < 1e-14
    assert torch.linalg.eigvalsh(G).min() > -1e-12 * G.norm()
    # the gradient from the shared double-backward pass equals plain autograd
    grad_shared = obj.prepare("ggn")
    model.zero_grad()
    get_loss(loss)(model(x), y).backward()
    assert rel(grad_shared, flatten([p.grad for p in model.parameters()])) < 1e-14


def test_ggn_equals_hessian_for_linear_least_squares():
    # f linear in w and L quadratic: the GGN is the exact Hessian (Martens 2010 sec. 4.2)
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    x, y = torch.randn(20, 5, dtype=torch.float64), torch.randn(20, 3, dtype=torch.float64)
    obj = Objective(model, "mse", x, y)
    assert rel(obj.ggn_matrix(), obj.hessian_matrix()) < 1e-13


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
    obj.prepare("ggn")
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
    obj = Objective(model, "cross_entropy", x, y, ggn_backend="forward_ad", hvp_backend="forward_over_reverse")
    assert obj.loss_at(torch.zeros(obj.numel, dtype=torch.float64)).item() == obj.loss().item()
    # products taken by re-running the network (forward_ad, forward-over-reverse) see the same masks as the graph
    ref = Objective(model, "cross_entropy", x, y)
    ref._rng, ref._outputs, ref._loss = obj._rng, obj._outputs, obj._loss
    v = torch.randn(obj.numel, dtype=torch.float64)
    assert rel(obj.ggn_vp(v), ref.ggn_vp(v)) < 1e-13
    assert rel(obj.hvp(v), ref.hvp(v)) < 1e-13


def test_curvature_sub_batch_products_use_the_sub_batch():
    model = tiny_mlp()
    x, y = torch.randn(12, 12, dtype=torch.float64), torch.randint(0, 4, (12,))
    obj = Objective(model, "cross_entropy", x, y, curvature_batch_size=5)
    sub = Objective(model, "cross_entropy", x[:5], y[:5])
    v = torch.randn(obj.numel, dtype=torch.float64)
    assert rel(obj.ggn_vp(v), sub.ggn_matrix() @ v) < TOL
    assert rel(obj.hvp(v), sub.hessian_matrix() @ v) < TOL
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


def test_simple_cnn_b100_products_equal_explicit_matrices():
    from models.simple_cnn import build_simple_cnn

    torch.manual_seed(0)
    model = build_simple_cnn((1, 28, 28), 10).double()
    x, y = _mnist_like(100, 6)
    obj = Objective(model, "cross_entropy", x, y)
    assert obj.numel == 3192
    H, G = obj.hessian_matrix(), obj.ggn_matrix(chunk_size=1000)
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
    assert rel(obj.hvp(v), obj.hessian_matrix() @ v) < TOL
    assert rel(obj.ggn_vp(v), obj.ggn_matrix() @ v) < TOL


def test_cifar_basic_cnn_with_batch_norm_products():
    """~96k parameters: the GGN against an explicit Jacobian J (B*o x p), the Hessian against an explicit block."""
    from models.basic_cnn import build_cifar_basic_cnn

    torch.manual_seed(0)
    model = build_cifar_basic_cnn((3, 16, 16), 10, batch_norm=True).double().train()
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(4, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 10, (4,), generator=g)
    obj = Objective(model, "cross_entropy", x, y)
    names = obj.names
    flat0 = flatten([p.detach() for p in obj.params])

    def outputs_of(w):
        from optimizers.vec import unflatten
        return obj._call(dict(zip(names, unflatten(w, obj.params))), x)

    jac = torch.func.jacrev(outputs_of)(flat0).reshape(-1, obj.numel)  # (B*o, p), independent of the products
    blocks = torch.block_diag(*obj.loss_fn.hessian_blocks(obj.outputs(), y))
    v = torch.randn(obj.numel, dtype=torch.float64, generator=g)
    assert rel(obj.ggn_vp(v), jac.T @ (blocks @ (jac @ v))) < TOL

    # exact Hessian block of the last four parameter tensors (last batch norm's scale/shift and the classifier)
    last = list(range(len(names) - 4, len(names)))
    sizes = [obj.params[i].numel() for i in range(len(names))]
    offsets = torch.tensor([0] + sizes).cumsum(0)
    idx = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in last])
    fixed = {n: p.detach() for n, p in zip(names, obj.params)}

    def loss_of_block(wb):
        from optimizers.vec import unflatten
        block = dict(zip([names[i] for i in last], unflatten(wb, [obj.params[i] for i in last])))
        return obj.loss_fn(obj._call({**fixed, **block}, x), y)

    H_block = torch.func.hessian(loss_of_block)(flat0[idx])
    vb = torch.zeros(obj.numel, dtype=torch.float64)
    vb[idx] = torch.randn(idx.numel(), dtype=torch.float64, generator=g)
    assert rel(obj.hvp(vb)[idx], H_block @ vb[idx]) < TOL
    # and the full H v agrees with the independent functorch forward-over-reverse product
    fo = Objective(model, "cross_entropy", x, y, hvp_backend="forward_over_reverse")
    fo._rng, fo._outputs, fo._loss = obj._rng, obj._outputs, obj._loss
    assert rel(obj.hvp(v), fo.hvp(v)) < TOL


def test_auto_backend_picks_forward_ad_for_conv_nets_and_double_backward_otherwise():
    x, y = torch.randn(4, 2, 8, 8, dtype=torch.float64), torch.randint(0, 5, (4,))
    assert Objective(tiny_bn_cnn(), "cross_entropy", x, y).ggn_method == "forward_ad"
    assert Objective(tiny_mlp(), "cross_entropy", torch.randn(4, 12), torch.randint(0, 4, (4,))).ggn_method == "double_backward"
    assert Objective(tiny_mlp(), "cross_entropy", x, y, ggn_backend="linearize").ggn_method == "linearize"

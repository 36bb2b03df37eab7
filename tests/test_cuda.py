"""CUDA paths: skipped on machines without a GPU (CI has none); run them where a GPU is present."""
import pytest
import torch
from torch import nn

from optimizers import CurveBall, HessianFree, Objective

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_products_on_cuda_equal_cpu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 8 * 8, 10)).double()
    x, y = torch.randn(16, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (16,))
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    cpu = Objective(model, "cross_entropy", x, y)
    ggn, hvp = cpu.ggn_vp(v), cpu.hvp(v)  # train-mode BN: products use batch statistics, not running ones
    gpu = Objective(model.cuda(), "cross_entropy", x.cuda(), y.cuda())
    assert torch.allclose(gpu.ggn_vp(v.cuda()).cpu(), ggn, rtol=1e-10, atol=1e-12)
    assert torch.allclose(gpu.hvp(v.cuda()).cpu(), hvp, rtol=1e-10, atol=1e-12)
    assert gpu.stats()["curv/product_time"] > 0


@pytest.mark.parametrize("make", [HessianFree, CurveBall], ids=["hf", "curveball"])
def test_second_order_steps_on_cuda(make):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 5)).cuda()
    x, y = torch.randn(64, 20, device="cuda"), torch.randint(0, 5, (64,), device="cuda")
    opt = make(model.parameters())
    first = float(opt.step(Objective(model, "cross_entropy", x, y))["loss"])
    for _ in range(10):
        last = float(opt.step(Objective(model, "cross_entropy", x, y))["loss"])
    assert last < first


def test_compiled_and_bf16_products_on_cuda():
    """objective.compile (Triton kernels) and bf16 autocast on the GPU against the eager float32 GPU products, to the
    tolerances of tests/test_compiled.py (float32 reordering; the bf16 first-order bound 6 u sum(kappa_l))."""
    import copy

    from test_compiled import REORDER, U32, bf16_tolerance, cnn, products, rel

    from optimizers.precision import set_execution

    torch.backends.cuda.matmul.allow_tf32 = False  # float32 products, as on the CPU
    torch.backends.cudnn.allow_tf32 = False
    model, x, y = cnn()
    model, x, y = model.cuda(), x.cuda(), y.cuda()
    v = torch.randn(sum(p.numel() for p in model.parameters()), device="cuda")
    eager = products(model, x, y, v)
    compiled = products(model, x, y, v, compile=True)
    fast = copy.deepcopy(model)
    tol = bf16_tolerance(fast, x)
    set_execution(fast, precision="bf16", channels_last=True)
    mixed = products(fast, x, y, v, compile=True)
    for key in ("gradient", "jvp", "ggn"):
        assert rel(compiled[key], eager[key]) < REORDER, key
        assert 100 * U32 < rel(mixed[key], eager[key]) < tol, key
        assert mixed[key].dtype == torch.float32

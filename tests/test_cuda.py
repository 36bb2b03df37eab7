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

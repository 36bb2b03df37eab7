"""Tests for models/ and conf/model/*.yaml: parameter counts, shapes, float64, AD, config errors."""

from __future__ import annotations

import inspect
import typing
from pathlib import Path

import hydra.utils
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from hydra.errors import InstantiationException
from omegaconf import OmegaConf
from torch.func import functional_call

from models import count_parameters
from models.basic_cnn import build_cifar_basic_cnn
from models.mlp import build_mlp
from models.problems import ROSENBROCK_START, build_rosenbrock, build_two_layer_linear
from models.resnet import build_resnet18
from models.simple_cnn import SAME_PAD_4x4, build_simple_cnn
from models.timm_model import build_timm
from models.vgg import build_vgg_f, min_input_size
from validation.checks import OptionError, check_call

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"

MNIST = (1, 28, 28)
CIFAR = (3, 32, 32)
DIGITS = (1, 8, 8)
IMAGENET = (3, 224, 224)

# Every config in conf/model with the (input_shape, num_outputs) pairs it must support.
SUPPORTED: dict[str, list[tuple[tuple[int, ...], int]]] = {
    "simple_cnn": [(MNIST, 10)],
    "mlp": [(MNIST, 10), (DIGITS, 10), (CIFAR, 10)],
    "logreg": [(MNIST, 10), (DIGITS, 10), ((2,), 2)],
    "mlp_800": [(MNIST, 10)],
    "mlp_kfac": [(MNIST, 10)],
    "mlp_1hidden": [(MNIST, 10)],
    "mlp_2hidden": [(MNIST, 10)],
    "linear_relu_linear": [(MNIST, 10), (DIGITS, 10)],
    "sine_mlp": [((1,), 1)],
    "cifar_basic_cnn": [(CIFAR, 10), (MNIST, 10)],
    "cifar_basic_cnn_bn": [(CIFAR, 100)],
    "resnet18": [(CIFAR, 10), (MNIST, 10)],
    "resnet50": [(IMAGENET, 1000)],
    "vgg_f": [(IMAGENET, 1000)],
    "vgg_f_bn": [((3, 64, 64), 100)],
    "timm": [(CIFAR, 10)],
    "rosenbrock": [((1,), 2)],
    "two_layer_linear": [((6,), 10), ((6,), 3)],  # Rahimi-Recht data: 6 -> 10
}


def _instantiate(name: str, input_shape: tuple[int, ...], num_outputs: int) -> torch.nn.Module:
    cfg = OmegaConf.load(CONF_DIR / f"{name}.yaml")
    return hydra.utils.instantiate(cfg, input_shape=input_shape, num_outputs=num_outputs)


def _example_input(name: str, input_shape: tuple[int, ...], batch: int) -> torch.Tensor:
    if name == "rosenbrock":  # noise samples eps ~ U[0, 1]
        return torch.rand(batch, *input_shape)
    return torch.randn(batch, *input_shape)


def test_every_config_is_listed() -> None:
    assert {p.stem for p in CONF_DIR.glob("*.yaml")} == set(SUPPORTED)


@pytest.mark.parametrize(
    "name,input_shape,num_outputs",
    [(name, shape, n) for name, cases in SUPPORTED.items() for shape, n in cases],
)
def test_config_instantiates_and_gives_batch_by_outputs(
    name: str, input_shape: tuple[int, ...], num_outputs: int
) -> None:
    torch.manual_seed(0)
    model = _instantiate(name, input_shape, num_outputs).eval()
    with torch.no_grad():
        out = model(_example_input(name, input_shape, batch=2))
    assert out.shape == (2, num_outputs)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "name,input_shape,num_outputs,expected",
    [
        ("simple_cnn", MNIST, 10, 3192),  # 4*4 + 784*4 + 4*10, seed 000 sec. 10.1
        ("mlp_800", MNIST, 10, 636_010),  # 784*800+800 + 800*10+10, seed 002
        ("sine_mlp", (1,), 1, 286),  # 1*15+15 + 15*15+15 + 15*1+1, seed 002
        ("mlp_kfac", MNIST, 10, 111_146),  # 784*128+128 + 128*64+64 + 64*32+32 + 32*10+10
        ("linear_relu_linear", MNIST, 10, 25_450),  # 784*32+32 + 32*10+10
        ("logreg", MNIST, 10, 7_850),  # 784*10+10
        ("cifar_basic_cnn", CIFAR, 10, 145_578),  # 2432 + 25632 + 51264 + 65600 + 650
        ("cifar_basic_cnn_bn", CIFAR, 10, 145_770),  # conv biases (192) -> BN scale+shift (384)
        ("resnet18", CIFAR, 10, 11_173_962),  # the usual CIFAR ResNet-18 count
        ("vgg_f", IMAGENET, 1000, 60_834_536),  # conv 2,203,392 + fc 37,752,832+16,781,312+4,097,000
        ("two_layer_linear", (6,), 6, 72),  # 6*6 + 6*6
        ("rosenbrock", (1,), 2, 2),
    ],
)
def test_parameter_counts(name: str, input_shape: tuple[int, ...], num_outputs: int, expected: int) -> None:
    assert count_parameters(_instantiate(name, input_shape, num_outputs)) == expected


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
def test_simple_cnn_layout_and_tf_same_padding() -> None:
    torch.manual_seed(0)
    model = build_simple_cnn(MNIST, 10).double()
    assert model.conv.weight.shape == (1, 1, 4, 4)
    assert model.conv.bias is None and model.fc1.bias is None and model.fc2.bias is None
    w = model.conv.weight
    # TF "SAME" for a 4x4 kernel pads 1 before and 2 after: a delta at pixel (0, 0) sits at padded
    # position (1, 1), so conv output (i, j) sees it through kernel tap (1 - i, 1 - j).
    delta = torch.zeros(1, 1, 28, 28, dtype=torch.float64)
    delta[0, 0, 0, 0] = 1.0
    conv_out = model.conv(torch.nn.functional.pad(delta, SAME_PAD_4x4))
    assert conv_out.shape == (1, 1, 28, 28)
    assert conv_out[0, 0, 0, 0] == w[0, 0, 1, 1] and conv_out[0, 0, 1, 1] == w[0, 0, 0, 0]
    assert conv_out[0, 0, 0, 1] == w[0, 0, 1, 0] and conv_out[0, 0, 2, 2] == 0
    # the whole forward pass, written out with torch's own "same" padding (also 1 before, 2 after)
    x = torch.rand(3, *MNIST, dtype=torch.float64)
    h = torch.relu(torch.nn.functional.conv2d(x, w, padding="same")).flatten(1)
    expected = torch.sigmoid(h @ model.fc1.weight.T) @ model.fc2.weight.T
    assert torch.allclose(model(x), expected)


def test_simple_cnn_xavier_like_init_has_the_seed_standard_deviation() -> None:
    # seed 000 ch. 11: W ~ N(0, sqrt(2 / (n_in + n_out))); for W1 (784x4): std = sqrt(2/788) = 0.0504
    torch.manual_seed(0)
    stds = torch.stack([build_simple_cnn(MNIST, 10).fc1.weight.std() for _ in range(5)])
    assert stds.mean().item() == pytest.approx((2 / 788) ** 0.5, rel=0.02)


@pytest.mark.parametrize(
    "name,input_shape",
    [("simple_cnn", MNIST), ("mlp", MNIST), ("cifar_basic_cnn_bn", CIFAR), ("resnet18", (3, 8, 8))],
)
def test_float64_forward_and_every_parameter_gets_a_gradient(
    name: str, input_shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    model = _instantiate(name, input_shape, 10).double().train()
    x = torch.randn(4, *input_shape, dtype=torch.float64)
    y = torch.randint(0, 10, (4,))
    out = model(x)
    assert out.dtype == torch.float64
    torch.nn.functional.cross_entropy(out, y).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert p.grad.dtype == torch.float64
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


def _unit_direction(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A random direction in parameter space with unit norm (keeps finite differences accurate)."""
    v = {k: torch.randn_like(p) for k, p in params.items()}
    norm = torch.sqrt(sum(t.pow(2).sum() for t in v.values()))
    return {k: t / norm for k, t in v.items()}


def _loss_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    def loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    return loss


@pytest.mark.parametrize("name,input_shape", [("simple_cnn", MNIST), ("mlp_kfac", MNIST)])
def test_hessian_vector_product_by_double_backward_matches_finite_differences(
    name: str, input_shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    model = _instantiate(name, input_shape, 10).double()
    loss = _loss_fn(model, torch.randn(8, *input_shape, dtype=torch.float64), torch.randint(0, 10, (8,)))
    params = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}
    v = _unit_direction(params)
    grads = torch.autograd.grad(loss(params), list(params.values()), create_graph=True)
    dot = sum((g * v[k]).sum() for g, k in zip(grads, params))
    hv = torch.autograd.grad(dot, list(params.values()))

    def grad_at(t: float) -> list[torch.Tensor]:
        shifted = {k: (p + t * v[k]).detach().requires_grad_() for k, p in params.items()}
        return list(torch.autograd.grad(loss(shifted), list(shifted.values())))

    eps = 1e-5
    fd = [(a - b) / (2 * eps) for a, b in zip(grad_at(eps), grad_at(-eps))]
    for exact, approx in zip(hv, fd):
        assert torch.allclose(exact, approx, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    "name,input_shape", [("simple_cnn", MNIST), ("mlp", MNIST), ("cifar_basic_cnn_bn", CIFAR)]
)
def test_forward_mode_jacobian_vector_product_matches_finite_differences(
    name: str, input_shape: tuple[int, ...]
) -> None:
    torch.manual_seed(0)
    model = _instantiate(name, input_shape, 10).double().train()
    x = torch.randn(4, *input_shape, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}
    v = _unit_direction(params)
    with fwAD.dual_level():
        dual = {k: fwAD.make_dual(p, v[k]) for k, p in params.items()}
        jv = fwAD.unpack_dual(functional_call(model, dual, (x,))).tangent

    def out_at(t: float) -> torch.Tensor:
        return functional_call(model, {k: p + t * v[k] for k, p in params.items()}, (x,))

    eps = 1e-6
    assert torch.allclose(jv, (out_at(eps) - out_at(-eps)) / (2 * eps), rtol=1e-6, atol=1e-7)


def test_pretrained_style_models_have_no_inplace_layers() -> None:
    for model in (build_resnet18(CIFAR, 10), build_timm(CIFAR, 10, name="resnet18")):
        assert not [n for n, m in model.named_modules() if getattr(m, "inplace", False)]


def test_resnet_stem_follows_image_size_and_channels() -> None:
    small = build_resnet18(MNIST, 10)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.in_channels == 1
    assert isinstance(small.maxpool, torch.nn.Identity)
    large = build_resnet18((1, 96, 96), 10)
    assert large.conv1.kernel_size == (7, 7) and large.conv1.in_channels == 1
    forced = build_resnet18(CIFAR, 10, cifar_stem=False)
    assert forced.conv1.kernel_size == (7, 7) and isinstance(forced.maxpool, torch.nn.MaxPool2d)


def test_resnet_loads_a_local_state_dict(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_resnet18(MNIST, 10)
    path = tmp_path / "resnet18.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(1)
    loaded = build_resnet18(MNIST, 10, weights_path=str(path))
    assert torch.equal(loaded.fc.weight, source.fc.weight)
    assert torch.equal(loaded.conv1.weight, source.conv1.weight)
    with pytest.raises(ValueError, match="does not fit the model"):
        build_resnet18(MNIST, 100, weights_path=str(path))
    with pytest.raises(FileNotFoundError, match="weights_path='.*missing.pt' does not exist"):
        build_resnet18(MNIST, 10, weights_path=str(tmp_path / "missing.pt"))


def test_rosenbrock_is_zero_at_the_minimum_and_matches_eq19_at_the_start() -> None:
    torch.manual_seed(0)
    eps = torch.rand(16, 1, dtype=torch.float64) * 3  # U[0, 3], seed 003 Table 1
    model = build_rosenbrock((1,), 2).double()
    assert model.xy.tolist() == pytest.approx(ROSENBROCK_START)
    u, v = model.xy.tolist()  # the float32 -> float64 rounding of -1.2 is the model's true start

    def sse(m: torch.nn.Module) -> torch.Tensor:
        return m(eps).pow(2).sum(dim=1).mean()

    closed_form = ((1 - u) ** 2 + 100 * eps[:, 0] * (v - u**2) ** 2).mean()
    assert sse(model).item() == pytest.approx(closed_form.item(), rel=1e-12)
    # deterministic Rosenbrock (eps = 1) at (-1.2, 1) is the textbook 24.2
    deterministic = model(torch.ones(1, 1, dtype=torch.float64)).pow(2).sum().item()
    assert deterministic == pytest.approx(24.2, rel=1e-6)
    # gradient of eq. 19
    sse(model).backward()
    du = (-2 * (1 - u) - 400 * eps[:, 0] * u * (v - u**2)).mean()
    dv = (200 * eps[:, 0] * (v - u**2)).mean()
    assert torch.allclose(model.xy.grad, torch.stack([du, dv]))

    at_min = build_rosenbrock((1,), 2, init=[1.0, 1.0]).double()
    assert sse(at_min).item() == 0.0


def test_two_layer_linear_is_w2_w1_x() -> None:
    torch.manual_seed(0)
    model = build_two_layer_linear((6,), 4).double()
    assert model.w1.weight.shape == (6, 6)  # hidden width defaults to the input dimension
    assert model.w1.bias is None and model.w2.bias is None
    x = torch.randn(5, 6, dtype=torch.float64)
    expected = (model.w2.weight @ model.w1.weight @ x.T).T
    assert torch.allclose(model(x), expected)
    assert build_two_layer_linear((6,), 4, hidden=3).w1.weight.shape == (3, 6)


def test_mlp_activation_choice_is_used() -> None:
    model = build_mlp((3,), 2, hidden=[4, 5], activation="tanh")
    kinds = [type(m).__name__ for m in model.net]
    assert kinds == ["Linear", "Tanh", "Linear", "Tanh", "Linear"]
    assert [m.out_features for m in model.net if isinstance(m, torch.nn.Linear)] == [4, 5, 2]


def test_basic_cnn_dropout_sits_before_the_two_fully_connected_style_convs() -> None:
    model = build_cifar_basic_cnn(CIFAR, 10, dropout=0.3)
    kinds = [type(m).__name__ for m in model.net]
    assert kinds[-7:] == ["MaxPool2d", "Dropout", "Conv2d", "ReLU", "Dropout", "Conv2d", "Flatten"]
    assert [m.kernel_size for m in model.net if isinstance(m, torch.nn.Conv2d)] == [
        (5, 5), (5, 5), (5, 5), (4, 4), (1, 1)
    ]
    assert all(m.p == 0.3 for m in model.net if isinstance(m, torch.nn.Dropout))
    assert not any(isinstance(m, torch.nn.Dropout) for m in build_cifar_basic_cnn(CIFAR, 10).net)


def test_vgg_f_accepts_its_minimum_size_and_rejects_one_pixel_less() -> None:
    n = min_input_size()
    assert n == 55
    model = build_vgg_f((3, n, n), 5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, n, n)).shape == (1, 5)
    with pytest.raises(ValueError, match=r"vgg_f.*\(3, 54, 54\).*at least 55x55"):
        build_vgg_f((3, n - 1, n - 1), 5)


@pytest.mark.parametrize(
    "build,match",
    [
        (lambda: build_simple_cnn(CIFAR, 10), r"'simple_cnn'.*input_shape=\(3, 32, 32\).*\(1, 28, 28\)"),
        (lambda: build_vgg_f(CIFAR, 10), r"'vgg_f'.*input_shape=\(3, 32, 32\).*at least 55x55"),
        (lambda: build_cifar_basic_cnn((784,), 10), r"'cifar_basic_cnn'.*input_shape=\(784,\).*\(C, H, W\)"),
        (lambda: build_resnet18((2,), 2), r"'resnet18'.*input_shape=\(2,\)"),
        (lambda: build_mlp(MNIST, 10, activation="swish"),
         r"^model\.activation=swish is not one of: relu, tanh, sigmoid, gelu, identity\.$"),
        (lambda: build_mlp(MNIST, 10, hidden=[0]), r"^model\.hidden\[0\]=0 must be an integer >= 1\.$"),
        (lambda: build_mlp(MNIST, 10, hidden=[2.5]), r"^model\.hidden\[0\]=2\.5 must be an integer >= 1\.$"),
        (lambda: build_timm(CIFAR, 10, name="resnet181"),
         r"^model\.name=resnet181 is not a timm architecture\. Close matches: .*resnet18"),
        (lambda: build_rosenbrock((1,), 10), r"'rosenbrock'.*num_outputs=10.*num_outputs=2"),
        (lambda: build_rosenbrock((1,), 2, init=[0.0]), r"^model\.init=\[0\.0\] must be a list of 2 items\.$"),
        (lambda: build_cifar_basic_cnn(CIFAR, 10, dropout=1.5), r"^model\.dropout=1\.5 must lie in \[0, 1\)\.$"),
        (lambda: build_vgg_f(IMAGENET, 10, dropout=-0.1), r"^model\.dropout=-0\.1 must lie in \[0, 1\)\.$"),
        (lambda: build_two_layer_linear((6,), 10, hidden=0), r"^model\.hidden=0 must be an integer >= 1\.$"),
        (lambda: build_mlp(MNIST, 0), r"num_outputs=0"),
    ],
    ids=[
        "simple_cnn-on-cifar", "vgg_f-on-cifar", "basic_cnn-on-vectors", "resnet-on-vectors",
        "unknown-activation", "bad-hidden", "fractional-hidden", "unknown-timm-name", "rosenbrock-outputs",
        "rosenbrock-init", "bad-dropout", "bad-vgg-dropout", "bad-linear-width", "zero-outputs",
    ],  # fmt: skip
)
def test_impossible_combinations_raise_clear_errors(build, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_activation_from_yaml_override_is_reported() -> None:
    cfg = OmegaConf.load(CONF_DIR / "mlp.yaml")
    cfg.activation = "softplus"
    with pytest.raises(InstantiationException, match="model.activation=softplus is not one of"):
        hydra.utils.instantiate(cfg, input_shape=MNIST, num_outputs=10)


def test_every_model_builder_annotates_every_option():
    """check_call can only check the types it is told: every option of every conf/model target is annotated."""
    for path in sorted(CONF_DIR.glob("*.yaml")):
        fn = hydra.utils.get_method(OmegaConf.load(path)._target_)
        hints = typing.get_type_hints(fn)
        for name, parameter in inspect.signature(fn).parameters.items():
            assert parameter.kind is parameter.VAR_KEYWORD or name in hints, (path.name, name)


def test_model_options_are_checked_against_the_builder_signature():
    supplied = ("input_shape", "num_outputs")
    with pytest.raises(OptionError, match=r"^model\.hidden=abc must be a list of integers, e.g\. \[1,2\]\.$"):
        check_call("model", build_mlp, {"hidden": "abc"}, supplied=supplied)
    with pytest.raises(OptionError, match=r"^model\.width is not an option of model 'build_mlp'\. "
                                          r"Valid keys: hidden, activation, bias\.$"):
        check_call("model", build_mlp, {"width": 3}, supplied=supplied)
    with pytest.raises(OptionError, match=r"^model\.input_shape is not an option of model 'build_mlp'"):
        check_call("model", build_mlp, {"input_shape": [1]}, supplied=supplied)  # the dataset supplies it
    with pytest.raises(OptionError, match=r"^model\.cifar_stem=maybe must be true or false or null\.$"):
        check_call("model", build_resnet18, {"cifar_stem": "maybe"}, supplied=supplied)
    with pytest.raises(OptionError, match=r"^model\.name is missing: model 'build_timm' needs it"):
        check_call("model", build_timm, {}, supplied=supplied)
    assert check_call("model", build_timm, {"name": "resnet18", "drop_rate": 0.1}, supplied=supplied)  # **kwargs

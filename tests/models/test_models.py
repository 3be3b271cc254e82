"""Reference client models: shapes, the registry, vmap over stacked parameters, ``is_vmappable``."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from fl_lightning.models import (
    MLP,
    MODELS,
    FemnistCNN,
    LinearRegression,
    LogisticRegression,
    ResNet18,
    create_model,
    is_vmappable,
)

# (registry name, constructor kwargs, input shape, expected output shape)
SHAPE_CASES = [
    ("linear_regression", {"in_features": 13}, (5, 13), (5,)),
    ("linear_regression", {"in_features": 13}, (1, 13), (1,)),
    ("linear_regression", {"in_features": 10, "out_features": 3}, (5, 2, 5), (5, 3)),
    ("logistic_regression", {"in_features": 784, "num_classes": 62}, (5, 1, 28, 28), (5, 62)),
    ("mlp", {"in_features": 64, "hidden": [32, 16], "num_classes": 10}, (5, 8, 8), (5, 10)),
    ("mlp", {"in_features": 64, "hidden": (), "num_classes": 7, "activation": "tanh"}, (5, 64), (5, 7)),
    ("femnist_cnn", {}, (2, 1, 28, 28), (2, 62)),
    ("femnist_cnn", {"num_classes": 10}, (2, 784), (2, 10)),
    ("resnet18", {}, (2, 3, 32, 32), (2, 10)),
    ("resnet18", {"num_classes": 100, "in_channels": 1, "norm": "group"}, (2, 1, 16, 16), (2, 100)),
]


@pytest.mark.parametrize(("name", "kwargs", "in_shape", "out_shape"), SHAPE_CASES)
def test_model_output_has_expected_shape(name: str, kwargs: dict, in_shape: tuple, out_shape: tuple) -> None:
    torch.manual_seed(0)
    model = create_model(name, **kwargs)
    with torch.no_grad():
        assert model(torch.randn(in_shape)).shape == out_shape


def test_registry_maps_names_to_classes() -> None:
    assert MODELS.get("linear_regression") is LinearRegression
    assert MODELS.get("logistic_regression") is LogisticRegression
    assert MODELS.get("mlp") is MLP
    assert MODELS.get("femnist_cnn") is FemnistCNN
    assert MODELS.get("resnet18") is ResNet18
    assert isinstance(create_model("mlp", in_features=4, hidden=[3]), MLP)


def test_unknown_model_name_error_lists_known_names() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet1000'.*femnist_cnn.*resnet18"):
        create_model("resnet1000")


def test_invalid_activation_and_norm_are_rejected() -> None:
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        MLP(4, activation="swish")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown norm 'layer'"):
        ResNet18(norm="layer")  # type: ignore[arg-type]


def test_femnist_cnn_accepts_flat_images() -> None:
    torch.manual_seed(0)
    model = FemnistCNN().eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x.flatten(1)), model(x))


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_femnist_cnn_has_leaf_parameter_count() -> None:
    # conv1: 5*5*1*32 + 32          =       832
    # conv2: 5*5*32*64 + 64         =    51,264
    # fc1:   (7*7*64)*2048 + 2048   = 6,424,576
    # fc2:   2048*62 + 62           =   127,038
    # total                         = 6,603,710 (the figure LEAF reports for its FEMNIST CNN)
    assert _num_params(FemnistCNN()) == 832 + 51_264 + 6_424_576 + 127_038 == 6_603_710


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_resnet18_has_cifar_resnet18_parameter_count(norm: str) -> None:
    # 11,173,962 is the well-known size of the CIFAR ResNet-18 with 10 classes; GroupNorm has the
    # same affine parameters (one weight and one bias per channel) as BatchNorm.
    assert _num_params(ResNet18(norm=norm)) == 11_173_962  # type: ignore[arg-type]


def _copies(factory: Callable[[], nn.Module], n: int = 3) -> list[nn.Module]:
    """``n`` independently initialised copies (so the stacked parameters differ per client)."""
    torch.manual_seed(0)
    return [factory() for _ in range(n)]


def _vmapped(copies: list[nn.Module], x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    params, buffers = stack_module_state(copies)
    template = copies[0]
    out = vmap(lambda p, b, xi: functional_call(template, (p, b), (xi,)))(params, buffers, x)
    return out, params


VMAP_CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "linear_regression": (lambda: LinearRegression(12), (4, 3, 4)),
    "linear_regression_multi": (lambda: LinearRegression(12, out_features=2), (4, 12)),
    "logistic_regression": (lambda: LogisticRegression(784, 62), (4, 1, 28, 28)),
    "mlp": (lambda: MLP(64, hidden=[32, 16], num_classes=10, activation="gelu"), (4, 64)),
    "femnist_cnn": (lambda: FemnistCNN(), (2, 1, 28, 28)),
}


@pytest.mark.parametrize("case", list(VMAP_CASES))
def test_model_under_vmap_matches_per_client_loop(case: str) -> None:
    factory, in_shape = VMAP_CASES[case]
    copies = _copies(factory)
    assert is_vmappable(copies[0]) == (True, None)
    x = torch.randn(len(copies), *in_shape)
    out, _ = _vmapped(copies, x)
    with torch.no_grad():
        expected = torch.stack([m(xi) for m, xi in zip(copies, x)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def _assert_same_grads(copies: list[nn.Module], stacked: dict[str, torch.Tensor], rel_tol: float) -> None:
    """Client ``i``'s slice of each stacked gradient equals copy ``i``'s gradient (relative L2 error)."""
    for i, model in enumerate(copies):
        for name, p in model.named_parameters():
            got, want = stacked[name].grad, p.grad
            assert got is not None and want is not None, name
            err = torch.linalg.vector_norm(got[i] - want) / torch.linalg.vector_norm(want)
            assert err <= rel_tol, f"client {i}, {name}: relative gradient error {err:.2e}"


def test_groupnorm_resnet18_forward_and_backward_under_vmap_match_loop() -> None:
    copies = _copies(lambda: ResNet18(norm="group"))
    x = torch.randn(3, 2, 3, 32, 32)
    out, params = _vmapped(copies, x)
    expected = torch.stack([m(xi) for m, xi in zip(copies, x)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    out.square().sum().backward()
    expected.square().sum().backward()
    # In float32 two summation orders can give gradients ~1e-3 apart (relative) in a deep ReLU
    # network, when a pre-activation sits within rounding error of a kink; a wrong gradient (mixed
    # up clients, a missing term) is off by O(1).
    _assert_same_grads(copies, params, rel_tol=1e-2)


def test_groupnorm_resnet18_gradients_under_vmap_are_exact_in_float64() -> None:
    # The tight check, in float64 on 8x8 images (ResNet-18 reduces them to 1x1 in layer4) to keep it fast.
    copies = [m.double() for m in _copies(lambda: ResNet18(norm="group"))]
    x = torch.randn(3, 2, 3, 8, 8, dtype=torch.float64)
    out, params = _vmapped(copies, x)
    out.square().sum().backward()
    torch.stack([m(xi) for m, xi in zip(copies, x)]).square().sum().backward()
    _assert_same_grads(copies, params, rel_tol=1e-10)


def test_is_vmappable_flags_batchnorm_resnet_with_layer_name() -> None:
    model = ResNet18(norm="batch")
    ok, layer = is_vmappable(model)
    assert not ok
    assert layer == "bn1 (BatchNorm2d with running stats)"
    assert isinstance(model.get_submodule(layer.split(" ")[0]), nn.BatchNorm2d)


def test_is_vmappable_passes_groupnorm_resnet() -> None:
    assert is_vmappable(ResNet18(norm="group")) == (True, None)


def test_is_vmappable_names_nested_layers_and_spares_stateless_norms() -> None:
    nested = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.BatchNorm1d(4)))
    assert is_vmappable(nested) == (False, "1.1 (BatchNorm1d with running stats)")
    sync = nn.Sequential(nn.Conv2d(1, 4, 3), nn.SyncBatchNorm(4, track_running_stats=False))
    assert is_vmappable(sync) == (False, "1 (SyncBatchNorm synchronises statistics across processes)")
    assert is_vmappable(nn.InstanceNorm2d(4, track_running_stats=True)) == (
        False,
        "InstanceNorm2d (InstanceNorm2d with running stats)",
    )
    stateless = nn.Sequential(
        nn.BatchNorm1d(4, track_running_stats=False), nn.LayerNorm(4), nn.GroupNorm(2, 4)
    )
    assert is_vmappable(stateless) == (True, None)

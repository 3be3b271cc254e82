"""``fl_lightning.batched``: the baddbmm fast path computes what ``vmap(functional_call)`` computes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from fl_lightning.batched import FeatureMajorLinear, compile_stacked, stacked_losses, unsupported_reason
from fl_lightning.losses import resolve_loss
from fl_lightning.models import MLP, FemnistCNN, LinearRegression, LogisticRegression

C, B = 5, 7


def _stacked_params(model: nn.Module, seed: int = 0) -> dict[str, Tensor]:
    """Different parameters for each of C clients (perturbed on the scale of their initialisation), as
    leaves that require gradients."""
    gen = torch.Generator().manual_seed(seed)
    return {k: (v.detach().unsqueeze(0) + (v.detach().abs().mean() + 0.01) * torch.randn(C, *v.shape, generator=gen))
            .requires_grad_()
            for k, v in model.named_parameters()}


def _reference(model: nn.Module, params: dict[str, Tensor], x: Tensor) -> Tensor:
    return vmap(lambda p, xi: functional_call(model, p, (xi,)))(params, x)


SUPPORTED = [
    (LogisticRegression(784, 62), (784,)),
    (LogisticRegression(16, 3), (1, 4, 4)),
    (MLP(64, [32], 10), (64,)),
    (MLP(12, [8, 6], 4, activation="tanh"), (3, 4)),
    (MLP(12, [8], 4, activation="gelu"), (12,)),
    (MLP(12, (), 4), (12,)),
    (LinearRegression(9, 1), (9,)),
    (LinearRegression(9, 2), (9,)),
    (nn.Linear(6, 3), (6,)),
    (nn.Linear(6, 3, bias=False), (6,)),
    (nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.Sequential(nn.SiLU(), nn.Linear(5, 2))), (3, 4)),
]


@pytest.mark.parametrize(("model", "shape"), SUPPORTED, ids=lambda v: type(v).__name__ if isinstance(v, nn.Module)
                         else str(v))
def test_stacked_forward_and_gradients_match_vmap(model: nn.Module, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    forward = compile_stacked(model)
    assert forward is not None, unsupported_reason(model)
    x = torch.randn(C, B, *shape)
    params = _stacked_params(model)
    out = forward(params, x)
    ref = _reference(model, params, x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    weights = torch.randn(ref.shape)
    grads = torch.autograd.grad((out * weights).sum(), list(params.values()))
    ref_grads = torch.autograd.grad((ref * weights).sum(), list(params.values()))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_weight_gradients_come_out_contiguous_so_autograd_does_not_copy_them() -> None:
    model = MLP(20, [10], 4)
    forward = compile_stacked(model)
    assert forward is not None
    params = _stacked_params(model)
    (grad,) = torch.autograd.grad(forward(params, torch.randn(C, B, 20)).sum(), [params["net.0.weight"]])
    assert grad.is_contiguous()


@pytest.mark.parametrize(
    ("model", "why"),
    [
        (FemnistCNN(), "FemnistCNN"),
        (nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2)), "Dropout"),
        (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), "BatchNorm1d"),
        (nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True)), "in-place ReLU"),
        (nn.Sequential(nn.Flatten(start_dim=2), nn.Linear(4, 2)), "Flatten(start_dim=2"),
        (nn.Sequential(nn.ReLU()), "no Linear"),
    ],
)
def test_models_outside_the_fast_path_are_not_compiled_and_say_why(model: nn.Module, why: str) -> None:
    assert compile_stacked(model) is None
    reason = unsupported_reason(model)
    assert reason is not None and why in reason


def test_a_subclass_that_overrides_forward_is_not_compiled() -> None:
    class Scaled(LogisticRegression):
        def forward(self, x: Tensor) -> Tensor:
            return 2 * super().forward(x)

    assert compile_stacked(Scaled(4, 2)) is None


def test_inputs_a_plain_linear_maps_along_their_last_axis_are_refused() -> None:
    forward = compile_stacked(nn.Linear(4, 2))
    assert forward is not None
    assert forward.accepts(torch.zeros(C, B, 4))
    assert not forward.accepts(torch.zeros(C, B, 3, 4))
    with pytest.raises(ValueError, match="do not fit"):
        forward({"weight": torch.zeros(C, 2, 4), "bias": torch.zeros(C, 2)}, torch.zeros(C, B, 3, 4))
    flattening = compile_stacked(LogisticRegression(12, 2))
    assert flattening is not None and flattening.accepts(torch.zeros(C, B, 3, 4))


def _per_client(loss_name: str | object, out: Tensor, y: Tensor, mask: Tensor | None) -> Tensor:
    loss = resolve_loss(loss_name)  # type: ignore[arg-type]
    assert loss is not None
    if mask is None:
        return vmap(lambda o, t: loss(o, t))(out, y)
    return vmap(lambda o, t, m: loss(o, t, m))(out, y, mask)


@pytest.mark.parametrize("masked", [False, True])
def test_stacked_losses_equal_the_per_client_loss(masked: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    mask = (torch.arange(B).unsqueeze(0) < torch.randint(1, B + 1, (C, 1), generator=gen)) if masked else None
    out = torch.randn(C, B, 4, generator=gen)
    labels = torch.randint(0, 4, (C, B), generator=gen)
    ce = resolve_loss("cross_entropy")
    assert ce is not None
    torch.testing.assert_close(stacked_losses(ce, out, labels, mask), _per_client("cross_entropy", out, labels, mask))
    pred, target = torch.randn(C, B, generator=gen), torch.randn(C, B, generator=gen)
    mse = resolve_loss("mse")
    assert mse is not None
    torch.testing.assert_close(stacked_losses(mse, pred, target, mask), _per_client("mse", pred, target, mask))


def test_a_custom_loss_runs_per_client_and_refuses_padding() -> None:
    def smooth_l1(output: Tensor, target: Tensor) -> Tensor:
        return F.smooth_l1_loss(output, target)

    loss = resolve_loss(smooth_l1)
    assert loss is not None
    out, target = torch.randn(C, B), torch.randn(C, B)
    expected = torch.stack([smooth_l1(out[i], target[i]) for i in range(C)])
    torch.testing.assert_close(stacked_losses(loss, out, target), expected)
    with pytest.raises(ValueError, match="padded"):
        stacked_losses(loss, out, target, torch.ones(C, B, dtype=torch.bool))


class _SeqLinear(nn.Module):
    """nn.Linear on [B, T, F] samples, a bias-free layer and F.linear called with keywords."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(5, 4, bias=False)
        self.w = nn.Parameter(torch.randn(3, 4))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(input=torch.tanh(self.b(self.a(x))), weight=self.w).mean(1)


@pytest.mark.parametrize(("model", "shape"), [(FemnistCNN(num_classes=7), (1, 28, 28)), (MLP(12, [8, 6], 4), (12,)),
                                              (_SeqLinear(), (2, 6))], ids=["femnist_cnn", "mlp", "keywords_3d"])
def test_feature_major_linear_gives_vmap_numbers_and_contiguous_weight_gradients(model: nn.Module,
                                                                                 shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    params = _stacked_params(model)
    x = torch.randn(C, 3, *shape)
    ref = _reference(model, params, x)
    with FeatureMajorLinear():
        out = _reference(model, params, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    weights = torch.randn(ref.shape)
    names = [k for k, v in params.items() if v.dim() == 3 and not k.startswith("features")]  # Linear weights
    grads = torch.autograd.grad((out * weights).sum(), [params[k] for k in names])
    ref_grads = torch.autograd.grad((ref * weights).sum(), [params[k] for k in names])
    for name, g, r in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=name)
        assert g.is_contiguous(), name
    assert not all(r.is_contiguous() for r in ref_grads)  # what the mode saves autograd from copying


def test_feature_major_linear_leaves_vectors_to_f_linear() -> None:
    layer = nn.Linear(4, 3)
    v = torch.randn(4)
    with FeatureMajorLinear():
        out = layer(v)
    torch.testing.assert_close(out, layer(v))

"""Linear and fully connected client models (inputs of any shape are flattened per sample)."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from fl_lightning.models.registry import register_model

Activation = Literal["relu", "tanh", "sigmoid", "gelu", "elu", "leaky_relu"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
}


@register_model("linear_regression")
class LinearRegression(nn.Module):
    """Least-squares linear model ``x ↦ Wx + b``.

    The model of the seed paper's BlogFeedback experiment (Meinhardt et al. 2024, arXiv 2405.20623)
    and of the ProxSkip paper's regression experiments. With ``out_features == 1`` the output is
    ``[B]`` (the trailing dimension is squeezed) so that it pairs with an MSE loss against float
    targets of shape ``[B]``; otherwise it is ``[B, out_features]``.
    """

    def __init__(self, in_features: int, out_features: int = 1) -> None:
        super().__init__()
        self.out_features = out_features
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        out = self.linear(x.flatten(1))
        return out.squeeze(-1) if self.out_features == 1 else out


@register_model("logistic_regression")
class LogisticRegression(nn.Module):
    """Multinomial logistic regression: one linear layer returning class logits.

    The model of the seed paper's FEMNIST experiment (Meinhardt et al. 2024, arXiv 2405.20623);
    pair it with the cross-entropy loss (the softmax lives in the loss).
    """

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.flatten(1))


@register_model("mlp")
class MLP(nn.Module):
    """Fully connected network ``in → hidden[0] → … → hidden[-1] → num_classes`` returning logits.

    The default (two hidden layers of 200 ReLU units) is the "2NN" of FedAvg
    (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized Data").
    ``hidden=()`` gives logistic regression.
    """

    def __init__(
        self,
        in_features: int,
        hidden: list[int] | tuple[int, ...] = (200, 200),
        num_classes: int = 10,
        activation: Activation = "relu",
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            known = ", ".join(sorted(_ACTIVATIONS))
            raise ValueError(f"unknown activation {activation!r}; known: {known}")
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), _ACTIVATIONS[activation]()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))

"""Convolutional client models from federated-learning benchmarks."""

from __future__ import annotations

from torch import Tensor, nn

from fl_lightning.models.registry import register_model


@register_model("femnist_cnn")
class FemnistCNN(nn.Module):
    """The FEMNIST CNN of the LEAF benchmark (Caldas et al. 2018, "LEAF: A Benchmark for Federated
    Settings"; ``models/femnist/cnn.py`` of the LEAF repository).

    conv 5x5 (32, same padding) + ReLU + max-pool 2 → conv 5x5 (64, same) + ReLU + max-pool 2 →
    fully connected 7·7·64 → 2048 + ReLU → fully connected 2048 → ``num_classes`` (logits).
    With the defaults it has LEAF's 6,603,710 parameters.

    Input: ``[B, in_channels, 28, 28]``; flat ``[B, in_channels·784]`` images are reshaped.
    """

    def __init__(self, num_classes: int = 62, in_channels: int = 1) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(7 * 7 * 64, 2048),
            nn.ReLU(),
            nn.Linear(2048, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            x = x.unflatten(1, (self.in_channels, 28, 28))
        return self.classifier(self.features(x))

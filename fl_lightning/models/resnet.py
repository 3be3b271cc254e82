"""ResNet-18 for 32x32 images (the CIFAR-10 variant)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from fl_lightning.models.registry import register_model

Norm = Literal["batch", "group"]
NormFactory = Callable[[int], nn.Module]


def _norm_factory(norm: Norm, groups: int) -> NormFactory:
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "group":
        return lambda channels: nn.GroupNorm(groups, channels)
    raise ValueError(f"unknown norm {norm!r}; expected 'batch' or 'group'")


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (He et al. 2016); a 1x1 convolution projects
    the shortcut when the stride or the width changes."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int, norm: NormFactory) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = norm(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                norm(planes),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


@register_model("resnet18")
class ResNet18(nn.Module):
    """ResNet-18 as used for CIFAR-10 (He et al. 2016; the widely used variant of
    ``kuangliu/pytorch-cifar``): a 3x3 stride-1 stem without max-pool, BasicBlocks [2, 2, 2, 2] of
    widths 64, 128, 256, 512, global average pooling and a linear classifier (11.2M parameters for
    10 classes). The seed paper (Meinhardt et al. 2024) trains ResNet-18 on CIFAR-10.

    ``norm="batch"`` uses BatchNorm2d with running statistics, which
    :func:`fl_lightning.models.inspect.is_vmappable` reports as not vectorisable, so the framework
    runs the clients in a sequential loop. ``norm="group"`` uses GroupNorm with ``groups`` groups
    (Hsieh et al. 2020 recommend GroupNorm for non-IID federated learning); it has no running
    statistics and runs all clients at once under ``torch.func.vmap``.

    Input: ``[B, in_channels, H, W]`` (32x32 for CIFAR); output ``[B, num_classes]`` logits.
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 3, norm: Norm = "batch", groups: int = 2
    ) -> None:
        super().__init__()
        make_norm = _norm_factory(norm, groups)
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = make_norm(64)
        in_planes = 64
        stages = []
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(
                nn.Sequential(
                    BasicBlock(in_planes, planes, stride, make_norm),
                    BasicBlock(planes, planes, 1, make_norm),
                )
            )
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(self.pool(out).flatten(1))

"""Data augmentation on device-resident batches stacked over clients ([clients, B, C, H, W]).

Augmentations are plain functions ``(x, *, generator=None, **options) -> Tensor``, vectorised over
every leading dimension (no Python loop over images or clients), found by name with
:func:`get_augmentation`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from fl_lightning.registry import Registry

Augmentation = Callable[..., Tensor]

AUGMENTATIONS: Registry[Augmentation] = Registry("augmentation")


def _check_generator(x: Tensor, generator: torch.Generator | None) -> None:
    if generator is not None and generator.device.type != x.device.type:
        raise ValueError(
            f"the generator lives on {generator.device} but the batch on {x.device}; "
            "create it with torch.Generator(device=x.device)"
        )


@AUGMENTATIONS.register("crop_flip")
def crop_flip(
    x: Tensor, *, generator: torch.Generator | None = None, padding: int = 4, flip: bool = True
) -> Tensor:
    """Random crop with zero padding and random horizontal flip, independently for every image.

    The standard CIFAR-10 training augmentation (``RandomCrop(32, padding=4)`` followed by
    ``RandomHorizontalFlip()``), computed for a whole batch at once: the images are padded once, and
    each output image is gathered from its padded input at its own offset ``(dy, dx)``, drawn
    uniformly from ``{0, …, 2·padding}²``, then mirrored left-right with probability 1/2.

    Zero padding means zero *values*: apply it before normalisation to pad with black pixels, as
    torchvision does, or after it to pad with the mean colour.

    Args:
        x: images of shape ``[..., C, H, W]``, e.g. ``[clients, B, C, H, W]``; any dtype.
        generator: source of the random numbers, on ``x``'s device; ``None`` uses the global RNG.
            The draws are, in this order, the row offsets, the column offsets and (if ``flip``) the
            flip coins, one per image in row-major order of the leading dimensions.
        padding: zero padding on each side, in pixels (``0``: no crop).
        flip: whether to flip horizontally with probability 1/2.

    Returns:
        A new tensor of ``x``'s shape, dtype and device.
    """
    if x.dim() < 3:
        raise ValueError(f"crop_flip expects images of shape [..., C, H, W], got shape {tuple(x.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    _check_generator(x, generator)
    *lead, c, h, w = x.shape
    images = x.reshape(math.prod(lead), c, h, w)
    n, device = images.shape[0], x.device
    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    dy = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=device)
    rows = dy + torch.arange(h, device=device)  # [n, h]
    cols = dx + torch.arange(w, device=device)  # [n, w]
    if flip:
        flipped = torch.rand((n, 1), generator=generator, device=device) < 0.5
        cols = torch.where(flipped, cols.flip(1), cols)
    out = padded[
        torch.arange(n, device=device).view(n, 1, 1, 1),
        torch.arange(c, device=device).view(1, c, 1, 1),
        rows.view(n, 1, h, 1),
        cols.view(n, 1, 1, w),
    ]
    return out.reshape(*lead, c, h, w)


def get_augmentation(name: str, **options: Any) -> Augmentation:
    """The augmentation registered as ``name``, with ``options`` (e.g. ``padding=2``) bound.

    Raises:
        ValueError: ``name`` is not registered; the message lists the known names.
    """
    fn = AUGMENTATIONS.get(name)
    return functools.partial(fn, **options) if options else fn

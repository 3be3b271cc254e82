"""Data augmentation on device-resident batches stacked over clients ([clients, B, C, H, W]).

Augmentations are plain functions ``(x, *, generator=None, rows=None, num_rows=None, **options) -> Tensor``,
vectorised over every leading dimension (no Python loop over images or clients), found by name with
:func:`get_augmentation`. ``rows``/``num_rows`` say that ``x`` holds only some rows (clients) of a larger
batch: the random draws are made for the whole batch and those rows kept, so a client's augmentation
does not depend on which other clients are sampled with it (cohorts, or clients sharded over ranks).
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


def _row_selector(x: Tensor, rows: Tensor | None, num_rows: int | None) -> Tensor | None:
    """``rows`` on ``x``'s device after checking it against ``x`` and ``num_rows`` (None: ``x`` is the whole batch)."""
    if rows is None:
        if num_rows is not None and num_rows != x.shape[0]:
            raise ValueError(f"num_rows={num_rows} without rows, but the batch has {x.shape[0]} rows")
        return None
    if num_rows is None:
        raise ValueError("rows needs num_rows: the number of rows of the whole batch")
    if x.dim() < 4:
        raise ValueError(f"rows needs images of shape [rows, ..., C, H, W], got shape {tuple(x.shape)}")
    rows = torch.as_tensor(rows, device=x.device)
    if rows.dim() != 1 or len(rows) != x.shape[0]:
        raise ValueError(f"rows must give one row index per row of x ({x.shape[0]}), got shape {tuple(rows.shape)}")
    return rows  # indices outside [0, num_rows) fail when indexing, without a device sync here


@AUGMENTATIONS.register("crop_flip")
def crop_flip(
    x: Tensor,
    *,
    generator: torch.Generator | None = None,
    padding: int = 4,
    flip: bool = True,
    rows: Tensor | None = None,
    num_rows: int | None = None,
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
        rows: ``x[i]`` is row ``rows[i]`` of a batch of ``num_rows`` rows along the first dimension
            (e.g. the sampled clients among all n): the draws are those of the whole batch, restricted to
            these rows, so every image gets the transform it gets when the whole batch is augmented.
        num_rows: the whole batch's first dimension; needed with ``rows``.

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
    select = _row_selector(x, rows, num_rows)
    total = n if select is None else num_rows * math.prod(lead[1:])  # type: ignore[operator]

    def draw(values: Tensor) -> Tensor:  # the draws of the images in ``x``: [n, 1]
        return (values if select is None else values.view(num_rows, -1)[select].reshape(-1))[:, None]

    padded = F.pad(images, (padding, padding, padding, padding)) if padding else images
    dy = draw(torch.randint(0, 2 * padding + 1, (total,), generator=generator, device=device))
    dx = draw(torch.randint(0, 2 * padding + 1, (total,), generator=generator, device=device))
    row_index = dy + torch.arange(h, device=device)  # [n, h]
    col_index = dx + torch.arange(w, device=device)  # [n, w]
    if flip:
        flipped = draw(torch.rand((total,), generator=generator, device=device)) < 0.5
        col_index = torch.where(flipped, col_index.flip(1), col_index)
    out = padded[
        torch.arange(n, device=device).view(n, 1, 1, 1),
        torch.arange(c, device=device).view(1, c, 1, 1),
        row_index.view(n, 1, h, 1),
        col_index.view(n, 1, 1, w),
    ]
    return out.reshape(*lead, c, h, w)


def get_augmentation(name: str, **options: Any) -> Augmentation:
    """The augmentation registered as ``name``, with ``options`` (e.g. ``padding=2``) bound.

    Raises:
        ValueError: ``name`` is not registered; the message lists the known names.
    """
    fn = AUGMENTATIONS.get(name)
    return functools.partial(fn, **options) if options else fn

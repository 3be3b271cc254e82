"""``crop_flip``: shapes, the identity case, crops of the padded input, seeding, independence."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from fl_lightning.data.augment import AUGMENTATIONS, crop_flip, get_augmentation


def _gen(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _matching_transforms(image: torch.Tensor, out: torch.Tensor, padding: int) -> list[tuple[int, int, bool]]:
    """Brute force: every (dy, dx, flipped) for which cropping the zero-padded ``image`` ([C, H, W])
    at (dy, dx), then flipping if ``flipped``, gives exactly ``out``."""
    _, h, w = image.shape
    padded = F.pad(image, (padding,) * 4)
    matches = []
    for dy, dx, flipped in itertools.product(range(2 * padding + 1), range(2 * padding + 1), (False, True)):
        crop = padded[:, dy : dy + h, dx : dx + w]
        if torch.equal(crop.flip(-1) if flipped else crop, out):
            matches.append((dy, dx, flipped))
    return matches


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_crop_flip_keeps_shape_dtype_and_device(dtype: torch.dtype) -> None:
    x = (torch.rand(3, 4, 3, 32, 32) * 255).to(dtype)
    out = crop_flip(x, generator=_gen(0))
    assert out.shape == x.shape
    assert out.dtype == dtype
    assert out.device == x.device


def test_crop_flip_accepts_any_number_of_leading_dims() -> None:
    assert crop_flip(torch.rand(3, 8, 8), generator=_gen(0)).shape == (3, 8, 8)
    assert crop_flip(torch.rand(2, 2, 5, 1, 8, 8), generator=_gen(0)).shape == (2, 2, 5, 1, 8, 8)
    assert crop_flip(torch.rand(0, 5, 3, 8, 8), generator=_gen(0)).shape == (0, 5, 3, 8, 8)


def test_crop_flip_without_padding_or_flip_is_identity() -> None:
    x = torch.rand(3, 4, 3, 16, 16)
    out = crop_flip(x, generator=_gen(0), padding=0, flip=False)
    assert torch.equal(out, x)
    assert out.data_ptr() != x.data_ptr()  # a new tensor, not the input


def test_crop_flip_does_not_modify_its_input() -> None:
    x = torch.rand(2, 3, 3, 8, 8)
    before = x.clone()
    crop_flip(x, generator=_gen(0))
    assert torch.equal(x, before)


@pytest.mark.parametrize("flip", [True, False])
def test_each_output_image_is_a_crop_of_its_padded_input(flip: bool) -> None:
    # Continuous random values: a crop matches at exactly one (dy, dx, flipped) except by accident.
    x = torch.rand(2, 5, 3, 8, 8) + 0.5
    padding = 2
    out = crop_flip(x, generator=_gen(1), padding=padding, flip=flip)
    seen_flips = set()
    for c, b in itertools.product(range(2), range(5)):
        matches = _matching_transforms(x[c, b], out[c, b], padding)
        assert len(matches) == 1, f"image ({c}, {b}) matches {matches}"
        seen_flips.add(matches[0][2])
    assert seen_flips == ({False, True} if flip else {False})


def test_same_generator_seed_reproduces_and_other_seeds_differ() -> None:
    x = torch.rand(4, 8, 3, 16, 16)
    first = crop_flip(x, generator=_gen(7))
    assert torch.equal(first, crop_flip(x, generator=_gen(7)))
    assert not torch.equal(first, crop_flip(x, generator=_gen(8)))


def test_global_rng_is_used_without_generator() -> None:
    x = torch.rand(4, 8, 3, 16, 16)
    torch.manual_seed(3)
    first = crop_flip(x)
    torch.manual_seed(3)
    assert torch.equal(first, crop_flip(x))


def test_images_get_independent_uniform_offsets_and_fair_flips() -> None:
    # The same image in every slot of [clients, B]: any variation comes from per-image randomness.
    clients, batch, padding = 8, 50, 2
    image = torch.rand(1, 6, 6) + 0.5
    x = image.expand(clients, batch, 1, 6, 6).contiguous()
    out = crop_flip(x, generator=_gen(0), padding=padding)
    draws = [_matching_transforms(image, out[c, b], padding) for c in range(clients) for b in range(batch)]
    assert all(len(m) == 1 for m in draws)
    dys, dxs, flips = zip(*(m[0] for m in draws))
    n, k = len(draws), 2 * padding + 1
    # 400 draws over 5 offsets (expected 80 each, sd ~8) and a fair coin (expected 200, sd 10).
    for offsets in (dys, dxs):
        counts = torch.bincount(torch.tensor(offsets), minlength=k)
        assert counts.min() >= 50 and counts.max() <= 110, counts
    assert 160 <= sum(flips) <= 240
    # Offsets are shared neither along the batch axis nor along the client axis,
    transforms = [m[0] for m in draws]  # index c * batch + b
    for c in range(clients):
        assert len(set(transforms[c * batch : (c + 1) * batch])) >= 10
    for b in range(batch):
        assert len(set(transforms[b::batch])) > 1
    # and the dy and dx of one image are not the same draw.
    assert sum(dy == dx for dy, dx in zip(dys, dxs)) < 0.4 * n


def test_crop_flip_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"\[..., C, H, W\]"):
        crop_flip(torch.rand(8, 8))
    with pytest.raises(ValueError, match="padding must be >= 0"):
        crop_flip(torch.rand(3, 8, 8), padding=-1)


def test_rows_of_a_larger_batch_get_the_transforms_of_that_batch() -> None:
    x = torch.rand(5, 4, 3, 8, 8) + 0.5
    full = crop_flip(x, generator=_gen(4))
    rows = torch.tensor([4, 0, 2])
    assert torch.equal(crop_flip(x[rows], generator=_gen(4), rows=rows, num_rows=5), full[rows])
    assert torch.equal(crop_flip(x, generator=_gen(4), rows=torch.arange(5), num_rows=5), full)
    empty = crop_flip(x[:0], generator=_gen(4), rows=torch.zeros(0, dtype=torch.long), num_rows=5)
    assert empty.shape == (0, 4, 3, 8, 8)


@pytest.mark.parametrize(
    ("x", "kwargs", "pattern"),
    [
        (torch.rand(2, 4, 3, 8, 8), {"rows": torch.tensor([0, 1])}, "rows needs num_rows"),
        (torch.rand(2, 4, 3, 8, 8), {"num_rows": 3}, r"num_rows=3 without rows, but the batch has 2 rows"),
        (torch.rand(2, 4, 3, 8, 8), {"rows": torch.tensor([0]), "num_rows": 3}, "one row index per row of x"),
        (torch.rand(3, 8, 8), {"rows": torch.tensor([0, 1, 2]), "num_rows": 3}, r"shape \[rows, ..., C, H, W\]"),
    ],
)
def test_rows_are_checked_against_the_batch(x: torch.Tensor, kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        crop_flip(x, generator=_gen(0), **kwargs)


class _GeneratorOn:
    """Stands in for a ``torch.Generator`` on another device: only its ``device`` is read before any draw."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)


def test_a_generator_on_another_device_is_refused_on_any_machine() -> None:
    # the CPU half of the device test below, which needs a GPU to put a real generator elsewhere
    with pytest.raises(ValueError, match=r"generator lives on cuda:0 but the batch on cpu.*torch.Generator"):
        crop_flip(torch.rand(2, 3, 8, 8), generator=_GeneratorOn("cuda:0"))  # type: ignore[arg-type]


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs a CUDA device (the device-mismatch check also runs on CPU, in "
                    "test_a_generator_on_another_device_is_refused_on_any_machine)")
def test_crop_flip_runs_on_the_batch_device_with_a_device_generator() -> None:
    x = torch.rand(2, 4, 3, 8, 8, device="cuda") + 0.5
    out = crop_flip(x, generator=_gen(0, "cuda"), padding=2)
    assert out.device == x.device
    for b in range(4):
        assert len(_matching_transforms(x[0, b].cpu(), out[0, b].cpu(), 2)) == 1
    with pytest.raises(ValueError, match="generator lives on"):
        crop_flip(x, generator=_gen(0, "cpu"))


def test_augmentation_registry() -> None:
    assert "crop_flip" in AUGMENTATIONS
    assert get_augmentation("crop_flip") is crop_flip
    x = torch.rand(2, 3, 3, 8, 8)
    no_crop = get_augmentation("crop_flip", padding=0, flip=False)
    assert torch.equal(no_crop(x, generator=_gen(0)), x)
    with pytest.raises(ValueError, match=r"unknown augmentation 'mixup'.*crop_flip"):
        get_augmentation("mixup")

"""Communication accounting: the bits of dense, COO and bitmask encodings (DESIGN §2.4)."""

from __future__ import annotations

import pytest
import torch

from fl_lightning.comm import encoded_bits, message_bits
from fl_lightning.ops import count_rows


def test_encodings_follow_their_formulas_and_auto_takes_the_smallest() -> None:
    nnz, d = torch.tensor([0, 10, 100, 1000]), 1000
    dense = 32 * 1000
    coo = [0, 10 * 42, 100 * 42, 1000 * 42]  # ⌈log2 1000⌉ = 10 index bits + 32 value bits
    bitmask = [1000, 1000 + 320, 1000 + 3200, 1000 + 32000]
    assert encoded_bits(nnz, d, "dense").tolist() == [dense] * 4
    assert encoded_bits(nnz, d, "coo").tolist() == coo
    assert encoded_bits(nnz, d, "bitmask").tolist() == bitmask
    assert encoded_bits(nnz, d, "auto").tolist() == [min(dense, c, b) for c, b in zip(coo, bitmask)]


def test_message_bits_count_non_zeros_per_client_across_tensors() -> None:
    msg = {"w": torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[0.0, 0.0], [0.0, 0.0]]]), "b": torch.tensor([[3.0], [0.0]])}
    # client 0: 3 non-zeros of d = 5; client 1: none. COO: 3·(32 + 3) = 105 < bitmask 5 + 96 < dense 160
    assert message_bits(msg, "auto", stacked=True).tolist() == [101.0, 0.0]
    assert message_bits(msg, "coo", stacked=True).tolist() == [105.0, 0.0]
    assert float(message_bits({"w": msg["w"][0]}, "dense", stacked=False)) == 128.0


def test_unknown_encoding_is_rejected() -> None:
    with pytest.raises(ValueError, match="encoding"):
        encoded_bits(torch.tensor([1]), 4, "huffman")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(3, 7), (100, 4867), (1, 2**18 + 5), (2**10 + 3, 300)],
                         ids=["tiny", "rows-per-block", "row-longer-than-a-block", "block-boundary-inside-rows"])
def test_fast_row_count_equals_count_nonzero_with_nan_inf_signed_zero_and_subnormals(shape, dtype) -> None:
    """The CPU fast path of count_rows (0/1 blocks in a reused buffer) against torch's exact count_nonzero:
    shapes that split rows across blocks and blocks across rows, and the values that break naive tests
    (|x| > 0 misses NaN; sign tricks miss -0.0; float16 casts flush subnormals)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=dtype)
    x[x.abs() < 0.7] = 0.0
    flat = x.view(-1)
    tiny = torch.finfo(dtype).tiny / 4  # subnormal
    special = [float("nan"), float("inf"), -float("inf"), -0.0, tiny, -tiny]
    picks = torch.randint(0, flat.numel(), (len(special),), generator=g)
    for pos, value in zip(picks.tolist(), special):
        flat[pos] = value
    assert torch.equal(count_rows(x), torch.count_nonzero(x, dim=1))

"""The fused SiLU(gate) * up kernel (kernels/silu_mul.py) against torch's form on gate and up laid out
apart; on a GPU, or under TRITON_INTERPRET=1 on the CPU."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import torch.nn.functional as F

from kernels.silu_mul import silu_mul_tiles

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


@pytest.mark.parametrize("rows, tiles, tile", [(1, 1, 128), (3, 3, 128), (5, 11, 128), (2, 5, 32)])
def test_equals_silu_of_gate_times_up(rows, tiles, tile):
    g = torch.Generator().manual_seed(rows * tiles)
    gate = (torch.randn(rows, tiles * tile, generator=g) * 4).half()
    up = torch.randn(rows, tiles * tile, generator=g).half()
    interleaved = torch.stack((gate.view(rows, tiles, tile), up.view(rows, tiles, tile)), dim=2).reshape(rows, -1)
    out = silu_mul_tiles(interleaved.to(DEVICE), tile)
    expected = (F.silu(gate.float()) * up.float()).half()
    assert out.dtype == torch.float16 and out.shape == (rows, tiles * tile)
    torch.testing.assert_close(out.cpu(), expected, atol=2e-3, rtol=2e-3)


def test_refuses_columns_that_are_not_whole_tile_pairs():
    with pytest.raises(ValueError, match="whole pairs"):
        silu_mul_tiles(torch.zeros(1, 384, dtype=torch.float16, device=DEVICE), 128)

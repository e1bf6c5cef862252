"""SiLU(gate) * up in one Triton kernel, over a fused gate/up projection's output whose columns alternate
between gate and up in tiles (the exllama layer's interleaved layout, kernels/q4_gemv.py ``interleave_glu``).
Torch's form took five kernels a call, two of them strided copies (0.34 ms of a 16-row 7B step)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _silu_mul_kernel(y_ptr, out_ptr, n_out, TILE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # output columns
    inside = j < n_out
    gate = (j // TILE) * (2 * TILE) + j % TILE
    g = tl.load(y_ptr + row * 2 * n_out + gate, mask=inside, other=0.0).to(tl.float32)
    u = tl.load(y_ptr + row * 2 * n_out + gate + TILE, mask=inside, other=0.0).to(tl.float32)
    out = g / (1.0 + tl.exp(-g)) * u
    tl.store(out_ptr + row * n_out + j, out.to(out_ptr.dtype.element_ty), mask=inside)


def silu_mul_tiles(y: torch.Tensor, tile: int) -> torch.Tensor:
    """``y`` ``[M, 2 * n]``, tiles of ``tile`` gate columns then ``tile`` up columns -> ``silu(gate) * up``
    ``[M, n]`` in y's dtype, computed in fp32."""
    m, width = y.shape
    if width % (2 * tile):
        raise ValueError(f"{width} columns are not whole pairs of {tile}-column tiles")
    y = y.contiguous()
    out = torch.empty(m, width // 2, dtype=y.dtype, device=y.device)
    _silu_mul_kernel[(m, triton.cdiv(width // 2, BLOCK))](y, out, width // 2, TILE=tile, BLOCK=BLOCK, num_warps=4)
    return out

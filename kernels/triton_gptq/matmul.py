"""The Triton GPTQ matmul for more than one row, and the dequantization for long inputs.

- ``matmul``: the fused tiled kernel (tl.dot), groups contiguous or read row by row through g_idx
  (act-order); small M splits K across programs and sums with atomics.
- :func:`gptq_dequantize`: the fp16 weight, for dequantize + cuBLAS at M >= DEQUANT_MIN_M.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_gptq.weight import PackedWeight

@triton.jit
def _expand(words, BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_K // PACK, BLOCK_N] packed words -> [BLOCK_K, BLOCK_N] integers, row k = word k // PACK."""
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    shifts = tl.arange(0, PACK) * BITS
    q = (words[:, None, :] >> shifts[None, :, None]) & MASK
    return tl.reshape(q, (BLOCK_K, BLOCK_N))


@triton.jit
def _gptq_matmul_kernel(
    a_ptr, qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, c_ptr,
    M, N, K, group_size,  # group_size > 0: contiguous groups of that many rows, a multiple of BLOCK_K
    stride_am, stride_ak, stride_cm, stride_cn,
    BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr,
    CONTIGUOUS: tl.constexpr,  # groups are contiguous runs of group_size rows; else read g_idx
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: programs that run together share rows of A and columns of W in L2.
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    zero_shift = (offs_n % PACK) * BITS
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    for k0 in range(pid_k * BLOCK_K, K, BLOCK_K * SPLIT_K):
        k = k0 + offs_k
        mask_k = k < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + k[None, :] * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if CONTIGUOUS:
            # Each packed word is read once and unpacked in registers; BLOCK_K divides group_size, so one
            # group (one scale and zero per column) covers the block.
            kw = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
            words = tl.load(qweight_ptr + kw[:, None] * N + offs_n[None, :],
                            mask=(kw < K // PACK)[:, None] & mask_n[None, :], other=0)
            q = _expand(words, BITS, BLOCK_K, BLOCK_N)
            g = k0 // group_size
            scale = tl.load(scales_ptr + g * N + offs_n, mask=mask_n, other=0.0)
            zword = tl.load(qzeros_ptr + g * (N // PACK) + offs_n // PACK, mask=mask_n, other=0)
            zero = ((zword >> zero_shift) & MASK) + ZERO_OFFSET
            w = (q - zero[None, :]).to(tl.float16) * scale[None, :]
        else:
            words = tl.load(qweight_ptr + (k // PACK)[:, None] * N + offs_n[None, :],
                            mask=mask_k[:, None] & mask_n[None, :], other=0)
            q = (words >> ((k % PACK) * BITS)[:, None]) & MASK
            g = tl.load(g_idx_ptr + k, mask=mask_k, other=0)
            scale = tl.load(scales_ptr + g[:, None] * N + offs_n[None, :],
                            mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            zword = tl.load(qzeros_ptr + g[:, None] * (N // PACK) + (offs_n // PACK)[None, :],
                            mask=mask_k[:, None] & mask_n[None, :], other=0)
            zero = ((zword >> zero_shift[None, :]) & MASK) + ZERO_OFFSET
            w = (q - zero).to(tl.float16) * scale
        acc += tl.dot(a.to(tl.float16), w)

    c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    c_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)
    else:
        tl.atomic_add(c_ptrs, acc, mask=c_mask)


@triton.jit
def _gptq_dequant_kernel(
    qweight_ptr, scales_ptr, qzeros_ptr, g_idx_ptr, w_ptr,
    N, K, group_size,  # group_size > 0: contiguous groups, else read g_idx
    BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr, CONTIGUOUS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    k0 = tl.program_id(0) * BLOCK_K
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    k = k0 + tl.arange(0, BLOCK_K)
    words = tl.load(qweight_ptr + (k0 // PACK + tl.arange(0, BLOCK_K // PACK))[:, None] * N + offs_n[None, :],
                    mask=mask_n[None, :], other=0)
    q = _expand(words, BITS, BLOCK_K, BLOCK_N)
    if CONTIGUOUS:
        g = (k // group_size)[:, None]
    else:
        g = tl.load(g_idx_ptr + k)[:, None]
    scale = tl.load(scales_ptr + g * N + offs_n[None, :], mask=mask_n[None, :], other=0.0)
    zword = tl.load(qzeros_ptr + g * (N // PACK) + (offs_n // PACK)[None, :], mask=mask_n[None, :], other=0)
    zero = ((zword >> ((offs_n % PACK) * BITS)[None, :]) & MASK) + ZERO_OFFSET
    w = (q - zero).to(tl.float16) * scale
    tl.store(w_ptr + k[:, None] * N + offs_n[None, :], w, mask=mask_n[None, :])


def run_matmul(x: torch.Tensor, w: PackedWeight, *, block_m: int, block_n: int, block_k: int, split_k: int,
               group_m: int, num_warps: int, num_stages: int) -> torch.Tensor:
    """One launch of the fused kernel on fp16 ``x`` ``[M, K]``."""
    m, k = x.shape
    n = w.n
    g_idx = w.g_idx if w.g_idx is not None else w.qweight  # an unused pointer when groups are contiguous
    if split_k > 1:
        out = torch.zeros((m, n), device=x.device, dtype=torch.float32)
    else:
        out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n), split_k)
    _gptq_matmul_kernel[grid](
        x, w.qweight, w.scales, w.qzeros, g_idx, out, m, n, k, w.group_size,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        BITS=w.bits, ZERO_OFFSET=w.zero_offset, CONTIGUOUS=w.group_size > 0,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, GROUP_M=group_m,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out.to(x.dtype) if split_k > 1 else out


def gptq_dequantize(w: PackedWeight) -> torch.Tensor:
    """The fp16 ``[K, N]`` weight."""
    k, n = w.k, w.n
    block_k = 32 if w.group_size <= 0 else min(64, w.group_size)
    out = torch.empty((k, n), device=w.qweight.device, dtype=torch.float16)
    g = w.g_idx if w.g_idx is not None else w.qweight
    grid = (k // block_k, triton.cdiv(n, 128))
    _gptq_dequant_kernel[grid](w.qweight, w.scales, w.qzeros, g, out, n, k, w.group_size, BITS=w.bits,
                               ZERO_OFFSET=w.zero_offset, CONTIGUOUS=w.group_size > 0, BLOCK_N=128, BLOCK_K=block_k,
                               num_warps=4)
    return out

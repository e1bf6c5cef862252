"""GPTQ matmul in Triton with dequantization fused into the kernel.

``y[M, N] = x[M, K] @ W`` with ``W`` in the GPTQ layout (see gptq_format):
4- or 8-bit weights packed along K, fp16 scales and packed zero points per
group, groups either contiguous runs of ``group_size`` rows or given row by
row through ``g_idx`` (act-order).

One kernel serves decode and prefill. Small M (decode) splits K across
programs so that enough of them stream the weights, and sums the partial
results with atomics into an fp32 buffer; large M is a tiled matmul. The
launcher picks the configuration by shape; on a GPU it is autotuned once per
(M bucket, N, K) and cached.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# GPTQ_TRITON_AUTOTUNE=0 takes the first candidate configuration instead of timing them all.
AUTOTUNE = os.environ.get("GPTQ_TRITON_AUTOTUNE", "1") != "0"


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
        words = tl.load(qweight_ptr + (k // PACK)[:, None] * N + offs_n[None, :],
                        mask=mask_k[:, None] & mask_n[None, :], other=0)
        q = (words >> ((k % PACK) * BITS)[:, None]) & MASK
        if CONTIGUOUS:
            # BLOCK_K divides group_size: one group for the whole block.
            g = k0 // group_size
            scale = tl.load(scales_ptr + g * N + offs_n, mask=mask_n, other=0.0)
            zword = tl.load(qzeros_ptr + g * (N // PACK) + offs_n // PACK, mask=mask_n, other=0)
            zero = ((zword >> zero_shift) & MASK) + ZERO_OFFSET
            w = (q - zero[None, :]).to(tl.float16) * scale[None, :]
        else:
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


def _configs(m: int, n: int, k: int, group_size: int) -> list[triton.Config]:
    """Candidate launch configurations for this shape, best guess first."""
    def ok(cfg_k: int) -> bool:
        return group_size <= 0 or group_size % cfg_k == 0

    if m <= 16:
        shapes = [(16, 128, 64, 8, 2), (16, 128, 128, 8, 4), (16, 64, 128, 8, 2), (16, 256, 64, 4, 4), (16, 128, 64, 16, 4),
                  (16, 64, 64, 16, 2), (16, 128, 32, 16, 4), (16, 256, 32, 8, 4)]
        cfgs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "GROUP_M": 1},
                              num_warps=4, num_stages=s)
                for bm, bn, bk, sk, s in shapes if ok(bk)]
    else:
        shapes = [(128, 128, 32, 4, 4), (128, 256, 32, 8, 3), (64, 128, 32, 4, 4), (128, 128, 64, 8, 3),
                  (256, 128, 32, 8, 3), (64, 64, 32, 2, 4)]
        cfgs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": 1, "GROUP_M": 8},
                              num_warps=w, num_stages=s)
                for bm, bn, bk, w, s in shapes if ok(bk)]
    return cfgs


def _m_bucket(m: int) -> int:
    return 1 if m == 1 else 16 if m <= 16 else 128 if m <= 128 else 1024 if m <= 1024 else 4096


_TUNED: dict[tuple, triton.Config] = {}


def _launch(cfg: triton.Config, x, qweight, scales, qzeros, g_idx, out, bits, zero_offset, group_size):
    m, k = x.shape
    n = qweight.shape[1]
    kw = cfg.kwargs
    grid = (triton.cdiv(m, kw["BLOCK_M"]) * triton.cdiv(n, kw["BLOCK_N"]), kw["SPLIT_K"])
    _gptq_matmul_kernel[grid](
        x, qweight, scales, qzeros, g_idx, out, m, n, k, group_size,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        BITS=bits, ZERO_OFFSET=zero_offset, CONTIGUOUS=group_size > 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **kw,
    )


def _run(cfg: triton.Config, x, qweight, scales, qzeros, g_idx, bits, zero_offset, group_size) -> torch.Tensor:
    m, n = x.shape[0], qweight.shape[1]
    if cfg.kwargs["SPLIT_K"] > 1:
        acc = torch.zeros((m, n), device=x.device, dtype=torch.float32)
        _launch(cfg, x, qweight, scales, qzeros, g_idx, acc, bits, zero_offset, group_size)
        return acc.to(x.dtype)
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    _launch(cfg, x, qweight, scales, qzeros, g_idx, out, bits, zero_offset, group_size)
    return out


def _tuned_config(x, qweight, scales, qzeros, g_idx, bits, zero_offset, group_size) -> triton.Config:
    m, k = x.shape
    n = qweight.shape[1]
    key = (_m_bucket(m), n, k, bits, group_size, x.dtype)
    if key in _TUNED:
        return _TUNED[key]
    candidates = _configs(m, n, k, group_size)
    if not candidates:
        raise ValueError(f"contiguous group size {group_size} is not a multiple of 32; pass group_size=0 and g_idx")
    if INTERPRET or not x.is_cuda or not AUTOTUNE:
        for cfg in candidates:  # the first that fits the hardware
            try:
                _run(cfg, x, qweight, scales, qzeros, g_idx, bits, zero_offset, group_size)
            except triton.runtime.errors.OutOfResources:
                continue
            _TUNED[key] = cfg
            return cfg
        raise RuntimeError(f"no Triton configuration fits this GPU for shape {tuple(x.shape)}x{n}")
    best, best_ms = candidates[0], float("inf")
    for cfg in candidates:
        try:
            ms = triton.testing.do_bench(
                lambda: _run(cfg, x, qweight, scales, qzeros, g_idx, bits, zero_offset, group_size),
                warmup=5, rep=20, return_mode="median",
            )
        except triton.runtime.errors.OutOfResources:
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    _TUNED[key] = best
    return best


def gptq_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    zero_offset: int,
    group_size: int,
) -> torch.Tensor:
    """``x @ W`` for fp16 ``x`` ``[M, K]``.

    ``group_size`` > 0 means groups are contiguous runs of that many rows
    (``g_idx`` is then ignored); 0 means the groups come from ``g_idx``.
    """
    if x.dim() != 2:
        raise ValueError("x must be 2-D")
    if x.dtype != torch.float16:
        raise TypeError(f"x must be float16, got {x.dtype}")
    if group_size == 0 and g_idx is None:
        raise ValueError("g_idx is needed when groups are not contiguous")
    g = g_idx if g_idx is not None else qweight  # unused pointer when group_size > 0
    cfg = _tuned_config(x, qweight, scales, qzeros, g, bits, zero_offset, group_size)
    return _run(cfg, x, qweight, scales, qzeros, g, bits, zero_offset, group_size)

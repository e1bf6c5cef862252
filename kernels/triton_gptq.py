"""GPTQ matmul in Triton with dequantization fused into the kernel.

``y[M, N] = x[M, K] @ W`` with ``W`` in the GPTQ layout (see gptq_format):
4- or 8-bit weights packed along K, fp16 scales and packed zero points per
group, groups either contiguous runs of ``group_size`` rows or given row by
row through ``g_idx`` (act-order).

Three paths, chosen by M:
- M = 1 with contiguous groups (decode): a GEMV. 4-bit on a GPU: the tile
  kernel, each program one tile of whole groups by a column block, all its
  words loaded at once before it waits for the kernel that writes x
  (programmatic dependent launch), the nibbles unpacked and multiplied with x
  in half2 inline PTX (_dot8), or the same tile with x rounded to 16-bit
  integers per chunk and the dot in dp4a (_idot8), whichever the tuner
  finds faster; otherwise a kernel that loops over K. K is split across
  programs; each adds its partial sums and a count to an int64
  per column in one atomic, and the program that completes a column writes
  it (_store_columns; one kernel per call).
- small M, or act-order groups read through g_idx: the fused tiled kernel
  (tl.dot); small M splits K across programs and sums with atomics.
- M >= DEQUANT_MIN_M: dequantize into an fp16 scratch matrix with a Triton
  kernel, then fp16 cuBLAS; the dequantization is a small part of a long GEMM.
The launcher picks the configuration by shape; on a GPU it is autotuned once
per (M bucket, N, K) and cached.
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


@triton.jit
def _expand(words, BITS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_K // PACK, BLOCK_N] packed words -> [BLOCK_K, BLOCK_N] integers, row k = word k // PACK."""
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    shifts = tl.arange(0, PACK) * BITS
    q = (words[:, None, :] >> shifts[None, :, None]) & MASK
    return tl.reshape(q, (BLOCK_K, BLOCK_N))


# The split-K workspace: one int64 per column holding the number of programs that have added to it
# (bits 54..63) plus the sum of their partial sums in fixed point (30 fractional bits, two's complement;
# |sum| < 2**(54 - 1 - 30) = 2**23, far past fp16's largest value).
_COUNT_SHIFT, _FRAC_BITS = 54, 30
COUNT_SHIFT = tl.constexpr(_COUNT_SHIFT)
ONE_COUNT = tl.constexpr(1 << _COUNT_SHIFT)
HALF_COUNT = tl.constexpr(1 << (_COUNT_SHIFT - 1))
FIXED_ONE = tl.constexpr(float(1 << _FRAC_BITS))
FIXED_STEP = tl.constexpr(1.0 / (1 << _FRAC_BITS))
MAX_SPLIT_K = (1 << (63 - _COUNT_SHIFT)) - 1  # the count stays below the sign bit


@triton.jit
def _store_columns(out_ptr, ws_ptr, acc, offs_n, mask_n, SPLIT_K: tl.constexpr):
    """Writes a GEMV program's fp32 sums for its columns. With K split, each program adds its partial sum and a
    count of one to the column's int64 (see COUNT_SHIFT) in one relaxed atomic that returns the old value: the
    program that brings the count to SPLIT_K holds the whole sum, writes the output and zeroes the workspace
    for the next call. One atomic round trip, no fence, no separate arrival counter, no re-read of the sums;
    one kernel, no memset, no cast."""
    if SPLIT_K == 1:
        tl.store(out_ptr + offs_n, acc.to(out_ptr.dtype.element_ty), mask=mask_n)
    else:
        mine = tl.floor(acc * FIXED_ONE + 0.5).to(tl.int64) + ONE_COUNT
        total = tl.atomic_add(ws_ptr + offs_n, mine, mask=mask_n, sem="relaxed") + mine
        count = (total + HALF_COUNT) >> COUNT_SHIFT
        last = mask_n & (count == SPLIT_K)
        value = tl.where(last, total - (count << COUNT_SHIFT), 0).to(tl.float32) * FIXED_STEP
        tl.store(out_ptr + offs_n, value.to(out_ptr.dtype.element_ty), mask=last)
        tl.store(ws_ptr + offs_n, tl.zeros_like(total), mask=last)


@triton.jit
def _gptq_gemv_kernel(
    x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, out_ptr,
    ws_ptr,  # SPLIT_K > 1: int64 [N], zero (see _store_columns)
    N, K, group_size,  # contiguous groups; BLOCK_K divides group_size
    BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    MAGIC: tl.constexpr,  # dequantize in fp16 through the exponent trick instead of int->float conversions
):
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    rows = tl.arange(0, BLOCK_K // PACK)
    lanes = tl.arange(0, PACK)
    zero_shift = (offs_n % PACK) * BITS
    # Weights stay [word row, position in word, column]: no reshape, so no layout shuffle. Partial
    # products stay per lane; one reduction at the end, none inside the loop.
    # MAGIC: the fp16 with bits 0x6400 | v is exactly 1024 + v for v < 1024, so (q | 0x6400) - (z | 0x6400)
    # is q - z in fp16 with integer ops only (int->float conversions run at a quarter of the rate). The
    # per-lane sums then stay in fp16: each lane adds only K / (BLOCK_K * SPLIT_K) products.
    ACC: tl.constexpr = tl.float16 if MAGIC else tl.float32
    acc3 = tl.zeros((BLOCK_K // PACK, PACK, BLOCK_N), dtype=ACC)
    per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_begin = pid_k * per_split
    k_end = tl.minimum(k_begin + per_split, K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        words = tl.load(qweight_ptr + (k0 // PACK + rows)[:, None] * N + offs_n[None, :],
                        mask=mask_n[None, :], other=0)
        g = k0 // group_size
        scale = tl.load(scales_ptr + g * N + offs_n, mask=mask_n, other=0.0)
        zword = tl.load(qzeros_ptr + g * (N // PACK) + offs_n // PACK, mask=mask_n, other=0)
        zero = ((zword >> zero_shift) & MASK) + ZERO_OFFSET
        q = (words[:, None, :] >> (lanes * BITS)[None, :, None]) & MASK
        x = tl.load(x_ptr + k0 + rows[:, None] * PACK + lanes[None, :])
        if MAGIC:
            q16 = (q | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
            z16 = (zero | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
            acc3 += x[:, :, None] * ((q16 - z16[None, None, :]) * scale[None, None, :])
        else:
            w = (q - zero[None, None, :]).to(tl.float32) * scale.to(tl.float32)[None, None, :]
            acc3 += x.to(tl.float32)[:, :, None] * w
    acc = tl.sum(tl.sum(acc3.to(tl.float32), axis=0), axis=0)
    _store_columns(out_ptr, ws_ptr, acc, offs_n, mask_n, SPLIT_K)


@triton.jit
def _x_pairs(x01, x23, x45, x67):
    """Eight fp16 x values, given as four int32 pairs (x0 | x1 << 16, ...), regrouped to match _dot8's
    nibble pairs: (x0, x4), (x1, x5) / 16, (x2, x6), (x3, x7) / 16."""
    return tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 t, sixteenth;
        mov.b32 sixteenth, 0x2C002C00;
        prmt.b32 $0, $4, $6, 0x5410;
        prmt.b32 t, $4, $6, 0x7632;
        mul.rn.f16x2 $1, t, sixteenth;
        prmt.b32 $2, $5, $7, 0x5410;
        prmt.b32 t, $5, $7, 0x7632;
        mul.rn.f16x2 $3, t, sixteenth;
        }
        """,
        constraints="=r,=r,=r,=r,r,r,r,r",
        args=[x01, x23, x45, x67],
        dtype=(tl.int32,) * 4,
        is_pure=True,
        pack=1,
    )


@triton.jit
def _dot8(words, z1, z16, x04, x15, x26, x37):
    """sum_j x_j (q_j - z) over the 8 nibbles q_j of each word, in fp16 half2 arithmetic (rounded to fp32 at
    the end): (w & 0x000F000F) | 0x64006400 is the half2 (1024 + q0, 1024 + q4), minus z1 = (1024 + z) twice
    gives (q0 - z, q4 - z) exactly; the 0x00F000F0 mask gives 16 (q1 - z), 16 (q5 - z) after z16, which
    is why x1, x5 (and x3, x7) come divided by 16 (_x_pairs); w >> 8 gives q2, q6, q3, q7 the same way."""
    return tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 t, a, b, c, d, bias, acc;
        .reg .b16 lo, hi;
        .reg .f32 flo, fhi;
        mov.b32 bias, 0x64006400;
        shr.u32 t, $1, 8;
        lop3.b32 a, $1, 0x000F000F, bias, 0xEA;
        lop3.b32 b, $1, 0x00F000F0, bias, 0xEA;
        lop3.b32 c, t, 0x000F000F, bias, 0xEA;
        lop3.b32 d, t, 0x00F000F0, bias, 0xEA;
        sub.f16x2 a, a, $2;
        sub.f16x2 b, b, $3;
        sub.f16x2 c, c, $2;
        sub.f16x2 d, d, $3;
        mul.rn.f16x2 acc, a, $4;
        fma.rn.f16x2 acc, b, $5, acc;
        fma.rn.f16x2 acc, c, $6, acc;
        fma.rn.f16x2 acc, d, $7, acc;
        mov.b32 {lo, hi}, acc;
        cvt.f32.f16 flo, lo;
        cvt.f32.f16 fhi, hi;
        add.f32 $0, flo, fhi;
        }
        """,
        constraints="=f,r,r,r,r,r,r,r",
        args=[words, z1, z16, x04, x15, x26, x37],
        dtype=tl.float32,
        is_pure=True,
        pack=1,
    )


@triton.jit
def _load_tile(qweight_ptr, scales_ptr, qzeros_ptr, N, K, group_size, BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr,
               BLOCK_N: tl.constexpr, CHUNK_K: tl.constexpr, CHUNKS: tl.constexpr):
    """A GEMV program's tile: CHUNKS chunks of CHUNK_K rows (each inside one group) by BLOCK_N columns. Returns
    the columns and their mask, the chunks' first rows [C] and mask, the word rows [C, R], the words
    [C, R, BLOCK_N] (read once), and the chunks' scales and zero points [C, BLOCK_N]."""
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    ROWS: tl.constexpr = CHUNK_K // PACK  # word rows per chunk
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    chunk_k = tl.program_id(1) * (CHUNKS * CHUNK_K) + tl.arange(0, CHUNKS) * CHUNK_K  # [C] first row of each chunk
    mask_c = chunk_k < K
    word_row = chunk_k[:, None] // PACK + tl.arange(0, ROWS)[None, :]  # [C, R]
    tile_mask = mask_c[:, None, None] & mask_n[None, None, :]
    words = tl.load(qweight_ptr + word_row[:, :, None] * N + offs_n[None, None, :], mask=tile_mask, other=0,
                    eviction_policy="evict_first")
    g = chunk_k // group_size
    cmask = mask_c[:, None] & mask_n[None, :]
    scale = tl.load(scales_ptr + g[:, None] * N + offs_n[None, :], mask=cmask, other=0.0)
    zword = tl.load(qzeros_ptr + g[:, None] * (N // PACK) + (offs_n // PACK)[None, :], mask=cmask, other=0)
    zero = ((zword >> ((offs_n % PACK) * BITS)[None, :]) & MASK) + ZERO_OFFSET
    return offs_n, mask_n, chunk_k, mask_c, word_row, words, scale, zero


@triton.jit
def _gptq_gemv_tile_kernel(
    x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, out_ptr,
    ws_ptr,  # SPLIT_K > 1: int64 [N], zero (see _store_columns)
    N, K, group_size,  # contiguous groups; CHUNK_K divides group_size
    BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr,
    BLOCK_N: tl.constexpr, CHUNK_K: tl.constexpr, CHUNKS: tl.constexpr, SPLIT_K: tl.constexpr,
    ASM: tl.constexpr,  # 4-bit on a GPU: _dot8's inline PTX; else plain Triton arithmetic in fp32
    PDL: tl.constexpr,  # launched as a programmatic dependent: load the weights, then wait for x
    # benchmarks/triton_gemv_variants.py turns these off to bound what the parts cost (results then wrong):
    DOT: tl.constexpr = True,  # off: every word still reaches the output, through a cheap sum
    # 1: the split-K tail (_store_columns); 0: the workspace adds without waiting for their old values, no
    # output; 2: no atomics at all, each program's sums stored to its own row of an fp32 [SPLIT_K, N] ws
    TAIL: tl.constexpr = 1,
):
    """One program: CHUNKS chunks of CHUNK_K rows (each inside one group) by BLOCK_N columns, every weight
    word loaded at once, before the program waits for the kernel that writes x (PDL). No loop."""
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    ROWS: tl.constexpr = CHUNK_K // PACK  # word rows per chunk
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    pid_k = tl.program_id(1)
    offs_n, mask_n, chunk_k, mask_c, word_row, words, scale, zero = _load_tile(
        qweight_ptr, scales_ptr, qzeros_ptr, N, K, group_size, BITS, ZERO_OFFSET, BLOCK_N, CHUNK_K, CHUNKS)
    # the half2 (1024 + z, 1024 + z) as bits, and with z << 4, for _dot8: built before the wait
    z1 = ((0x6400 | zero) * 0x10001)[:, None, :]
    z16 = ((0x6400 | (zero << 4)) * 0x10001)[:, None, :]
    if PDL:
        tl.extra.cuda.gdc_wait()
    k_row = word_row * PACK  # [C, R] first row of each word row
    if not DOT:
        dots = (words & 0xFF).to(tl.float32) + zero[:, None, :].to(tl.float32)
    elif ASM:
        xw = x_ptr.to(tl.pointer_type(tl.int32)) + k_row // 2
        x04, x15, x26, x37 = _x_pairs(tl.load(xw, mask=mask_c[:, None], other=0),
                                      tl.load(xw + 1, mask=mask_c[:, None], other=0),
                                      tl.load(xw + 2, mask=mask_c[:, None], other=0),
                                      tl.load(xw + 3, mask=mask_c[:, None], other=0))
        dots = _dot8(words, z1, z16, x04[:, :, None], x15[:, :, None], x26[:, :, None], x37[:, :, None])
    else:
        dots = tl.zeros((CHUNKS, ROWS, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(PACK):
            q = (words >> (j * BITS)) & MASK
            xj = tl.load(x_ptr + k_row + j, mask=mask_c[:, None], other=0.0).to(tl.float32)
            dots += xj[:, :, None] * (q - zero[:, None, :]).to(tl.float32)
    acc = tl.sum(tl.sum(dots, axis=1) * scale.to(tl.float32), axis=0)  # [BLOCK_N]
    if TAIL == 1:
        _store_columns(out_ptr, ws_ptr, acc, offs_n, mask_n, SPLIT_K)
    elif TAIL == 2:
        tl.store(ws_ptr.to(tl.pointer_type(tl.float32)) + pid_k * N + offs_n, acc, mask=mask_n)
    else:
        tl.atomic_add(ws_ptr + offs_n, acc.to(tl.int64), mask=mask_n, sem="relaxed")


@triton.jit
def _idot8(words, xeh, xoh, xel, xol):
    """sum_j q_j x_j over the 8 nibbles q_j of each word, x given as 16-bit integers split into bytes and packed
    four to a word: the even rows' (j = 0, 2, 4, 6) high bytes (signed) in xeh, the odd rows' in xoh, the low
    bytes (unsigned) in xel, xol. w & 0x0F0F0F0F holds the even nibbles one to a byte, (w >> 4) & 0x0F0F0F0F
    the odd ones; four dp4a and one multiply-add, exact in int32."""
    return tl.inline_asm_elementwise(
        asm="""
        {
        .reg .b32 e, o, h, l;
        and.b32 e, $1, 0x0F0F0F0F;
        shr.u32 o, $1, 4;
        and.b32 o, o, 0x0F0F0F0F;
        dp4a.u32.s32 h, e, $2, 0;
        dp4a.u32.s32 h, o, $3, h;
        dp4a.u32.u32 l, e, $4, 0;
        dp4a.u32.u32 l, o, $5, l;
        mad.lo.s32 $0, h, 256, l;
        }
        """,
        constraints="=r,r,r,r,r,r",
        args=[words, xeh, xoh, xel, xol],
        dtype=tl.int32,
        is_pure=True,
        pack=1,
    )


@triton.jit
def _pack_bytes(v, BYTE_SHIFT: tl.constexpr):
    """[C, R, 4] int32 -> [C, R]: byte BYTE_SHIFT / 8 of each, packed little-endian into one int32."""
    return tl.sum(((v >> BYTE_SHIFT) & 0xFF) << (tl.arange(0, 4) * 8)[None, None, :], axis=2)


@triton.jit
def _gptq_gemv_int_kernel(
    x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, out_ptr,
    ws_ptr,  # SPLIT_K > 1: int64 [N], zero (see _store_columns)
    N, K, group_size,  # contiguous groups; CHUNK_K divides group_size
    ZERO_OFFSET: tl.constexpr,
    BLOCK_N: tl.constexpr, CHUNK_K: tl.constexpr, CHUNKS: tl.constexpr, SPLIT_K: tl.constexpr,
    ASM: tl.constexpr,  # on a GPU: _idot8's dp4a; else the same integer sums in plain Triton
    PDL: tl.constexpr,
):
    """4-bit GEMV in integers: the tile of _gptq_gemv_tile_kernel, loaded the same way before the PDL wait, but
    x is rounded to 16-bit integers per chunk (x = step_c * x16, step_c = max |x| over the chunk / 32767) and
    the dot is integer: sum_k (q - z) x16 = sum_k q x16 - z sum_k x16, exact in int32, converted once per chunk
    and column. x16 carries 15 bits of each chunk's largest x, where fp16 carries 11 bits of every x."""
    ROWS: tl.constexpr = CHUNK_K // 8
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    offs_n, mask_n, chunk_k, mask_c, word_row, words, scale, zero = _load_tile(
        qweight_ptr, scales_ptr, qzeros_ptr, N, K, group_size, 4, ZERO_OFFSET, BLOCK_N, CHUNK_K, CHUNKS)
    if PDL:
        tl.extra.cuda.gdc_wait()
    xv = tl.load(x_ptr + chunk_k[:, None] + tl.arange(0, CHUNK_K)[None, :], mask=mask_c[:, None],
                 other=0.0).to(tl.float32)  # [C, CHUNK_K]
    amax = tl.max(tl.abs(xv), axis=1)  # [C]
    x16 = tl.floor(xv * tl.where(amax > 0, 32767.0 / tl.maximum(amax, 1e-30), 0.0)[:, None] + 0.5).to(tl.int32)
    x_sum = tl.sum(x16, axis=1)  # [C]
    if ASM:
        xe, xo = tl.split(tl.reshape(x16, (CHUNKS, ROWS, 4, 2)))  # [C, R, 4]: rows 8r + 2j and 8r + 2j + 1
        dots = _idot8(words, _pack_bytes(xe, 8)[:, :, None], _pack_bytes(xo, 8)[:, :, None],
                      _pack_bytes(xe, 0)[:, :, None], _pack_bytes(xo, 0)[:, :, None])  # [C, R, BLOCK_N]
    else:
        x8 = tl.reshape(x16, (CHUNKS, ROWS, 8))
        dots = tl.zeros((CHUNKS, ROWS, BLOCK_N), dtype=tl.int32)
        for j in tl.static_range(8):
            xj = tl.sum(tl.where(tl.arange(0, 8) == j, x8, 0), axis=2)  # [C, R]
            dots += ((words >> (4 * j)) & 15) * xj[:, :, None]
    exact = tl.sum(dots, axis=1) - zero * x_sum[:, None]  # [C, BLOCK_N]
    step = amax / 32767.0
    acc = tl.sum(exact.to(tl.float32) * step[:, None] * scale.to(tl.float32), axis=0)  # [BLOCK_N]
    _store_columns(out_ptr, ws_ptr, acc, offs_n, mask_n, SPLIT_K)


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
_WORKSPACES: dict[tuple, torch.Tensor] = {}  # see _gemv_workspace


def _time(fn) -> float:
    """Milliseconds per call replayed from a CUDA graph: the kernel's time without Python launch overhead,
    as in the graph-captured decode loop."""
    fn()  # compile outside the capture
    return triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")


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
            ms = _time(lambda: _run(cfg, x, qweight, scales, qzeros, g_idx, bits, zero_offset, group_size))
        except triton.runtime.errors.OutOfResources:
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    _TUNED[key] = best
    return best


DEQUANT_MIN_M = 128  # from here on, dequantize + cuBLAS beats the fused kernel (benchmarks/RESULTS.md)


# (BLOCK_N, BLOCK_K, SPLIT_K, warps) candidates for the looping GEMV, best guess first.
GEMV_SHAPES = [(128, 64, 16, 4), (64, 64, 16, 2), (256, 64, 16, 8), (64, 128, 8, 4), (128, 64, 8, 4), (32, 64, 8, 2),
               (64, 128, 4, 4), (128, 128, 2, 4), (64, 128, 1, 4), (32, 128, 1, 4), (64, 32, 16, 4), (128, 32, 8, 4),
               (128, 128, 8, 4), (256, 128, 4, 8), (128, 128, 4, 4)]
# (BLOCK_N, CHUNK_K, CHUNKS, warps) candidates for the one-tile GEMV (_gptq_gemv_tile_kernel).
TILE_SHAPES = [(128, 128, 2, 4), (512, 64, 1, 4), (256, 64, 2, 4), (512, 128, 1, 4), (256, 128, 2, 8),
               (128, 64, 4, 4), (64, 128, 2, 2), (64, 64, 2, 2), (128, 32, 8, 4), (256, 32, 4, 8)]
# (BLOCK_N, CHUNK_K, CHUNKS, warps) candidates for the integer GEMV (_gptq_gemv_int_kernel, 4-bit only).
INT_SHAPES = [(256, 128, 2, 8), (64, 128, 2, 2), (128, 64, 4, 4), (256, 64, 2, 4), (128, 32, 8, 4)]


def _gemv_configs(n: int, k: int, group_size: int, bits: int) -> list[dict]:
    """GEMV candidates whose K block divides the group size. 4-bit on a GPU: the TILE_SHAPES with the inline
    PTX dot and the INT_SHAPES with dp4a (inline asm the CPU interpreter cannot run), faster at every Llama
    shape than the rest (benchmarks/RESULTS.md). Else the looping GEMV_SHAPES with and without the fp16
    dequantization, then the TILE_SHAPES in fp32, then (4-bit) the INT_SHAPES in plain Triton integers."""
    asm = bits == 4 and not INTERPRET

    def tiled(shapes, kind):
        return [{kind: True, "BLOCK_N": bn, "CHUNK_K": ck, "CHUNKS": c, "num_warps": w, "ASM": asm}
                for bn, ck, c, w in shapes
                if group_size % ck == 0 and k % ck == 0 and triton.cdiv(k, ck * c) <= MAX_SPLIT_K]

    tiles = tiled(TILE_SHAPES, "TILE")
    ints = tiled(INT_SHAPES, "INT") if bits == 4 else []
    if asm:
        return tiles + ints
    loops = [{"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": w, "MAGIC": magic}
             for magic in (True, False) for bn, bk, sk, w in GEMV_SHAPES if group_size % bk == 0 and k % bk == 0]
    return loops + tiles + ints


def _gemv_workspace(n: int, device: torch.device) -> torch.Tensor:
    """The split-K workspace for N columns on ``device`` (see _store_columns), zero, shared by every GEMV of
    that width: each call leaves it zero and calls on a stream run one after another."""
    key = (n, device)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = torch.zeros(n, dtype=torch.int64, device=device)
    return _WORKSPACES[key]


def _run_gemv(cfg: dict, x, qweight, scales, qzeros, bits, zero_offset, group_size) -> torch.Tensor:
    k, n = x.shape[1], qweight.shape[1]
    tile, integer = cfg.get("TILE", False), cfg.get("INT", False)
    split = triton.cdiv(k, cfg["CHUNK_K"] * cfg["CHUNKS"]) if tile or integer else cfg["SPLIT_K"]
    out = torch.empty((1, n), device=x.device, dtype=x.dtype)
    if split > MAX_SPLIT_K:
        raise ValueError(f"K={k} splits into {split} parts, more than the workspace counts ({MAX_SPLIT_K})")
    ws = _gemv_workspace(n, x.device) if split > 1 else out
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), split)
    if tile or integer:
        pdl = x.is_cuda and not INTERPRET
        if tile and cfg["ASM"] and x.data_ptr() % 4:
            x = x.clone()  # _x_pairs reads x as int32 pairs: a view starting mid-pair gets its own copy
        kernel, bits_arg = (_gptq_gemv_int_kernel, {}) if integer else (_gptq_gemv_tile_kernel, {"BITS": bits})
        kernel[grid](x, qweight, scales, qzeros, out, ws, n, k, group_size, ZERO_OFFSET=zero_offset,
                     BLOCK_N=cfg["BLOCK_N"], CHUNK_K=cfg["CHUNK_K"], CHUNKS=cfg["CHUNKS"], SPLIT_K=split, ASM=cfg["ASM"],
                     PDL=pdl, num_warps=cfg["num_warps"], **bits_arg, **({"launch_pdl": True} if pdl else {}))
        return out
    _gptq_gemv_kernel[grid](x, qweight, scales, qzeros, out, ws, n, k, group_size, BITS=bits,
                            ZERO_OFFSET=zero_offset, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], SPLIT_K=split,
                            MAGIC=cfg["MAGIC"], num_warps=cfg["num_warps"])
    return out


def gptq_gemv(x, qweight, scales, qzeros, bits: int, zero_offset: int, group_size: int) -> torch.Tensor:
    """``x @ W`` for one fp16 row ``x`` ``[1, K]``, groups contiguous runs of ``group_size`` rows."""
    out = _gemv(x, qweight, scales, qzeros, bits, zero_offset, group_size)
    if out is None:
        raise ValueError(f"no GEMV configuration tiles group size {group_size} and K={x.shape[1]}")
    return out


def _gemv(x, qweight, scales, qzeros, bits, zero_offset, group_size) -> torch.Tensor | None:
    k, n = x.shape[1], qweight.shape[1]
    key = ("gemv", n, k, bits, group_size)
    cfg = _TUNED.get(key)
    if cfg is None:
        candidates = _gemv_configs(n, k, group_size, bits)
        if not candidates:
            return None
        cfg = candidates[0]
        if x.is_cuda and AUTOTUNE and not INTERPRET:
            timings = []
            for c in candidates:
                try:
                    timings.append((_time(
                        lambda: _run_gemv(c, x, qweight, scales, qzeros, bits, zero_offset, group_size)), len(timings), c))
                except triton.runtime.errors.OutOfResources:
                    continue
            cfg = min(timings)[2]
        _TUNED[key] = cfg
    return _run_gemv(cfg, x, qweight, scales, qzeros, bits, zero_offset, group_size)


def gptq_dequantize(qweight, scales, qzeros, g_idx, bits: int, zero_offset: int, group_size: int) -> torch.Tensor:
    """The fp16 ``[K, N]`` weight; ``group_size`` as in gptq_matmul."""
    k, n = qweight.shape[0] * (32 // bits), qweight.shape[1]
    block_k = 32 if group_size <= 0 else min(64, group_size)
    w = torch.empty((k, n), device=qweight.device, dtype=torch.float16)
    g = g_idx if g_idx is not None else qweight
    grid = (k // block_k, triton.cdiv(n, 128))
    _gptq_dequant_kernel[grid](qweight, scales, qzeros, g, w, n, k, group_size, BITS=bits, ZERO_OFFSET=zero_offset,
                               CONTIGUOUS=group_size > 0, BLOCK_N=128, BLOCK_K=block_k, num_warps=4)
    return w


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
    if x.shape[0] >= DEQUANT_MIN_M:
        return x @ gptq_dequantize(qweight, scales, qzeros, g_idx, bits, zero_offset, group_size)
    if x.shape[0] == 1 and group_size > 0 and x.is_contiguous():
        out = _gemv(x, qweight, scales, qzeros, bits, zero_offset, group_size)
        if out is not None:
            return out
    g = g_idx if g_idx is not None else qweight  # unused pointer when group_size > 0
    cfg = _tuned_config(x, qweight, scales, qzeros, g, bits, zero_offset, group_size)
    return _run(cfg, x, qweight, scales, qzeros, g, bits, zero_offset, group_size)

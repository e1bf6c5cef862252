"""The Triton GEMV: ``y[1, N] = x[1, K] @ W`` for one decoded token, groups contiguous runs.

Three kernels, one launch per call; the tuner (tuning.py) picks one and its tile by timing them:
- ``tile`` (4-bit on a GPU: the fastest at Llama shapes): each program one tile of whole groups by a column
  block, all its words loaded at once before it waits for the kernel that writes x (programmatic dependent
  launch), the nibbles unpacked and multiplied with x in half2 inline PTX (_dot8); plain Triton in fp32
  elsewhere (the CPU interpreter);
- ``int`` (4-bit): the same tile with x rounded to 16-bit integers per chunk and the dot in dp4a (_idot8);
- ``loop``: a kernel that loops over K (8-bit, and the interpreter).
K is split across programs; each adds its partial sums and a count to an int64 per column in one atomic, and
the program that completes a column writes it (_store_columns).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_gptq.weight import INTERPRET, PackedWeight

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
    x_ptr, qweight_ptr, scales_ptr, qzeros_ptr, out_ptr, ws_ptr, N, K, group_size,  # as the tile kernel's
    BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
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
def load_tile(qweight_ptr, scales_ptr, qzeros_ptr, N, K, group_size, BITS: tl.constexpr, ZERO_OFFSET: tl.constexpr,
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
):
    """One program: CHUNKS chunks of CHUNK_K rows (each inside one group) by BLOCK_N columns, every weight
    word loaded at once, before the program waits for the kernel that writes x (PDL). No loop."""
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    ROWS: tl.constexpr = CHUNK_K // PACK  # word rows per chunk
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    offs_n, mask_n, chunk_k, mask_c, word_row, words, scale, zero = load_tile(
        qweight_ptr, scales_ptr, qzeros_ptr, N, K, group_size, BITS, ZERO_OFFSET, BLOCK_N, CHUNK_K, CHUNKS)
    # the half2 (1024 + z, 1024 + z) as bits, and with z << 4, for _dot8: built before the wait
    z1 = ((0x6400 | zero) * 0x10001)[:, None, :]
    z16 = ((0x6400 | (zero << 4)) * 0x10001)[:, None, :]
    if PDL:
        tl.extra.cuda.gdc_wait()
    k_row = word_row * PACK  # [C, R] first row of each word row
    if ASM:
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
    _store_columns(out_ptr, ws_ptr, acc, offs_n, mask_n, SPLIT_K)


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
    offs_n, mask_n, chunk_k, mask_c, word_row, words, scale, zero = load_tile(
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


_WORKSPACES: dict[tuple, torch.Tensor] = {}


def gemv_workspace(n: int, device: torch.device) -> torch.Tensor:
    """The split-K workspace for N columns on ``device`` (see _store_columns), zero, shared by every GEMV of
    that width: each call leaves it zero and calls on a stream run one after another."""
    key = (n, device)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = torch.zeros(n, dtype=torch.int64, device=device)
    return _WORKSPACES[key]


def gemv_split(kernel: str, k: int, block_k: int, chunks: int, split_k: int) -> int:
    """How many programs share K: the tile kernels cover ``block_k * chunks`` rows each, the loop ``split_k``."""
    return triton.cdiv(k, block_k * chunks) if kernel in ("tile", "int") else split_k


def run_gemv(kernel: str, x: torch.Tensor, w: PackedWeight, *, block_n: int, block_k: int, chunks: int,
             split_k: int, num_warps: int, asm: bool, magic: bool) -> torch.Tensor:
    """One launch of GEMV ``kernel`` ("tile", "int" or "loop") on fp16 ``x`` ``[1, K]`` with contiguous
    groups; ``block_k`` is the loop's BLOCK_K or the tiles' CHUNK_K."""
    k, n = x.shape[1], w.n
    split = gemv_split(kernel, k, block_k, chunks, split_k)
    out = torch.empty((1, n), device=x.device, dtype=x.dtype)
    if split > MAX_SPLIT_K:
        raise ValueError(f"K={k} splits into {split} parts, more than the workspace counts ({MAX_SPLIT_K})")
    ws = gemv_workspace(n, x.device) if split > 1 else out
    grid = (triton.cdiv(n, block_n), split)
    args = (x, w.qweight, w.scales, w.qzeros, out, ws, n, k, w.group_size)
    if kernel == "loop":
        _gptq_gemv_kernel[grid](*args, BITS=w.bits, ZERO_OFFSET=w.zero_offset, BLOCK_N=block_n, BLOCK_K=block_k,
                                SPLIT_K=split, MAGIC=magic, num_warps=num_warps)
        return out
    pdl = x.is_cuda and not INTERPRET
    launch = {"launch_pdl": True} if pdl else {}
    if kernel == "tile":
        if asm and x.data_ptr() % 4:
            x = x.clone()  # _x_pairs reads x as int32 pairs: a view starting mid-pair gets its own copy
            args = (x, *args[1:])
        _gptq_gemv_tile_kernel[grid](*args, BITS=w.bits, ZERO_OFFSET=w.zero_offset, BLOCK_N=block_n, CHUNK_K=block_k,
                                     CHUNKS=chunks, SPLIT_K=split, ASM=asm, PDL=pdl, num_warps=num_warps, **launch)
    else:
        _gptq_gemv_int_kernel[grid](*args, ZERO_OFFSET=w.zero_offset, BLOCK_N=block_n, CHUNK_K=block_k,
                                    CHUNKS=chunks, SPLIT_K=split, ASM=asm, PDL=pdl, num_warps=num_warps, **launch)
    return out

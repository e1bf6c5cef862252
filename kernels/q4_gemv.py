"""The CUDA 4-bit GEMV (q4_gemv.cu), built and loaded by kernels.cuda_lib, called through ctypes."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

import torch

from kernels import cuda_lib
from kernels.timing import Tuner

MAX_ROWS = 4
TILE_N = 128  # columns per block, as in the source
STORE, ADD, SILU_MUL, SUMS = 0, 1, 2, 3  # epilogues
X_PLAIN, RESIDUAL_SUMS, GLU_SUMS = 0, 1, 2  # where the rows x come from
# (warps per block, K rows per warp, chunks in flight per warp) candidates, the default first; the kernel
# is compiled for 4 and 8 warps and depths 2 and 4.
CONFIGS = tuple((w, r, d) for d in (2, 4) for w, r in ((4, 128), (8, 128), (4, 256), (8, 256), (4, 512), (8, 64),
                                                    (4, 64)))


class _Args(ctypes.Structure):  # struct Q4GemvArgs in q4_gemv.cu
    _fields_ = [(name, ctypes.c_void_p) for name in
                ("x", "qweight", "scales", "qzeros", "out", "residual", "ws", "counters", "perm", "norm_weight",
                 "x_sums", "x_out", "zero0", "zero1")] + \
               [(name, ctypes.c_int) for name in ("N", "K", "group_size", "zero_offset", "epilogue", "rows_per_warp",
                                                  "x_mode", "zero0_n", "zero1_n")] + \
               [("norm_eps", ctypes.c_float)]


class Workspace:
    """The fp32 partial sums and arrival counters of one layer; the kernel leaves both zero (except a call with
    ``sums=True``, whose result the sums then hold until a later kernel zeroes them)."""

    def __init__(self, n: int, device: torch.device):
        self.sums = torch.zeros((MAX_ROWS, n), dtype=torch.float32, device=device)
        self.counters = torch.zeros(-(-n // TILE_N), dtype=torch.int32, device=device)


def supports(n: int, k: int, group_size: int) -> bool:
    return n % 8 == 0 and k % 32 == 0 and group_size > 0 and group_size % 32 == 0


def interleave_glu(t: torch.Tensor, per_word: int = 1) -> torch.Tensor:
    """Columns [gate | up] (standard GPTQ layout) -> gate tile 0, up tile 0, gate tile 1, ... as the
    SILU_MUL epilogue reads them. ``per_word``: columns per stored element (8 for packed qzeros)."""
    tile = TILE_N // per_word
    half = t.shape[1] // 2
    if half % tile:
        raise ValueError(f"{half * per_word} gate columns are not a multiple of {TILE_N}")
    gate = t[:, :half].reshape(t.shape[0], -1, tile)
    up = t[:, half:].reshape(t.shape[0], -1, tile)
    return torch.stack((gate, up), dim=2).reshape(t.shape[0], -1).contiguous()


def fits(config: tuple[int, int, int], m: int) -> bool:
    """Whether ``m`` rows fit the configuration's shared memory."""
    warps, rows, _ = config
    return m * warps * rows <= 16384  # the x rows staged in shared memory: 32 KB


# Timed as in a decode step (kernels.timing); GPTQ_CUDA_AUTOTUNE=0 takes the first configuration.
TUNER: Tuner[tuple[int, int, int]] = Tuner(timed=os.environ.get("GPTQ_CUDA_AUTOTUNE", "1") != "0")


def q4_gemv(x: torch.Tensor | None, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor,
            zero_offset: int, group_size: int, workspace: Workspace, *, residual: torch.Tensor | None = None,
            silu_mul: bool = False, sums: bool = False, perm: torch.Tensor | None = None,
            norm: tuple[torch.Tensor, float] | None = None, x_sums: torch.Tensor | None = None,
            x_out: torch.Tensor | None = None, glu_sums: torch.Tensor | None = None,
            zero: tuple[torch.Tensor, ...] = (), follows: Callable[[], object] | None = None,
            config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``x @ W`` for 1..4 fp16 rows; with ``residual``: ``residual + x @ W``; with ``silu_mul``: the
    columns are gate and up tiles of 128 interleaved (gate tile t at 2t, up at 2t + 1) and the result is
    ``silu(gate) * up``, ``[M, N / 2]``. With ``sums``: the fp32 ``x @ W`` is left in ``workspace.sums[:M]``
    (returned) without the kernel's finishing tail; a later kernel reads it and one zeroes it (``zero``).

    The rows: ``x``, or with ``x_sums`` (fp32 ``[M, K]``) ``x + x_sums`` rounded to fp16 (``x_out`` fp16
    ``[M, K]`` receives them; it needs ``norm``), or with ``glu_sums`` (a ``silu_mul`` layer's fp32 sums,
    ``[M, 2K]``) ``silu(gate) * up`` rounded to fp16, and ``x`` None. ``perm``: int32 ``[K]``, row k of W
    multiplies ``x[:, perm[k]]`` (act-order rows sorted by group, the gather done while x is staged).
    ``norm``: (weight ``[K]`` fp16, eps): the rows are RMS-normalized first, ``x * rsqrt(mean(x^2) + eps) *
    weight`` (fp32, rounded to fp16 as RMSNorm's output is), inside the kernel. ``zero``: up to two fp32
    tensors the kernel zeroes (after the previous kernel in the stream has finished). ``follows``: for the
    tuner (see kernels.timing.Tuner), the kernel this call follows, if it can be launched again. ``config``:
    (warps, rows per warp, depth), else the tuned one."""
    source = glu_sums if glu_sums is not None else x
    m, k = source.shape[0], source.shape[1] // (2 if glu_sums is not None else 1)
    n = qweight.shape[1]
    device = qweight.device
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"the GEMV takes 1 to {MAX_ROWS} rows, not {m}")
    if glu_sums is not None:
        if x is not None or x_sums is not None or norm is not None:
            raise ValueError("glu_sums is the whole input: no x, x_sums or norm with it")
        _check(glu_sums, torch.float32, (m, 2 * k), "glu_sums")
        if k % TILE_N:
            raise ValueError(f"glu_sums need K a multiple of {TILE_N}")
    elif x.dtype != torch.float16 or not x.is_contiguous():
        raise ValueError("x must be contiguous float16")
    if x_sums is not None:
        _check(x_sums, torch.float32, (m, k), "x_sums")
    if x_out is not None:
        if x_sums is None or norm is None:
            raise ValueError("x_out takes x + x_sums, and only with norm")
        _check(x_out, torch.float16, (m, k), "x_out")
    if len(zero) > 2 or any(z.dtype != torch.float32 or not z.is_contiguous() or z.numel() % 4 or z.data_ptr() % 16
                            for z in zero):
        raise ValueError("zero takes up to two contiguous float32 tensors of a multiple of 4 elements")
    if sums + silu_mul + (residual is not None) > 1:
        raise ValueError("one epilogue: residual, silu_mul or sums")
    epilogue = SUMS if sums else SILU_MUL if silu_mul else ADD if residual is not None else STORE
    x_mode = GLU_SUMS if glu_sums is not None else RESIDUAL_SUMS if x_sums is not None else X_PLAIN
    out = workspace.sums[:m, :n] if sums else torch.empty((m, n // 2 if silu_mul else n), dtype=torch.float16,
                                                          device=device)
    if residual is not None:
        residual = residual.reshape(m, n)
        if residual.dtype != torch.float16 or not residual.is_contiguous():
            raise ValueError("residual must be contiguous float16")
    if perm is not None and (perm.dtype != torch.int32 or perm.shape != (k,) or not perm.is_contiguous()):
        raise ValueError("perm must be a contiguous int32 tensor of K entries")
    if norm is not None and (norm[0].dtype != torch.float16 or norm[0].shape != (k,) or not norm[0].is_contiguous()):
        raise ValueError("the norm weight must be a contiguous float16 tensor of K entries")
    if norm is not None and x.data_ptr() % 16:
        x = x.clone()  # the norm's row sums read x 16 bytes at a time
    lib = cuda_lib.library(cuda_lib.arch_of(device))
    use_pdl = cuda_lib.pdl_default(device)
    norm_weight, norm_eps = norm if norm is not None else (None, 0.0)
    zeros = [(z.data_ptr(), z.numel()) for z in zero] + [(None, 0)] * (2 - len(zero))

    def ptr(t: torch.Tensor | None) -> int | None:
        return t.data_ptr() if t is not None else None

    def run(cfg: tuple[int, int, int], weights: tuple[torch.Tensor, ...], final: bool = False) -> int:
        """One launch; it zeroes ``zero`` only as the real (final) call, not as the tuner's: a ``follows``
        kernel timed before it may read them."""
        warps, rows, depth = cfg
        qw, sc, qz = weights
        z_ptrs, z_sizes = zip(*(zeros if final else [(None, 0)] * 2))
        args = _Args(ptr(x), qw.data_ptr(), sc.data_ptr(), qz.data_ptr(), ptr(out), ptr(residual),
                     workspace.sums.data_ptr(), workspace.counters.data_ptr(), ptr(perm), ptr(norm_weight),
                     ptr(glu_sums if glu_sums is not None else x_sums), ptr(x_out), *z_ptrs,
                     n, k, group_size, zero_offset, epilogue, rows, x_mode, *z_sizes, norm_eps)
        stream = torch.cuda.current_stream(device).cuda_stream
        return lib.q4_gemv(ctypes.byref(args), m, warps, depth, int(use_pdl), stream)

    what = f"q4_gemv (M={m} N={n} K={k} group_size={group_size})"
    if not supports(n, k, group_size):
        cuda_lib.check(-1, what)
    if config is not None and not fits(config, m):
        raise ValueError(f"configuration {config} does not fit {m} rows")
    weights = (qweight, scales, qzeros)
    if config is None:
        key = (m, n, k, norm is not None, x_mode, sums, follows is not None)
        tuned = key in TUNER.best
        config = TUNER.pick(key, [c for c in CONFIGS if fits(c, m)], lambda c, w: run(c, w) == 0, weights, follows)
        if sums and not tuned:
            workspace.sums.zero_()  # the timed calls added into it
    rc = run(config, weights, final=True)
    cuda_lib.check(rc, what)
    return out


def _check(t: torch.Tensor, dtype: torch.dtype, shape: tuple[int, int], name: str) -> None:
    if t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous {dtype} {list(shape)}, not {t.dtype} {list(t.shape)}")

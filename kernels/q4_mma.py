"""The CUDA 4-bit tensor-core matmul for a few rows (q4_mma.cu), built and loaded by kernels.cuda_lib, called
through ctypes. It reads the same GPTQ tensors as the GEMV (kernels.q4_gemv): no second copy of the weights."""

from __future__ import annotations

import ctypes
import os

import torch

from kernels import cuda_lib
from kernels.timing import Tuner

MAX_ROWS = 64
STEP = 32  # rows of K per step, as in the source
SMEM_LIMIT = 100 * 1024  # two blocks per SM


class _Args(ctypes.Structure):  # struct Q4MmaArgs in q4_mma.cu
    _fields_ = [(name, ctypes.c_void_p) for name in ("x", "qweight", "scales", "qzeros", "perm", "out", "ws",
                                                     "counters")] + \
               [(name, ctypes.c_int) for name in ("M", "N", "K", "group_size", "zero_offset", "steps_per_block",
                                                  "warps_n", "prefetch")]


def padded_rows(m: int) -> int:
    """The rows the kernel computes for ``m``: 8, 16, 32 or 64 (its template instances)."""
    tiles = -(-m // 8)
    return 8 * (1 if tiles == 1 else 2 if tiles == 2 else 4 if tiles <= 4 else 8)


def supports(n: int, k: int, group_size: int) -> bool:
    return n % 8 == 0 and k % STEP == 0 and group_size > 0 and group_size % STEP == 0


class _Scratch:
    """The split-K sums and arrival counters of one device. Kernels of one stream run one after another,
    and each leaves both zero, so every layer shares them. A larger need allocates anew
    and keeps the old buffers alive, since a captured CUDA graph holds their addresses."""

    def __init__(self):
        self.sums: dict[torch.device, torch.Tensor] = {}
        self.counters: dict[torch.device, torch.Tensor] = {}
        self.kept: list[torch.Tensor] = []

    def get(self, device: torch.device, floats: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
        sums, counters = self.sums.get(device), self.counters.get(device)
        if torch.cuda.is_current_stream_capturing() and (sums is None or sums.numel() < floats or
                                                          counters is None or counters.numel() < tiles):
            # memory taken inside a capture belongs to the graph's pool: run the call once before capturing
            raise RuntimeError("q4_mma's workspace must exist before graph capture (run the call eagerly first)")
        if sums is None or sums.numel() < floats:
            if sums is not None:
                self.kept.append(sums)
            sums = self.sums[device] = torch.zeros(max(floats, 1 << 20), dtype=torch.float32, device=device)
        if counters is None or counters.numel() < tiles:
            if counters is not None:
                self.kept.append(counters)
            counters = self.counters[device] = torch.zeros(max(tiles, 4096), dtype=torch.int32, device=device)
        return sums, counters


SCRATCH = _Scratch()


def smem_bytes(rows: int, cols: int, steps_per_block: int) -> int:
    """The dynamic shared memory of a launch, as the library computes it (on the current GPU's build)."""
    lib = cuda_lib.library(cuda_lib.arch_of(torch.device("cuda", torch.cuda.current_device())))
    return lib.q4_mma_smem_bytes(rows, cols, steps_per_block)


# (columns per warp, steps in flight per warp, steps of K per block, warps_n, steps ahead of the loads that
# the weights are prefetched into L2 or 0 for none)
Config = tuple[int, int, int, int, int]
PREFETCH = 12  # steps: 7B gate+up fused at 16 rows 40.0 -> 36.6 µs, at 64 rows 115.6 -> 110.1 (H200, 2026-12-02)


def candidates(m: int, n: int, k: int, sms: int) -> list[Config]:
    """Launch configurations that fit, a heuristic default first: about two blocks per SM, 64 columns per
    warp where the accumulators allow it. Each prefetches PREFETCH steps ahead; :func:`q4_mma` then also
    times the tuned one without."""
    rows = padded_rows(m)
    steps = k // STEP
    col_options = (64, 32) if rows <= 32 else (32,)
    split_options = sorted({-(-steps // s) for s in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)})
    out = []
    for warps_n in (1, 2, 4):
        for cols in col_options:
            for per_block in split_options:
                if smem_bytes(rows, cols, per_block) > SMEM_LIMIT:
                    continue
                for depth in (4, 2, 8):
                    out.append((cols, depth, per_block, warps_n, PREFETCH))
    if not out:
        return out

    def blocks(c: Config) -> int:
        return -(-n // (c[0] * c[3])) * -(-steps // c[2])

    default = min(out, key=lambda c: (abs(blocks(c) - 2 * sms), c[0] != col_options[0], c[1] != 4))
    return [default] + [c for c in out if c != default]


TUNER: Tuner[Config] = Tuner(timed=os.environ.get("GPTQ_CUDA_AUTOTUNE", "1") != "0")


def tuner_key(m: int, n: int, k: int, group_size: int, act_order: bool) -> tuple:
    """The key of :data:`TUNER` under which a call's configuration is tuned and kept."""
    return padded_rows(m), n, k, group_size, act_order


def q4_mma(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, zero_offset: int,
           group_size: int, perm: torch.Tensor | None = None,
           config: Config | None = None) -> torch.Tensor:
    """``x @ W`` for 1..64 fp16 rows ``[M, K]`` on tensor cores, fp16 ``[M, N]``. ``perm``: int32 ``[K]``,
    row k of W multiplies ``x[:, perm[k]]`` (act-order rows sorted by group; the gather is done while x is
    staged). ``config``: see :data:`Config`, else the tuned one."""
    m, k = x.shape
    n = qweight.shape[1]
    device = qweight.device
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"the tensor-core matmul takes 1 to {MAX_ROWS} rows, not {m}")
    if x.dtype != torch.float16 or not x.is_contiguous():
        raise ValueError("x must be contiguous float16")
    if x.data_ptr() % 16:
        x = x.clone()  # staged 16 bytes at a time
    if perm is not None and (perm.dtype != torch.int32 or perm.shape != (k,) or not perm.is_contiguous()):
        raise ValueError("perm must be a contiguous int32 tensor of K entries")
    what = f"q4_mma (M={m} N={n} K={k} group_size={group_size})"
    if not supports(n, k, group_size) or qweight.shape[0] * 8 != k:
        cuda_lib.check(-1, what)
    out = torch.empty((m, n), dtype=torch.float16, device=device)
    lib = cuda_lib.library(cuda_lib.arch_of(device))
    use_pdl = cuda_lib.pdl_default(device)
    steps = k // STEP

    def run(cfg: Config, weights: tuple[torch.Tensor, ...]) -> bool:
        cols, depth, per_block, warps_n, prefetch = cfg
        splits = -(-steps // per_block)
        sums, counters = SCRATCH.get(device, m * n if splits > 1 else 0, -(-n // (cols * warps_n)))
        qw, sc, qz = weights
        args = _Args(x.data_ptr(), qw.data_ptr(), sc.data_ptr(), qz.data_ptr(),
                     perm.data_ptr() if perm is not None else None, out.data_ptr(), sums.data_ptr(),
                     counters.data_ptr(), m, n, k, group_size, zero_offset, per_block, warps_n, prefetch)
        stream = torch.cuda.current_stream(device).cuda_stream
        rc = lib.q4_mma(ctypes.byref(args), cols, depth, int(use_pdl), stream)
        if rc == -1:
            return False
        cuda_lib.check(rc, what)
        return True

    weights = (qweight, scales, qzeros)
    if config is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        key = tuner_key(m, n, k, group_size, perm is not None)
        config = TUNER.best.get(key)  # (known: no candidates to list)
        if config is None:
            tuned = TUNER.pick(key + ("with prefetch",), candidates(m, n, k, sms), run, weights)
            config = TUNER.pick(key, [tuned, (*tuned[:4], 0)], run, weights)
    if not run(config, weights):
        cuda_lib.check(-1, f"{what} with configuration {config}")
    return out

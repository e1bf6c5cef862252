"""The CUDA 4-bit GEMV (q4_gemv.cu): built with nvcc on first use, called through ctypes.

The library is compiled once per source version and GPU architecture into
``$GPTQ_WB_CACHE/cuda`` (default ``~/.cache/gptq-workbench/cuda``) and
loaded from there afterwards. It needs no torch headers and no ninja, only
nvcc; where nvcc is missing or the build fails, :func:`unavailable_reason`
says why and the callers fall back to the Triton GEMV.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("q4_gemv.cu")
MAX_ROWS = 4
TILE_N = 128  # columns per block, as in the source
STORE, ADD, SILU_MUL = 0, 1, 2
# (warps per block, K rows per warp, chunks in flight per warp) candidates, the default first; the kernel
# is compiled for 4 and 8 warps and depths 2 and 4.
CONFIGS = tuple((w, r, d) for d in (2, 4) for w, r in ((4, 128), (8, 128), (4, 256), (8, 256), (4, 512), (8, 64),
                                                    (4, 64)))
# Programmatic dependent launch (Hopper and later): a GEMV's weight loads overlap the previous kernel's tail.
PDL = os.environ.get("GPTQ_CUDA_PDL", "1") != "0"


class _Args(ctypes.Structure):  # struct Q4GemvArgs in q4_gemv.cu
    _fields_ = [(name, ctypes.c_void_p) for name in
                ("x", "qweight", "scales", "qzeros", "out", "residual", "ws", "counters", "perm")] + \
               [(name, ctypes.c_int) for name in ("N", "K", "group_size", "zero_offset", "epilogue", "rows_per_warp")]


class BuildError(RuntimeError):
    """nvcc is missing or could not build the kernel."""


def cache_dir() -> Path:
    root = os.environ.get("GPTQ_WB_CACHE") or Path.home() / ".cache" / "gptq-workbench"
    return Path(root) / "cuda"


def find_nvcc() -> str | None:
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    try:
        from torch.utils.cpp_extension import CUDA_HOME

        candidates.append(CUDA_HOME)
    except Exception:  # noqa: BLE001 - torch without its extension helpers
        pass
    for home in filter(None, candidates):
        nvcc = Path(home) / "bin" / "nvcc"
        if nvcc.is_file():
            return str(nvcc)
    return shutil.which("nvcc") or (str(p) if (p := Path("/usr/local/cuda/bin/nvcc")).is_file() else None)


@functools.cache
def library(arch: str, defines: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The built library for compute capability ``arch`` (e.g. "90"), compiling it if needed.

    ``defines``: preprocessor macros, for benchmark variants of the kernel."""
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + arch.encode() + repr(defines).encode()).hexdigest()[:16]
    target = cache_dir() / f"q4_gemv-sm{arch}-{digest}.so"
    if not target.is_file():
        nvcc = find_nvcc()
        if nvcc is None:
            raise BuildError("nvcc (the CUDA compiler) was not found; set CUDA_HOME")
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            cmd = [nvcc, "-O3", "-shared", "-Xcompiler", "-fPIC", "-std=c++17", *(f"-D{d}" for d in defines),
                   f"-gencode=arch=compute_{arch},code=sm_{arch}", "-o", str(built), str(SOURCE)]
            try:
                result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise BuildError(f"nvcc failed to run: {exc}") from exc
            if result.returncode != 0:
                raise BuildError(f"nvcc could not build {SOURCE.name}: {result.stderr.strip()[-2000:]}")
            os.replace(built, target)  # atomic: a concurrent or interrupted build leaves no broken library
    lib = ctypes.CDLL(str(target))
    lib.q4_gemv.restype = ctypes.c_int
    lib.q4_gemv.argtypes = [ctypes.POINTER(_Args)] + [ctypes.c_int] * 4 + [ctypes.c_void_p]
    return lib


def arch_of(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}{minor}"


def unavailable_reason(device: torch.device) -> str | None:
    """Why the CUDA GEMV cannot run on ``device``, or None (building it if that has not happened yet)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return "it needs a CUDA GPU"
    try:
        library(arch_of(device))
    except (BuildError, OSError) as exc:
        return str(exc)
    return None


class Workspace:
    """The fp32 partial sums and arrival counters of one layer; the kernel leaves both zero."""

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


def _fits(config: tuple[int, int, int], m: int) -> bool:
    warps, rows, _ = config
    return m * warps * rows <= 16384  # the x rows staged in shared memory: 32 KB


def _graph_us(fn, calls: int = 20) -> float:
    """Microseconds per call, `calls` calls captured in a CUDA graph (no launch overhead) and replayed."""
    fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


class Tuner:
    """The fastest launch configuration per (M, N, K), timed once on first use outside a graph capture."""

    def __init__(self):
        self.best: dict[tuple[int, int, int], tuple[int, int, int]] = {}

    def config(self, m: int, n: int, k: int, run) -> tuple[int, int, int]:
        key = (m, n, k)
        if key in self.best:
            return self.best[key]
        candidates = [c for c in CONFIGS if _fits(c, m)]
        if torch.cuda.is_current_stream_capturing() or os.environ.get("GPTQ_CUDA_AUTOTUNE", "1") == "0":
            return candidates[0]

        def timing(c: tuple[int, int, int]) -> float:
            if run(c) != 0:  # refused (nothing launched): an empty graph would time as free
                return float("inf")
            return _graph_us(lambda: run(c))

        self.best[key] = min(candidates, key=timing)
        return self.best[key]


TUNER = Tuner()


def q4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, qzeros: torch.Tensor, zero_offset: int,
            group_size: int, workspace: Workspace, *, residual: torch.Tensor | None = None,
            silu_mul: bool = False, perm: torch.Tensor | None = None, config: tuple[int, int, int] | None = None,
            lib: ctypes.CDLL | None = None, pdl: bool | None = None) -> torch.Tensor:
    """``x @ W`` for 1..4 fp16 rows; with ``residual``: ``residual + x @ W``; with ``silu_mul``: the
    columns are gate and up tiles of 128 interleaved (gate tile t at 2t, up at 2t + 1) and the result is
    ``silu(gate) * up``, ``[M, N / 2]``. ``perm``: int32 ``[K]``, row k of W multiplies ``x[:, perm[k]]``
    (act-order rows sorted by group, the gather done while x is staged). ``config``: (warps, rows per
    warp, depth), else the tuned one. ``lib`` and ``pdl``: a variant library and launch mode (benchmarks)."""
    m, k = x.shape
    n = qweight.shape[1]
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"the GEMV takes 1 to {MAX_ROWS} rows, not {m}")
    if x.dtype != torch.float16 or not x.is_contiguous():
        raise ValueError("x must be contiguous float16")
    out = torch.empty((m, n // 2 if silu_mul else n), dtype=torch.float16, device=x.device)
    epilogue = SILU_MUL if silu_mul else ADD if residual is not None else STORE
    if residual is not None:
        residual = residual.reshape(m, n)
        if residual.dtype != torch.float16 or not residual.is_contiguous():
            raise ValueError("residual must be contiguous float16")
    if perm is not None and (perm.dtype != torch.int32 or perm.shape != (k,) or not perm.is_contiguous()):
        raise ValueError("perm must be a contiguous int32 tensor of K entries")
    lib = lib or library(arch_of(x.device))

    use_pdl = PDL and torch.cuda.get_device_capability(x.device)[0] >= 9 if pdl is None else pdl

    def run(cfg: tuple[int, int, int]) -> int:
        warps, rows, depth = cfg
        args = _Args(x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), qzeros.data_ptr(), out.data_ptr(),
                     residual.data_ptr() if residual is not None else None, workspace.sums.data_ptr(),
                     workspace.counters.data_ptr(), perm.data_ptr() if perm is not None else None,
                     n, k, group_size, zero_offset, epilogue, rows)
        stream = torch.cuda.current_stream(x.device).cuda_stream
        return lib.q4_gemv(ctypes.byref(args), m, warps, depth, int(use_pdl), stream)

    if config is not None and not _fits(config, m):
        raise ValueError(f"configuration {config} does not fit {m} rows")
    rc = run(config or TUNER.config(m, n, k, run))
    if rc != 0:
        raise RuntimeError(f"q4_gemv failed ({'unsupported shape' if rc == -1 else f'CUDA error {rc}'}): "
                           f"M={m} N={n} K={k} group_size={group_size}")
    return out

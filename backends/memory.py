"""Memory: what a model will need before it is loaded, and freed memory handed back during a CPU load."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from backends.model_config import ModelArgs
from backends.quant_config import QuantConfig


@functools.cache
def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_freed_memory() -> None:
    """glibc's malloc_trim: a load's transient buffers (a layer unpacked to int32 before packing) are freed,
    but glibc keeps the pages for later allocations, so the process stays several layers larger than its
    tensors (a 24-layer test model: 197-235 MB resident for 74 MB of tensors, 75 MB after trimming). A no-op
    where the C library has no malloc_trim."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


@dataclass(frozen=True)
class MemoryNeed:
    """What a model takes once loaded with a backend: its weights as that backend keeps them, and the KV cache."""

    weights: int
    kv_cache: int
    device: torch.device

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache

    @property
    def kind(self) -> str:
        return "GPU memory" if self.device.type == "cuda" else "RAM"

    def describe(self) -> str:
        return (f"about {gigabytes(self.total)} of {self.kind} ({gigabytes(self.weights)} weights + "
                f"{gigabytes(self.kv_cache)} KV cache)")


def gigabytes(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def stored_tensors(files: tuple[Path, ...]) -> dict[str, tuple[tuple[int, ...], int]]:
    """Each tensor's shape and element size, from the safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    sizes = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    found = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                found[name] = (tuple(piece.get_shape()), sizes.get(piece.get_dtype(), 4))
    return found


def kv_bytes(args: ModelArgs, tokens: int, dtype: torch.dtype) -> int:
    """Keys and values of ``tokens`` tokens in every layer, as ``dtype``."""
    return 2 * args.n_layers * tokens * args.n_kv_heads * args.head_dim * torch.empty((), dtype=dtype).element_size()


def memory_need(files: tuple[Path, ...], args: ModelArgs, qconfig: QuantConfig | None, backend: str,
                dtype: torch.dtype, device: torch.device, kv_cache: int) -> MemoryNeed:
    """``backend`` "reference" dequantizes every GPTQ layer to ``dtype``; the others keep the packed words, and
    scales and zero points at up to 8 bytes per group and column (the cpu backend's bf16 pair and fp32 zero
    term). Dense tensors are held in ``dtype``. ``kv_cache``: the caches' bytes (backends.engine.kv_cache_bytes)."""
    element = torch.empty((), dtype=dtype).element_size()
    weights = 0
    for name, (shape, size) in stored_tensors(files).items():
        count = math.prod(shape)
        if name.endswith(".qweight") and qconfig is not None:
            weights += count * 32 // qconfig.bits * element if backend == "reference" else count * size
        elif name.endswith(".scales"):  # the cpu backend: a bf16 scale and zero, an fp32 zero term
            weights += 0 if backend == "reference" else count * (8 if backend == "cpu" else size)
        elif name.endswith((".qzeros", ".g_idx")):
            weights += 0 if backend == "reference" else count * size
        else:
            weights += count * element
    return MemoryNeed(weights, kv_cache, device)


def resident_bytes() -> int | None:
    """This process's resident memory (Linux), else None."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE")


def memory_use(device: torch.device) -> str:
    """What the app holds now on ``device`` and what is left, for the Model tab."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return (f"GPU memory ({torch.cuda.get_device_name(device)}): {gigabytes(torch.cuda.memory_allocated(device))} "
                f"allocated by the app ({gigabytes(torch.cuda.memory_reserved(device))} reserved); "
                f"{gigabytes(free)} free of {gigabytes(total)}.")
    held, free = resident_bytes(), available_bytes(device)
    parts = [f"the app holds {gigabytes(held)}" if held is not None else "",
             f"{gigabytes(free)} available" if free is not None else ""]
    return "RAM: " + ("; ".join(p for p in parts if p) or "not known on this system") + "."


def available_bytes(device: torch.device) -> int | None:
    """Memory free for a model now: the GPU's free memory, or the system's MemAvailable (Linux)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None

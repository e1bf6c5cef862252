"""The CUDA kernels (kernels/*.cu listed in SOURCES): built with nvcc on first use, called through ctypes.

One shared library per source version and GPU architecture, compiled into
``$GPTQ_WB_CACHE/cuda`` (default ``~/.cache/gptq-workbench/cuda``) and loaded
from there afterwards. It needs no torch headers and no ninja, only nvcc;
where nvcc is missing or the build fails, :func:`unavailable_reason` says why
and the callers fall back to their Triton or torch paths.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).parent
SOURCES = (HERE / "q4_gemv.cu", HERE / "decode_attention.cu", HERE / "head_gemv.cu", HERE / "q4_mma.cu")
HEADERS = (HERE / "launch.cuh", HERE / "q4_chunk.cuh", HERE / "row_rms.cuh")  # included by the sources: part of the library's version


class BuildError(RuntimeError):
    """nvcc is missing or could not build the kernels."""


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
def library(arch: str) -> ctypes.CDLL:
    """The built library for compute capability ``arch`` (e.g. "90"), compiling it if needed."""
    code = b"".join(f.read_bytes() for f in (*SOURCES, *HEADERS))
    digest = hashlib.sha256(code + arch.encode())
    target = cache_dir() / f"gptq_wb_kernels-sm{arch}-{digest.hexdigest()[:16]}.so"
    if not target.is_file():
        _build(target, arch)
    lib = ctypes.CDLL(str(target))
    lib.q4_gemv.restype = ctypes.c_int
    lib.q4_gemv.argtypes = [ctypes.c_void_p] + [ctypes.c_int] * 4 + [ctypes.c_void_p]
    lib.decode_attention.restype = ctypes.c_int
    lib.decode_attention.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.head_gemv.restype = ctypes.c_int
    lib.head_gemv.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.q4_mma.restype = ctypes.c_int
    lib.q4_mma.argtypes = [ctypes.c_void_p] + [ctypes.c_int] * 3 + [ctypes.c_void_p]
    lib.q4_mma_smem_bytes.restype = ctypes.c_long
    lib.q4_mma_smem_bytes.argtypes = [ctypes.c_int] * 3
    return lib


def _build(target: Path, arch: str) -> None:
    """Each source compiled on its own, in parallel (each takes tens of seconds), then linked."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise BuildError("nvcc (the CUDA compiler) was not found; set CUDA_HOME")
    target.parent.mkdir(parents=True, exist_ok=True)
    flags = ["-O3", "-Xcompiler", "-fPIC", "-std=c++17",
             f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        objects = [Path(tmp) / f"{source.stem}.o" for source in SOURCES]
        with ThreadPoolExecutor(len(SOURCES)) as pool:
            steps = list(pool.map(lambda so: _nvcc([nvcc, *flags, "-c", "-o", str(so[1]), str(so[0])], so[0].name),
                                  zip(SOURCES, objects)))
        errors = [message for message in steps if message]
        if not errors:
            link = _nvcc([nvcc, "-shared", "-o", str(built), *map(str, objects)], "the library")
            errors = [link] if link else []
        if errors:
            raise BuildError("\n".join(errors))
        os.replace(built, target)  # atomic: a concurrent or interrupted build leaves no broken library


def _nvcc(cmd: list[str], what: str) -> str | None:
    """Run one nvcc command; the error message, or None."""
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvcc failed to run for {what}: {exc}"
    if result.returncode != 0:
        return f"nvcc could not build {what}: {result.stderr.strip()[-2000:]}"
    return None


def arch_of(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    return f"{major}{minor}"


def unavailable_reason(device: torch.device) -> str | None:
    """Why the CUDA kernels cannot run on ``device``, or None (building them if that has not happened yet)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return "it needs a CUDA GPU"
    try:
        library(arch_of(device))
    except (BuildError, OSError) as exc:
        return str(exc)
    return None


def check(rc: int, what: str) -> None:
    """Raise for an exported function's return code: -1 refused arguments, else a CUDA launch error."""
    if rc != 0:
        raise RuntimeError(f"{what} failed ({'unsupported shape' if rc == -1 else f'CUDA error {rc}'})")


def pdl_default(device: torch.device) -> bool:
    """Programmatic dependent launch: on Hopper and later."""
    return torch.cuda.get_device_capability(device)[0] >= 9

"""The CPU kernels of kernels/cpu_q4.cpp (the AVX-512 VNNI 4-bit matmul, and one-token attention over the
paged bf16 cache): built once with the machine's C++ compiler through
torch's extension loader (cached under ~/.cache/torch_extensions), and its weight layout.

``load()`` returns the module, or None with the reason in ``why_not()`` (no compiler, no AVX-512 VNNI):
the cpu backend then stays on torch's int4 kernel and says so.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger("gptq_workbench.cpu_q4")
SOURCE = Path(__file__).with_name("cpu_q4.cpp")
TILE = 16  # output columns of one packed tile
BLOCK = 32  # the activations' int8 block
_failure: list[str] = []


@functools.cache
def load():
    if os.environ.get("GPTQ_WORKBENCH_NO_CPU_KERNEL"):
        _failure.append("turned off by GPTQ_WORKBENCH_NO_CPU_KERNEL")
        return None
    try:
        from torch.utils.cpp_extension import load as build

        # No OpenMP: the kernels split their work over a thread pool of the source's own (see its header).
        module = build(name="gptq_workbench_cpu_q4", sources=[str(SOURCE)], extra_cflags=["-O3"], verbose=False)
    except Exception as exc:  # noqa: BLE001 - no compiler, no ninja, a failed build: the reason is kept
        _failure.append(f"the AVX-512 kernel did not build ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
        log.warning("%s", _failure[-1])
        return None
    if not module.supported():
        _failure.append("this CPU has no AVX-512 VNNI")
        return None
    return module


def why_not() -> str:
    load()
    return _failure[-1] if _failure else ""


def takes(in_features: int, out_features: int, group: int) -> bool:
    return out_features % TILE == 0 and in_features % group == 0 and group % BLOCK == 0


def pack(q: torch.Tensor) -> torch.Tensor:
    """q ``[K, N]`` (values 0..15) -> ``[N/16, K/8, 64]`` uint8: for each tile of 16 columns and each 8 k, column
    r's bytes 4r..4r+3 hold k0..k3 in their low nibbles and k4..k7 in their high ones."""
    k, n = q.shape
    chunks = q.to(torch.uint8).reshape(k // 8, 2, 4, n // TILE, TILE)  # [c, half, i, t, r]
    byte = chunks[:, 0] | (chunks[:, 1] << 4)  # [c, i, t, r]
    return byte.permute(2, 0, 3, 1).contiguous().reshape(n // TILE, k // 8, 64)


def tile_params(values: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A per-(group, column) ``[G, N]`` -> ``[N/16, G, 16]`` in ``dtype``, the order the kernel reads: the scales
    in fp16 (as GPTQ stores them), the zero points' z * s in float32."""
    g, n = values.shape
    return values.to(dtype).reshape(g, n // TILE, TILE).permute(1, 0, 2).contiguous()


def attention_takes(cache: torch.Tensor) -> bool:
    """Whether the paged decode attention reads this cache (bf16, head size a multiple of 16 up to 256)."""
    return cache.device.type == "cpu" and cache.dtype == torch.bfloat16 and cache.shape[-1] % 16 == 0 \
        and cache.shape[-1] <= 256 \
        and load() is not None


def paged_decode_attention(queries: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, table: torch.Tensor,
                           lens: torch.Tensor, block_size: int, window: int | None) -> torch.Tensor:
    """queries ``[B, Hq, D]`` (each sequence's one token, at position ``lens - 1``), one layer's cache
    ``[Hkv, slots, D]`` -> ``[B, Hq, D]`` in the queries' dtype."""
    out = load().paged_decode_attention(queries.float().contiguous(), cache_k, cache_v, table, lens, block_size,
                                        window or 0)
    return out.to(queries.dtype)


def matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | float,
           group: int) -> torch.Tensor:
    """x ``[M, K]`` -> fp32 ``[M, N]``. ``scales``: fp16 tile params; ``zeros``: float32 tile params of z * s, or
    the one z of every group (a symmetric checkpoint: 8 for 4-bit)."""
    return load().q4_matmul(x.float().contiguous(), packed, scales, *_zero_args(zeros), group)


def _zero_args(zeros: torch.Tensor | float) -> tuple[torch.Tensor | None, float]:
    return (zeros, 0.0) if isinstance(zeros, torch.Tensor) else (None, float(zeros))


def linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | float, group: int, *,
           norm: tuple[torch.Tensor, float] | None = None, perm: torch.Tensor | None = None,
           residual: torch.Tensor | None = None, glu: bool = False) -> torch.Tensor:
    """A bf16 layer step in one call: bf16 rows ``x`` ``[M, K]``, RMS-normalized by ``norm`` (weight, eps) and
    gathered through ``perm`` first; the bf16 projection, plus ``residual`` ``[M, N]``, or with ``glu``
    ``silu(gate) * up`` of its halves. Rounded to bf16 where the model's torch steps round."""
    weight, eps = norm if norm is not None else (None, 0.0)
    return load().q4_linear(x.contiguous(), packed, scales, *_zero_args(zeros), group, weight, eps, perm, residual,
                            glu)


def rope_store_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      cache_k: torch.Tensor, cache_v: torch.Tensor, write_slots: torch.Tensor, table: torch.Tensor,
                      lens: torch.Tensor, block_size: int, window: int | None) -> torch.Tensor:
    """A step's rotary, cache writes and attention, each row a sequence's token at position ``lens - 1``: q, k, v
    bf16 ``[T, H * D]``, cos/sin fp32 ``[T, D]``, this layer's cache ``[Hkv, slots, D]`` -> bf16 ``[T, Hq * D]``."""
    return load().rope_store_attend(q, k, v, cos.float().contiguous(), sin.float().contiguous(), cache_k, cache_v,
                                    write_slots, table, lens, block_size, window or 0)


def norm_head(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor) -> torch.Tensor:
    """The model's head: bf16 rows ``x`` ``[M, K]`` RMS-normalized (bf16 ``norm_weight``), times the dense bf16
    ``weight`` ``[N, K]`` transposed -> fp32 logits ``[M, N]``, each row's independent of the others."""
    return load().norm_head(x.contiguous(), norm_weight.contiguous(), eps, weight.contiguous())

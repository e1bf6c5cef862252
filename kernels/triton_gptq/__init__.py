"""GPTQ matmul in Triton with dequantization fused into the kernels.

``y[M, N] = x[M, K] @ W`` for a :class:`PackedWeight` ``W``. Three paths, chosen by M:
- M = 1 with contiguous groups (decode): a GEMV (gemv.py);
- small M, or act-order groups read through g_idx: the fused tiled kernel (matmul.py);
- M >= DEQUANT_MIN_M: dequantize into an fp16 scratch matrix, then fp16 cuBLAS; the dequantization is a
  small part of a long GEMM.
On a GPU the configuration is autotuned once per shape (tuning.py).
"""

from __future__ import annotations

import torch

from kernels.triton_gptq.gemv import MAX_SPLIT_K, gemv_workspace
from kernels.triton_gptq.matmul import gptq_dequantize
from kernels.triton_gptq.tuning import TUNER, LaunchConfig, gemv_candidates, launch, matmul_candidates, tuned_config
from kernels.triton_gptq.weight import PackedWeight

__all__ = ["DEQUANT_MIN_M", "MAX_SPLIT_K", "TUNER", "LaunchConfig", "PackedWeight", "gemv_candidates",
           "gemv_workspace", "gptq_dequantize", "gptq_gemv", "gptq_matmul", "launch", "matmul_candidates",
           "tuned_config"]

DEQUANT_MIN_M = 128  # from here on, dequantize + cuBLAS beats the fused kernel at every Llama shape


def gptq_gemv(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """``x @ W`` for one fp16 row ``x`` ``[1, K]``, groups contiguous runs of ``w.group_size`` rows."""
    cfg = tuned_config(x, w, gemv=True)
    if cfg is None:
        raise ValueError(f"no GEMV configuration tiles group size {w.group_size} and K={x.shape[1]}")
    return launch(cfg, x, w)


def gptq_matmul(x: torch.Tensor, w: PackedWeight) -> torch.Tensor:
    """``x @ W`` for fp16 ``x`` ``[M, K]``."""
    if x.dim() != 2:
        raise ValueError("x must be 2-D")
    if x.dtype != torch.float16:
        raise TypeError(f"x must be float16, got {x.dtype}")
    if x.shape[0] >= DEQUANT_MIN_M:
        return x @ gptq_dequantize(w)
    if x.shape[0] == 1 and w.group_size > 0 and x.is_contiguous():
        cfg = tuned_config(x, w, gemv=True)
        if cfg is not None:
            return launch(cfg, x, w)
    cfg = tuned_config(x, w, gemv=False)
    if cfg is None:
        raise ValueError(f"contiguous group size {w.group_size} is not a multiple of 32; pass group_size=0 and g_idx")
    return launch(cfg, x, w)

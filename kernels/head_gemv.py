"""The model's head for one decoded token (head_gemv.cu): the final RMSNorm, the fp16 lm_head GEMV and the
cast of the logits to fp32 in one kernel. Built and loaded by kernels.cuda_lib, called through ctypes."""

from __future__ import annotations

import ctypes

import torch

from kernels import cuda_lib

BLOCKS_PER_SM = 4


class _Args(ctypes.Structure):  # struct HeadGemvArgs in head_gemv.cu
    _fields_ = [(name, ctypes.c_void_p) for name in ("x", "weight", "norm_weight", "out")] + \
               [("N", ctypes.c_int), ("K", ctypes.c_int), ("norm_eps", ctypes.c_float)]


def supported(weight: torch.Tensor, norm_weight: torch.Tensor) -> bool:
    """An fp16 ``[N, K]`` weight and ``[K]`` norm weight the kernel reads 16 bytes at a time."""
    k = weight.shape[-1]
    return (weight.dtype == norm_weight.dtype == torch.float16 and weight.dim() == 2 and norm_weight.shape == (k,)
            and k % 8 == 0 and k <= 32768 and weight.is_contiguous() and norm_weight.is_contiguous()
            and weight.data_ptr() % 16 == 0 and norm_weight.data_ptr() % 16 == 0)


def head_gemv(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
    """fp32 ``[N]``: ``weight @ rmsnorm(x)`` for one fp16 row ``x`` ``[K]``, rounded to fp16 where the norm and
    the fp16 GEMV round (``RMSNorm``, then ``nn.Linear`` in fp16, then ``.float()``)."""
    if not supported(weight, norm_weight):
        raise ValueError("head_gemv needs a contiguous fp16 [N, K] weight and [K] norm weight, K a multiple of 8")
    n, k = weight.shape
    if x.dtype != torch.float16 or x.numel() != k:
        raise ValueError(f"x must be {k} fp16 values")
    x = x.reshape(k)
    if not x.is_contiguous() or x.data_ptr() % 16:
        x = x.clone()
    out = torch.empty(n, dtype=torch.float32, device=x.device)
    blocks = BLOCKS_PER_SM * torch.cuda.get_device_properties(x.device).multi_processor_count
    args = _Args(x.data_ptr(), weight.data_ptr(), norm_weight.data_ptr(), out.data_ptr(), n, k, eps)
    lib = cuda_lib.library(cuda_lib.arch_of(x.device))
    use_pdl = cuda_lib.pdl_default(x.device)
    rc = lib.head_gemv(ctypes.byref(args), blocks, int(use_pdl), torch.cuda.current_stream(x.device).cuda_stream)
    cuda_lib.check(rc, f"head_gemv (N={n} K={k})")
    return out

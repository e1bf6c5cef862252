"""The model's steps on a GPU: backends/model.py's TorchOps with kernels plugged in where they run.

- RMSNorm: one Triton kernel (kernels/rmsnorm.py);
- rotary: q rotated, k rotated and v copied straight into their cache slots in one Triton kernel
  (kernels/rotary.py);
- one decoded token: attention with rotary and the cache write folded in (kernels/decode_attention.cu), and
  the head, final norm + fp16 lm_head + cast, in one kernel (kernels/head_gemv.cu), where the CUDA library
  builds (kernels/cuda_lib.py).
Each kernel sits beside the torch form it replaces and is tested against it.
"""

from __future__ import annotations

import torch

from backends.base import DenseLinear, Linear
from backends.model import KVCache, RMSNorm, TorchOps
from backends.model_config import ModelArgs
from kernels import cuda_lib, decode_attention, head_gemv, rotary
from kernels.rmsnorm import rmsnorm


class CudaOps(TorchOps):
    def __init__(self, device: torch.device):
        self.cuda_kernels = cuda_lib.unavailable_reason(device) is None  # decode attention and head

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if not x.is_cuda:
            return super().rmsnorm(x, weight, eps)
        return rmsnorm(x, weight, eps)

    def rotary_into_cache(self, q, k, v, cos, sin, cache: KVCache, positions: torch.Tensor) -> torch.Tensor:
        if not (q.is_cuda and rotary.supported(q.shape[-1])):
            return super().rotary_into_cache(q, k, v, cos, sin, cache, positions)
        return rotary.rotary_qkv(q, k, v, cos, sin, cache.k, cache.v, positions).transpose(1, 2)

    def decode_workspace(self, args: ModelArgs, device: torch.device) -> decode_attention.Workspace | None:
        if not self.cuda_kernels or not decode_attention.supported(args.head_dim, args.n_heads, args.n_kv_heads):
            return None
        return decode_attention.Workspace(args.n_heads, args.n_kv_heads, args.head_dim, device)

    def decode_attention_pays(self, kv_len: int, args: ModelArgs) -> bool:
        return decode_attention.faster_than_sdpa(kv_len, args.n_heads, args.n_kv_heads)

    def decode_attention(self, q, k, v, cos, sin, positions, cache: KVCache, kv_len: int, window: int | None,
                         workspace: decode_attention.Workspace) -> torch.Tensor:
        return decode_attention.decode_attention(q, k, v, cos, sin, positions, cache.k, cache.v, kv_len, window,
                                                 workspace)

    def head(self, x: torch.Tensor, lm_head: Linear, norm: RMSNorm) -> torch.Tensor:
        if (self.cuda_kernels and x.is_cuda and x.shape[:2] == (1, 1) and x.dtype == torch.float16
                and isinstance(lm_head, DenseLinear) and lm_head.bias is None
                and head_gemv.supported(lm_head.weight, norm.weight)):
            return head_gemv.head_gemv(x, lm_head.weight, norm.weight, norm.eps).view(1, 1, -1)
        return super().head(x, lm_head, norm)

"""Rotary position embedding in one Triton kernel, optionally writing straight into the KV cache.

The torch form (float copies, a concatenation, two products, a sum, a cast and
an index_copy) launches about seven kernels per tensor and layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, pos_ptr, H, T,
                   stride_xb, stride_xt, stride_xh, stride_ob, stride_ot, stride_oh,
                   HALF: tl.constexpr, SCATTER: tl.constexpr):
    pid = tl.program_id(0)
    h = pid % H
    t = (pid // H) % T
    b = pid // (H * T)
    d = tl.arange(0, HALF)
    src = x_ptr + b * stride_xb + t * stride_xt + h * stride_xh
    x1 = tl.load(src + d).to(tl.float32)
    x2 = tl.load(src + HALF + d).to(tl.float32)
    trig = t * 2 * HALF
    c1 = tl.load(cos_ptr + trig + d)
    c2 = tl.load(cos_ptr + trig + HALF + d)
    s1 = tl.load(sin_ptr + trig + d)
    s2 = tl.load(sin_ptr + trig + HALF + d)
    # x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]
    o1 = x1 * c1 - x2 * s1
    o2 = x2 * c2 + x1 * s2
    row = tl.load(pos_ptr + t) if SCATTER else t
    dst = out_ptr + b * stride_ob + row * stride_ot + h * stride_oh
    tl.store(dst + d, o1.to(out_ptr.dtype.element_ty))
    tl.store(dst + HALF + d, o2.to(out_ptr.dtype.element_ty))


def supported(head_dim: int) -> bool:
    half = head_dim // 2
    return head_dim % 2 == 0 and half & (half - 1) == 0


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: torch.Tensor | None = None,
           positions: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate ``x`` ``[B, T, H, D]`` (any strides, last dim contiguous) by ``cos``/``sin`` ``[T, D]`` (fp32).

    Without ``cache`` returns a new ``[B, T, H, D]`` tensor; with ``cache`` ``[B, H, S, D]`` writes row t of
    the result to slot ``positions[t]`` and returns the cache.
    """
    b, t, h, d = x.shape
    cos, sin = cos.contiguous(), sin.contiguous()
    if cache is None:
        out = torch.empty((b, t, h, d), device=x.device, dtype=x.dtype)
        strides = (out.stride(0), out.stride(1), out.stride(2))
        pos = cos  # unused
    else:
        out, pos = cache, positions
        strides = (cache.stride(0), cache.stride(2), cache.stride(1))
    _rotary_kernel[(b * t * h,)](x, cos, sin, out, pos, h, t, x.stride(0), x.stride(1), x.stride(2), *strides,
                                 HALF=d // 2, SCATTER=cache is not None, num_warps=1)
    return out

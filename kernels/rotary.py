"""Rotary position embedding for a layer's q and k, and the KV cache write, in one Triton kernel.

The torch form (float copies, a concatenation, two products, a sum, a cast and
an index_copy) launches about seven kernels per tensor and layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_qkv_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, q_out_ptr, k_cache_ptr, v_cache_ptr, pos_ptr,
                       HQ, HKV, T, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sv_b, sv_t, sv_h,
                       so_b, so_t, so_h, sc_b, sc_h, sc_s, HALF: tl.constexpr):
    """One program per (batch, token, head) over the q heads then the kv heads: q rotated into q_out; k
    rotated into its cache slot, v copied into its slot."""
    pid = tl.program_id(0)
    heads = HQ + HKV
    h = pid % heads
    t = (pid // heads) % T
    b = pid // (heads * T)
    d = tl.arange(0, HALF)
    trig = t * 2 * HALF
    c1 = tl.load(cos_ptr + trig + d)
    c2 = tl.load(cos_ptr + trig + HALF + d)
    s1 = tl.load(sin_ptr + trig + d)
    s2 = tl.load(sin_ptr + trig + HALF + d)
    if h < HQ:
        src = q_ptr + b * sq_b + t * sq_t + h * sq_h
        dst = q_out_ptr + b * so_b + t * so_t + h * so_h
    else:
        kh = h - HQ
        slot = tl.load(pos_ptr + t)
        src = k_ptr + b * sk_b + t * sk_t + kh * sk_h
        dst = k_cache_ptr + b * sc_b + kh * sc_h + slot * sc_s
        v_src = v_ptr + b * sv_b + t * sv_t + kh * sv_h
        v_dst = v_cache_ptr + b * sc_b + kh * sc_h + slot * sc_s
        tl.store(v_dst + d, tl.load(v_src + d).to(v_dst.dtype.element_ty))
        tl.store(v_dst + HALF + d, tl.load(v_src + HALF + d).to(v_dst.dtype.element_ty))
    x1 = tl.load(src + d).to(tl.float32)
    x2 = tl.load(src + HALF + d).to(tl.float32)
    tl.store(dst + d, (x1 * c1 - x2 * s1).to(dst.dtype.element_ty))
    tl.store(dst + HALF + d, (x2 * c2 + x1 * s2).to(dst.dtype.element_ty))


def rotary_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """One kernel for a layer's attention inputs: ``q`` ``[B, T, Hq, D]`` rotated into a new tensor (returned),
    ``k`` rotated and ``v`` copied (``[B, T, Hkv, D]``, last dim contiguous) into cache slots ``positions``
    of ``k_cache``/``v_cache`` ``[B, Hkv, S, D]`` (same strides)."""
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    if k_cache.stride() != v_cache.stride():
        raise ValueError("the k and v caches must have the same layout")
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty((b, t, hq, d), device=q.device, dtype=q.dtype)
    _rotary_qkv_kernel[(b * t * (hq + hkv),)](
        q, k, v, cos, sin, out, k_cache, v_cache, positions, hq, hkv, t,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), HALF=d // 2, num_warps=1)
    return out


def supported(head_dim: int) -> bool:
    half = head_dim // 2
    return head_dim % 2 == 0 and half & (half - 1) == 0

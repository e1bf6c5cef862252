"""Attention for one decoded token with rotary and the KV cache write folded in (decode_attention.cu).

Built and loaded by kernels.cuda_lib, called through ctypes. ``reference`` is
the same computation in plain torch, for the tests.
"""

from __future__ import annotations

import ctypes
import math

import torch
import torch.nn.functional as F

from kernels import cuda_lib

MAX_SPLITS = 64
MAX_GROUP = 8
HEAD_DIMS = (64, 128)
KEYS_PER_SPLIT = 128  # the fewest keys worth a block of their own (benchmarks/decode_attention.py)


class _Args(ctypes.Structure):  # struct DecodeAttentionArgs in decode_attention.cu
    _fields_ = [(name, ctypes.c_void_p) for name in
                ("q", "k", "v", "cos", "sin", "position", "k_cache", "v_cache", "out", "ws", "counters",
                 "qkv_sums")] + \
               [("cache_head_stride", ctypes.c_longlong)] + \
               [(name, ctypes.c_int) for name in ("rotary_stride", "head_dim", "n_heads", "n_kv_heads", "window", "max_splits")] + \
               [("scale", ctypes.c_float)]


def supported(head_dim: int, n_heads: int, n_kv_heads: int) -> bool:
    return head_dim in HEAD_DIMS and n_heads % n_kv_heads == 0 and n_heads // n_kv_heads <= MAX_GROUP


def faster_than_sdpa(kv_len: int, n_heads: int, n_kv_heads: int) -> bool:
    """Where the kernel beats rotary + cuDNN SDPA on an H100 (benchmarks/decode_attention.py): always without
    GQA; with it up to 512 keys (its blocks then take 2-8 q heads each, the long-context splits fall behind)."""
    return n_heads == n_kv_heads or kv_len <= 512


class Workspace:
    """Partial outputs of the key splits and the per-kv-head arrival counters (left zero by the kernel);
    one serves every layer, for the layers' kernels run one after another."""

    def __init__(self, n_heads: int, n_kv_heads: int, head_dim: int, device: torch.device):
        self.partials = torch.empty((n_heads, MAX_SPLITS, head_dim + 2), dtype=torch.float32, device=device)
        self.counters = torch.zeros(n_kv_heads, dtype=torch.int32, device=device)


def splits_for(kv_len: int, n_kv_heads: int, device: torch.device) -> int:
    """Parts to divide up to ``kv_len`` keys into: none up to 256 keys (combining parts costs a few µs),
    else about two blocks per SM with at least 128 keys a part (benchmarks/decode_attention.py)."""
    if kv_len <= 2 * KEYS_PER_SPLIT:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(MAX_SPLITS, -(-kv_len // KEYS_PER_SPLIT), -(-2 * sms // n_kv_heads)))


def decode_attention(q: torch.Tensor | None, k: torch.Tensor | None, v: torch.Tensor | None, cos: torch.Tensor,
                     sin: torch.Tensor, position: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     kv_len: int, window: int | None, workspace: Workspace, *, qkv_sums: torch.Tensor | None = None,
                     splits: int | None = None) -> torch.Tensor:
    """One token's attention output ``[Hq * D]`` fp16: q ``[Hq * D]``, k and v ``[Hkv * D]`` (un-rotated,
    each contiguous) at ``position`` (int64 ``[1]`` on the device); ``cos``/``sin`` fp32 ``[D]`` for it, or
    tables ``[S, D]`` (row p for position p; the kernel reads its position's).
    Or, instead of q, k and v (then None), ``qkv_sums``: the three concatenated in fp32 (a qkv GEMV's
    ``sums``), rounded to fp16 in the kernel.
    k is rotated and written with v into slot ``position`` of ``k_cache``/``v_cache`` ``[1, Hkv, S, D]``;
    the query attends to slots ``[position - window + 1 or 0, position]``. ``kv_len`` bounds the position
    (it sizes the key splits, as a CUDA graph's fixed length does)."""
    _, n_kv_heads, _, head_dim = k_cache.shape
    if qkv_sums is not None:
        if (q, k, v) != (None, None, None):
            raise ValueError("give q, k and v, or qkv_sums, not both")
        if qkv_sums.dtype != torch.float32 or not qkv_sums.is_contiguous():
            raise ValueError("qkv_sums must be contiguous float32")
        n_heads = qkv_sums.numel() // head_dim - 2 * n_kv_heads
    else:
        n_heads = q.numel() // head_dim
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dtype != torch.float16 or not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous float16")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(3) != 1 or k_cache.stride(2) != head_dim:
        raise ValueError("the k and v caches must be [1, Hkv, S, D] with contiguous rows, the same layout")
    table = cos.dim() == 2 and cos.shape[0] > 1  # a row per position: the kernel reads its position's
    if (cos.dtype != torch.float32 or cos.shape != sin.shape or cos.shape[-1] != head_dim
            or (not table and cos.numel() != head_dim) or (table and cos.shape[0] < kv_len)):
        raise ValueError("cos and sin must be float32 [D], or tables [S, D] with S >= kv_len")
    cos, sin = cos.contiguous(), sin.contiguous()
    position = position.to(torch.int64)  # as the kernel reads it (a no-op for the model's positions)
    device = k_cache.device
    splits = splits or splits_for(kv_len, n_kv_heads, device)
    out = torch.empty(n_heads * head_dim, dtype=torch.float16, device=device)
    args = _Args(*(t.data_ptr() if t is not None else None for t in (q, k, v)), cos.data_ptr(), sin.data_ptr(),
                 position.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
                 workspace.partials.data_ptr(), workspace.counters.data_ptr(),
                 qkv_sums.data_ptr() if qkv_sums is not None else None, k_cache.stride(1),
                 head_dim if table else 0, head_dim, n_heads,
                 n_kv_heads, window or 0, MAX_SPLITS, 1.0 / math.sqrt(head_dim))
    lib = cuda_lib.library(cuda_lib.arch_of(device))
    use_pdl = cuda_lib.pdl_default(device)
    rc = lib.decode_attention(ctypes.byref(args), splits, int(use_pdl), torch.cuda.current_stream(device).cuda_stream)
    cuda_lib.check(rc, f"decode_attention (heads={n_heads} kv_heads={n_kv_heads} head_dim={head_dim} splits={splits})")
    return out


def reference(q, k, v, cos, sin, position: int, k_cache, v_cache, window: int | None) -> torch.Tensor:
    """The same in plain torch (fp32 math, the cache written in place)."""
    _, n_kv_heads, _, d = k_cache.shape
    half = d // 2

    def rotate(x):  # [H, D]
        rotated = torch.cat((-x[:, half:], x[:, :half]), dim=-1)
        return (x.float() * cos + rotated.float() * sin).to(torch.float16)

    q = rotate(q.view(-1, d))
    k_cache[0, :, position] = rotate(k.view(n_kv_heads, d))
    v_cache[0, :, position] = v.view(n_kv_heads, d)
    lo = max(0, position - window + 1) if window else 0
    keys = k_cache[0, :, lo : position + 1].float()
    values = v_cache[0, :, lo : position + 1].float()
    group = q.shape[0] // n_kv_heads
    keys, values = keys.repeat_interleave(group, 0), values.repeat_interleave(group, 0)
    out = F.scaled_dot_product_attention(q.float().unsqueeze(1), keys, values)
    return out.reshape(-1).to(torch.float16)

"""The GPTQ tensor layout, in plain torch: packing, unpacking, dequantization.

This is the reference every kernel is tested against. Layout (AutoGPTQ):

- ``qweight``: int32 ``[in_features * bits / 32, out_features]``; input rows
  are packed along dim 0, value ``j`` of a word at bits ``j*bits``.
- ``qzeros``: int32 ``[groups, out_features * bits / 32]``; zero points packed
  along dim 1 the same way. Format "gptq" (v1) stores ``zero - 1``.
- ``scales``: fp16 ``[groups, out_features]``.
- ``g_idx``: int32 ``[in_features]``, the group of every input row (with
  act-order the groups are not contiguous).

``W[i, o] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o])`` and the
layer computes ``y = x @ W + bias``.
"""

from __future__ import annotations

import torch


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    return torch.arange(0, 32, bits, dtype=torch.int32, device=device)


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[n * bits / 32, m]`` -> int32 ``[n, m]`` values in ``[0, 2**bits)``."""
    mask = (1 << bits) - 1
    shifts = _shifts(bits, packed.device)
    values = (packed.unsqueeze(1) >> shifts.view(1, -1, 1)) & mask
    return values.reshape(-1, packed.shape[1])


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[n, m * bits / 32]`` -> int32 ``[n, m]``."""
    mask = (1 << bits) - 1
    shifts = _shifts(bits, packed.device)
    values = (packed.unsqueeze(2) >> shifts.view(1, 1, -1)) & mask
    return values.reshape(packed.shape[0], -1)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`unpack_rows`; ``values`` has ``n`` divisible by ``32 / bits``."""
    per_word = 32 // bits
    n, m = values.shape
    if n % per_word:
        raise ValueError(f"{n} rows cannot be packed {per_word} to a word")
    v = values.to(torch.int64).reshape(n // per_word, per_word, m)
    words = (v << _shifts(bits, values.device).to(torch.int64).view(1, -1, 1)).sum(dim=1)
    return _to_int32(words)


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`unpack_cols`."""
    per_word = 32 // bits
    n, m = values.shape
    if m % per_word:
        raise ValueError(f"{m} columns cannot be packed {per_word} to a word")
    v = values.to(torch.int64).reshape(n, m // per_word, per_word)
    words = (v << _shifts(bits, values.device).to(torch.int64).view(1, 1, -1)).sum(dim=2)
    return _to_int32(words)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 bit patterns."""
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_zeros(qzeros: torch.Tensor, bits: int, zero_offset: int) -> torch.Tensor:
    """Real zero points ``[groups, out_features]`` (v1 checkpoints store them minus one)."""
    zeros = unpack_cols(qzeros, bits) + zero_offset
    return zeros


def dequantize(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    zero_offset: int = 1,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The dense weight ``W`` as ``[in_features, out_features]`` in ``dtype``."""
    q = unpack_rows(qweight, bits)[: g_idx.numel()]
    zeros = unpack_zeros(qzeros, bits, zero_offset).to(dtype)
    s = scales.to(dtype)
    in_features, groups = q.shape[0], s.shape[0]
    if in_features % groups == 0:
        size = in_features // groups
        contiguous = torch.arange(in_features, device=g_idx.device) // size
        if torch.equal(g_idx.long(), contiguous):
            # Groups are runs of rows: broadcast instead of gathering per row.
            w = (q.view(groups, size, -1).to(dtype) - zeros.unsqueeze(1)) * s.unsqueeze(1)
            return w.view(in_features, -1)
    g = g_idx.long()
    return (q.to(dtype) - zeros[g]) * s[g]


def reference_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                     g_idx: torch.Tensor, bits: int, zero_offset: int = 1, bias: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """``x @ W (+ bias)`` computed in fp32 and returned in ``x.dtype``."""
    w = dequantize(qweight, qzeros, scales, g_idx, bits, zero_offset, torch.float32)
    y = x.float() @ w
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)

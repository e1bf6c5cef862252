"""Attention of one engine step over the paged KV cache, in plain torch.

A step holds several sequences' new tokens side by side (``[T]``): one token of each decoding sequence and
a chunk of each prefilling prompt. The projections run on all of them at once; attention runs per
sequence, on its own keys:
- on a GPU, decoding sequences (one token each) attend together in one batched call, their keys gathered
  from their blocks and padded to the longest, with a mask;
- a prompt chunk, and on the CPU every sequence, attends alone, masked causally from its first position.
A sequence whose blocks are consecutive (a lone sequence's usually are) reads its keys as one slice of the
pool instead of a gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from backends.model import apply_rotary
from backends.paged_cache import KVPool


@dataclass(frozen=True)
class Segment:
    """One sequence's tokens in a step: rows ``start .. start + length`` at positions from ``first_position``;
    ``blocks`` covers every position up to the last."""

    start: int
    length: int
    first_position: int
    blocks: tuple[int, ...]

    @property
    def kv_len(self) -> int:
        return self.first_position + self.length


def _slots(blocks: tuple[int, ...], begin: int, end: int, block_size: int) -> list[int]:
    return [blocks[p // block_size] * block_size + p % block_size for p in range(begin, end)]


def _consecutive(blocks: tuple[int, ...], count: int) -> bool:
    return all(blocks[i + 1] == blocks[i] + 1 for i in range(count - 1))


class PagedStep:
    """What the layers need to attend one step's tokens (backends/model.py ``PagedAttention``)."""

    def __init__(self, pool: KVPool, segments: list[Segment], sliding_window: int | None, dtype: torch.dtype,
                 n_heads: int):
        device = pool.k.device
        bs = pool.shape.block_size
        self.pool, self.window, self.n_heads = pool, sliding_window, n_heads
        self.segments = segments
        self.segment_bounds = [(s.start, s.start + s.length) for s in segments]
        slots = [slot for s in segments for slot in _slots(s.blocks, s.first_position, s.kv_len, bs)]
        self.write_slots = torch.tensor(slots, dtype=torch.long, device=device)
        self.positions = torch.tensor([p for s in segments for p in range(s.first_position, s.kv_len)],
                                      dtype=torch.long, device=device)
        # On the CPU every sequence attends on its own, over exactly its own keys: a row's attention is then
        # computed as when the sequence runs alone (a padded batch changes the kernels' reduction order),
        # so in bf16 too a request's tokens do not depend on its neighbours. On a GPU, decoding sequences
        # attend in one padded batch.
        batch = device.type == "cuda"
        self.batched = [s for s in segments if batch and s.length == 1 and s.first_position > 0]
        self.alone = [s for s in segments if s not in self.batched]
        self.keys = [self._key_slots(s) for s in self.alone]  # per alone segment
        self.masks = [self._mask(s, dtype) for s in self.alone]
        if self.batched:
            longest = max(s.kv_len for s in self.batched)
            single = self._key_slots(self.batched[0]) if len(self.batched) == 1 else None
            if isinstance(single, slice):
                self.batch_slots: slice | torch.Tensor = single
            else:
                table = [_slots(s.blocks, 0, s.kv_len, bs) + [0] * (longest - s.kv_len) for s in self.batched]
                self.batch_slots = torch.tensor(table, dtype=torch.long, device=device)  # [B, L]
            self.batch_rows = torch.tensor([s.start for s in self.batched], dtype=torch.long, device=device)
            keys = torch.arange(longest, device=device).view(1, -1)
            lens = torch.tensor([s.kv_len for s in self.batched], device=device).view(-1, 1)
            allowed = keys < lens
            if sliding_window is not None:
                allowed &= keys >= lens - sliding_window
            mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
            self.batch_mask = mask.view(len(self.batched), 1, 1, longest)

    def _key_slots(self, s: Segment) -> slice | torch.Tensor:
        bs = self.pool.shape.block_size
        if _consecutive(s.blocks, -(-s.kv_len // bs)):
            start = s.blocks[0] * bs
            return slice(start, start + s.kv_len)
        return torch.tensor(_slots(s.blocks, 0, s.kv_len, bs), dtype=torch.long, device=self.pool.k.device)

    def _mask(self, s: Segment, dtype: torch.dtype) -> torch.Tensor:
        device = self.pool.k.device
        keys = torch.arange(s.kv_len, device=device).view(1, -1)
        positions = torch.arange(s.first_position, s.kv_len, device=device).view(-1, 1)
        allowed = keys <= positions
        if self.window is not None:
            allowed &= keys > positions - self.window
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> torch.Tensor:
        """q ``[T, Hq * D]``, k and v ``[T, Hkv * D]`` -> attention output ``[T, Hq * D]``; k (rotated) and v are
        written to the cache first."""
        t = q.shape[0]
        kv_heads = self.pool.shape.n_kv_heads
        d = self.pool.shape.head_dim
        q = apply_rotary(q.view(t, self.n_heads, d).transpose(0, 1), cos, sin)  # [Hq, T, D]
        k = apply_rotary(k.view(t, kv_heads, d).transpose(0, 1), cos, sin)
        cache_k, cache_v = self.pool.k[layer], self.pool.v[layer]  # [Hkv, slots, D]
        cache_k.index_copy_(1, self.write_slots, k)
        cache_v.index_copy_(1, self.write_slots, v.view(t, kv_heads, d).transpose(0, 1))
        out = torch.empty_like(q)
        gqa = self.n_heads != kv_heads
        for s, key_slots, mask in zip(self.alone, self.keys, self.masks):
            rows = slice(s.start, s.start + s.length)
            keys, values = cache_k[:, key_slots], cache_v[:, key_slots]
            out[:, rows] = F.scaled_dot_product_attention(
                q[:, rows].unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0), attn_mask=mask, enable_gqa=gqa)[0]
        if self.batched and isinstance(self.batch_slots, slice):
            keys, values = cache_k[:, self.batch_slots].unsqueeze(0), cache_v[:, self.batch_slots].unsqueeze(0)
        elif self.batched:
            b, longest = self.batch_slots.shape
            keys = cache_k[:, self.batch_slots.view(-1)].view(kv_heads, b, longest, d).transpose(0, 1)
            values = cache_v[:, self.batch_slots.view(-1)].view(kv_heads, b, longest, d).transpose(0, 1)
        if self.batched:
            queries = q[:, self.batch_rows].transpose(0, 1).unsqueeze(2)  # [B, Hq, 1, D]
            attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=self.batch_mask,
                                                      enable_gqa=gqa)
            out[:, self.batch_rows] = attended.squeeze(2).transpose(0, 1)
        return out.transpose(0, 1).reshape(t, self.n_heads * d)

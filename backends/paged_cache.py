"""A paged KV cache: fixed-size blocks of token slots, a block table per sequence, shared prompt prefixes.

Memory follows the tokens: a sequence holds only the blocks its tokens fill. A full block is named by a
hash of every token up to its end, so a later sequence that starts with the same tokens (a common system
prompt, or the earlier turns of a chat) takes the block as it is instead of computing it again. A block
nobody holds keeps its keys and values, and its name, until its slots are needed for something else.

Admission reserves a sequence's worst case (prompt plus new tokens) up front, so a running sequence never
finds the cache full: a request that does not fit waits, and one that could never fit is refused. No
sequence can take or overwrite a block another one holds.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import OrderedDict
from dataclasses import dataclass

import torch

BLOCK_SIZE = 16


class CacheTooSmall(ValueError):
    """A request needs more KV cache than the whole cache holds."""


def block_hashes(tokens: list[int], block_size: int, known: list[bytes] = ()) -> list[bytes]:
    """The name of each full block of ``tokens``: a hash of the tokens from the start to the block's end.
    ``known``: the names of the first blocks, already computed."""
    names = list(known)
    parent = names[-1] if names else b""
    for start in range(len(names) * block_size, len(tokens) - block_size + 1, block_size):
        chunk = tokens[start : start + block_size]
        parent = hashlib.blake2b(parent + b"".join(t.to_bytes(4, "little") for t in chunk), digest_size=16).digest()
        names.append(parent)
    return names


@dataclass(frozen=True)
class CacheShape:
    n_layers: int
    n_kv_heads: int
    head_dim: int
    num_blocks: int
    block_size: int = BLOCK_SIZE

    @property
    def slots(self) -> int:
        return self.num_blocks * self.block_size

    def bytes(self, dtype: torch.dtype) -> int:
        return 2 * self.n_layers * self.slots * self.n_kv_heads * self.head_dim * dtype.itemsize


class KVPool:
    """The cache's keys and values: per layer ``[kv_heads, slots, head_dim]``; slot ``b * block_size + i``
    is token ``i`` of block ``b``. A sequence whose blocks are consecutive reads its keys as one slice."""

    def __init__(self, shape: CacheShape, dtype: torch.dtype, device: torch.device):
        self.shape = shape
        size = (shape.n_layers, shape.n_kv_heads, shape.slots, shape.head_dim)
        self.k = torch.zeros(size, dtype=dtype, device=device)
        self.v = torch.zeros(size, dtype=dtype, device=device)

    def copy_block(self, source: int, target: int) -> None:
        bs = self.shape.block_size
        for cache in (self.k, self.v):
            cache[:, :, target * bs : (target + 1) * bs] = cache[:, :, source * bs : (source + 1) * bs]

    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class BlockManager:
    """Which blocks are free, held (with how many holders) or cached; prefix lookup; reservations."""

    def __init__(self, num_blocks: int, block_size: int = BLOCK_SIZE):
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free = list(range(num_blocks))  # a heap: the lowest block first keeps a lone sequence consecutive
        self._refs = [0] * num_blocks
        self._name_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # named, held by nobody; oldest first
        self.reserved = 0  # blocks promised to admitted sequences and not yet taken

    @property
    def available(self) -> int:
        """Blocks a new reservation may count on."""
        return len(self._free) + len(self._idle) - self.reserved

    @property
    def held(self) -> int:
        return self.num_blocks - len(self._free) - len(self._idle)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def lookup(self, names: list[bytes]) -> list[int]:
        """Takes a hold on the longest run of cached blocks named ``names`` from the start."""
        found = []
        for name in names:
            block = self._block_of.get(name)
            if block is None:
                break
            self._hold(block)
            found.append(block)
        return found

    def reserve(self, blocks: int) -> bool:
        if blocks > self.available:
            return False
        self.reserved += blocks
        return True

    def unreserve(self, blocks: int) -> None:
        self.reserved -= blocks

    def take(self) -> int:
        """A block for new tokens, from a reservation made earlier."""
        if self._free:
            block = heapq.heappop(self._free)
        else:
            block, _ = self._idle.popitem(last=False)  # the least recently used cached block
            del self._block_of[self._name_of.pop(block)]
        self.reserved -= 1
        self._refs[block] = 1
        return block

    def name(self, block: int, name: bytes) -> None:
        """Records that ``block`` now holds the full block named ``name`` (unless another block does)."""
        if name not in self._block_of and block not in self._name_of:
            self._block_of[name] = block
            self._name_of[block] = name

    def unname(self, block: int) -> None:
        """``block`` is about to hold other tokens than its name says."""
        name = self._name_of.pop(block, None)
        if name is not None:
            del self._block_of[name]

    def holders(self, block: int) -> int:
        return self._refs[block]

    def release(self, blocks: list[int]) -> None:
        for block in blocks:
            self._refs[block] -= 1
            assert self._refs[block] >= 0, f"block {block} released more often than held"
            if self._refs[block] == 0:
                if block in self._name_of:
                    self._idle[block] = None
                else:
                    heapq.heappush(self._free, block)

    def forget_names(self) -> None:
        """Cached blocks nobody holds become free; held blocks lose their names."""
        for block in self._idle:
            heapq.heappush(self._free, block)
        self._idle.clear()
        self._name_of.clear()
        self._block_of.clear()

    def _hold(self, block: int) -> None:
        if self._refs[block] == 0:
            self._idle.pop(block, None)
        self._refs[block] += 1

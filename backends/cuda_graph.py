"""Decoding one token per CUDA graph replay.

A decode step launches hundreds of kernels; from Python each launch costs more
than the kernel itself. The step is captured once per KV-length bucket (powers
of two from 128, capped at the context), with the token and position in static
device tensors, so a new token costs one replay. Attention reads the bucket's
cache slots, masked by position, so short conversations read short caches.
"""

from __future__ import annotations

from typing import Callable

import torch

from backends.model import Transformer

BUCKET_MIN = 128


def capture(step: Callable[[], torch.Tensor], pool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, object]:
    """``step`` captured in a CUDA graph sharing memory ``pool`` (None for a new one): the graph, its output
    and the pool. Warm-up runs on a side stream first, so kernels compile and autotune outside the capture;
    they write the same keys and values as the replay will, identically."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        output = step()
    return graph, output, graph.pool()


class GraphedDecoder:
    def __init__(self, model: Transformer):
        self.model = model
        device = model.embed_tokens.weight.device
        self.token = torch.zeros((1, 1), dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def bucket(self, kv_len: int) -> int:
        size = BUCKET_MIN
        while size < kv_len:
            size *= 2
        return min(size, self.model.max_seq_len)

    def _step(self, kv_len: int) -> torch.Tensor:
        return self.model(self.token, self.position, kv_len=kv_len)[0, -1]

    def _capture(self, kv_len: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        graph, logits, self.pool = capture(lambda: self._step(kv_len), self.pool)
        return graph, logits

    def step(self, token: int | torch.Tensor, position: int) -> torch.Tensor:
        """Logits ``[vocab]`` after `token` (an int, or a one-element tensor on the device that nothing need
        wait for) at `position`; valid until the next step."""
        if isinstance(token, torch.Tensor):
            self.token.copy_(token.view(1, 1))
        else:
            self.token.fill_(token)
        self.position.fill_(position)
        kv_len = self.bucket(position + 1)
        if kv_len not in self.graphs:
            self.graphs[kv_len] = self._capture(kv_len)
        graph, logits = self.graphs[kv_len]
        graph.replay()
        return logits

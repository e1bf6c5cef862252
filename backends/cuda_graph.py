"""Decoding one token per CUDA graph replay.

A decode step launches hundreds of kernels; from Python each launch costs more
than the kernel itself. The step is captured once per KV-length bucket (powers
of two from 128, capped at the context), with the token and position in static
device tensors, so a new token costs one replay. Attention reads the bucket's
cache slots, masked by position, so short conversations read short caches.
"""

from __future__ import annotations

import torch

from backends.model import Transformer

BUCKET_MIN = 128


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
        # Warm up on a side stream first: kernels compile and autotune outside the capture. The warm-up
        # steps write this token's keys and values, which the replay then writes again, identically.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._step(kv_len)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._step(kv_len)
        self.pool = graph.pool()
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

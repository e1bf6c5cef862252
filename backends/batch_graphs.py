"""Decode steps of many sequences by CUDA graph replay, one graph per batch-size bucket.

A step in which every running sequence decodes one token has the same kernels whatever the sequences'
lengths: the paged attention kernel reads each length and block table from device memory. So the step is
captured once per bucket (2, 4, 8, ... up to the engine's largest batch) with its inputs in static tensors
(backends/paged_attention.py ``DecodeStep``); a batch is padded to its bucket with rows that touch only a
scratch block. Launching a 7B step's ~500 kernels from Python would take longer than running them.
"""

from __future__ import annotations

import torch

from backends.cuda_graph import capture
from backends.model import Transformer
from backends.paged_attention import DecodeStep
from backends.paged_cache import KVPool


def buckets(max_batch: int) -> list[int]:
    sizes, size = [], 2
    while size < max_batch:
        sizes.append(size)
        size *= 2
    return sizes + [max_batch]


class BatchedDecoder:
    def __init__(self, model: Transformer, pool: KVPool, max_batch: int, max_blocks: int, scratch_block: int,
                 graphs: bool):
        self.model, self.pool = model, pool
        self.max_blocks, self.scratch = max_blocks, scratch_block
        self.sizes = buckets(max_batch)
        self.use_graphs = graphs
        self.steps: dict[int, DecodeStep] = {}
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.mempool = None

    def bucket(self, n: int) -> int:
        return next(size for size in self.sizes if size >= n)

    def _forward(self, step: DecodeStep) -> torch.Tensor:
        return self.model.forward_paged(step.tokens, step.positions, step, step.rows)

    def _capture(self, step: DecodeStep) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        graph, logits, self.mempool = capture(lambda: self._forward(step), self.mempool)
        return graph, logits

    def step(self, rows: list[tuple[int, int, tuple[int, ...]]], tokens: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits ``[len(rows), vocab]`` after each row's (token, position, blocks); valid until the next
        step of this many. ``tokens``: the rows' tokens on the device, in place of the rows' own."""
        size = self.bucket(len(rows))
        step = self.steps.get(size)
        if step is None:
            args = self.model.args
            step = self.steps[size] = DecodeStep(self.pool, size, self.max_blocks, self.scratch,
                                                 args.sliding_window, args.n_heads)
        step.fill(rows, tokens)
        if not self.use_graphs:
            return self._forward(step)[: len(rows)]
        if size not in self.graphs:
            self.graphs[size] = self._capture(step)
        graph, logits = self.graphs[size]
        graph.replay()
        return logits[: len(rows)]

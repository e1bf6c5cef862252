"""Timing GPU work as a decode step runs it, for the kernels' autotuners and for benchmarks/.

One timer and one cache-cold policy:
- :func:`graph_us`: calls captured in a CUDA graph and replayed, so the time is the kernels' own, without
  Python's launch overhead (the decode loop replays graphs too);
- :func:`cold_copies`: a kernel in a decode step reads weights that the other layers have long evicted from
  L2, so timed calls rotate over copies that together exceed four times the L2 cache. A 4096x4096 4-bit
  layer fits in an H100's or H200's L2, and a tuner that reuses one copy picks configurations that are
  slower once it does not.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Generic, TypeVar

import torch

Config = TypeVar("Config", bound=Hashable)


def graph_us(fn: Callable[[], object], calls: int = 20, replays: int = 25) -> float:
    """Microseconds per call of ``fn``: ``calls`` calls captured in one CUDA graph, the median of ``replays``
    replays (each timed with CUDA events). ``fn`` runs once first, and once more on a side stream, so that
    compiling and autotuning happen outside the capture."""
    fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()  # the first replay uploads the graph
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return sorted(times)[len(times) // 2]


def l2_bytes(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).L2_cache_size


def copies_past_l2(item_bytes: int, device: torch.device) -> int:
    """How many copies of an item of ``item_bytes`` to call in turn so that each is read from memory."""
    return max(2, -(-4 * l2_bytes(device) // item_bytes) + 1)


def cold_copies(tensors: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, ...]]:
    """``tensors`` and enough clones of them that cycling through all evicts each from L2 before its turn.
    On a GPU too full for that, as many as fit (the timing is then warmer)."""
    size = sum(t.numel() * t.element_size() for t in tensors)
    n = copies_past_l2(size, tensors[0].device)
    copies = [tuple(tensors)]
    try:
        while len(copies) < n:
            copies.append(tuple(t.clone() for t in tensors))
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
    return copies


def in_turn(items: Sequence, call: Callable) -> Callable[[], object]:
    """A function of no arguments that calls ``call`` on the next of ``items`` each time, round and round."""
    state = {"i": 0}

    def run():
        item = items[state["i"] % len(items)]
        state["i"] += 1
        return call(item)

    return run


def copy_bandwidth(device: torch.device | str = "cuda", nbytes: int = 2 * 1024**3, copies: int = 50) -> float:
    """Bytes per second that a device-to-device copy moves (read + write), over ``nbytes`` of source: the
    median of ``copies`` eager copies. (Captured in a graph, a copy becomes a memcpy node that runs at about
    two thirds of this on an H200.)"""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(copies):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return 2 * nbytes / sorted(times)[len(times) // 2]


class Tuner(Generic[Config]):
    """The fastest launch configuration per key, timed once on first use (outside any graph capture) with
    the weights rotated past L2 (:func:`cold_copies`).

    ``launch(config, weights)`` runs one call on ``weights`` (a tuple like the one given) and returns whether
    it launched; a configuration that this device refuses returns False. ``follows``: the kernel that the
    call follows in a decode step, if launching it again changes nothing; each timed call then comes after
    it, as in the step (a call after a short kernel that leaves most SMs idle, such as o_proj after
    attention, is quickest when its blocks load all their weights before they wait for it, which a call
    timed after another call of itself does not show).

    Untimed (``timed`` False, or not on a GPU): the first candidate that launches."""

    def __init__(self, timed: bool = True):
        self.timed = timed
        self.best: dict[Hashable, Config] = {}

    def pick(self, key: Hashable, candidates: Sequence[Config],
             launch: Callable[[Config, tuple[torch.Tensor, ...]], bool], weights: tuple[torch.Tensor, ...],
             follows: Callable[[], object] | None = None) -> Config:
        if key in self.best:
            return self.best[key]
        if not candidates:
            raise ValueError(f"no launch configuration for {key}")
        on_gpu = weights[0].is_cuda
        if on_gpu and torch.cuda.is_current_stream_capturing():
            return candidates[0]  # nothing may run outside the graph being captured; tuned on a later call
        if not self.timed or not on_gpu:
            chosen = next((c for c in candidates if launch(c, weights)), None)
            if chosen is None:
                raise RuntimeError(f"no launch configuration fits this device for {key}")
        else:
            copies = cold_copies(weights)

            def timing(c: Config) -> float:
                if not launch(c, weights):
                    return float("inf")
                turn = in_turn(copies, lambda w: (follows() if follows is not None else None, launch(c, w)))
                return graph_us(turn, replays=5)

            times = [(timing(c), i) for i, c in enumerate(candidates)]
            best_us, best_i = min(times)
            if best_us == float("inf"):
                raise RuntimeError(f"no launch configuration fits this device for {key}")
            chosen = candidates[best_i]
        self.best[key] = chosen
        return chosen

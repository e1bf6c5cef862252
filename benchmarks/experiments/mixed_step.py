"""What an engine step that prefills a prompt chunk beside decoding sequences costs: the step run as the
engine runs it (eagerly: PagedStep built, forward_paged, the sampled rows' argmax read back), timed on the
host until the enqueue returns and until the result is read, and the GPU's kernels summed under the torch
profiler, for a few (decoding rows, prompt chunk) mixes. A host time near the wall time says the step is
bound by launching its kernels, not by running them.

    python -m benchmarks.experiments.mixed_step [--size 7B] [--decoding 0 15 63] [--chunk 512] [--context 640]
        [--prompts 1] [--scattered]
        [--cprofile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from backends.loader import LoadOptions, load_model
from backends.paged_attention import PagedStep, Segment
from benchmarks.llama2 import write_checkpoint

REPEATS = 5


def make_step(engine, decoding: int, chunk: int, context: int, scattered: bool, prompts: int = 1):
    """Segments of ``decoding`` one-token rows at ``context`` and ``prompts`` prompt chunks of ``chunk`` tokens
    from position 0, each on blocks of its own (the prompts' interleaved with one another if ``scattered``)."""
    bs = engine.config.block_size
    per_row = context // bs + 1
    prompt_blocks = -(-chunk // bs)
    stride = prompts if scattered else 1
    chunks = [tuple(range(0, prompt_blocks * stride, stride)) if scattered else
              tuple(range(p * prompt_blocks, (p + 1) * prompt_blocks)) for p in range(prompts)]
    if scattered:
        chunks = [tuple(b + p for b in blocks) for p, blocks in enumerate(chunks)]
    first_free = prompts * prompt_blocks
    segments, tokens = [], []
    for i in range(decoding):
        blocks = tuple(range(first_free + i * per_row, first_free + (i + 1) * per_row))
        segments.append(Segment(len(tokens), 1, context, blocks))
        tokens.append(5)
    for blocks in chunks:
        segments.append(Segment(len(tokens), chunk, 0, blocks))
        tokens.extend(range(3, 3 + chunk))
    rows = [s.start + s.length - 1 for s in segments]
    return segments, tokens, rows


def run_step(engine, segments, tokens, rows) -> tuple[float, float]:
    """Host seconds to enqueue the step, and to its sampled tokens read back."""
    model = engine.model
    began = time.perf_counter()
    step = PagedStep(engine.pool, segments, model.args.sliding_window, engine.dtype, model.args.n_heads)
    ids = torch.tensor(tokens, dtype=torch.long, device=engine.device)
    picked = torch.tensor(rows, dtype=torch.long, device=engine.device)
    logits = model.forward_paged(ids, step.positions, step, picked)
    chosen = logits.argmax(-1)
    queued = time.perf_counter()
    chosen.tolist()
    return queued - began, time.perf_counter() - began


def kernel_totals(engine, args) -> dict[str, float]:
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPEATS):
            run_step(engine, *args)
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name[:80]] += event.time_range.elapsed_us() / REPEATS
    return totals


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="7B")
    parser.add_argument("--decoding", nargs="+", type=int, default=[0, 15, 63])
    parser.add_argument("--chunk", nargs="+", type=int, default=[512])
    parser.add_argument("--context", type=int, default=640, help="the decoding rows' position")
    parser.add_argument("--scattered", action="store_true", help="the prompts' blocks not consecutive")
    parser.add_argument("--prompts", type=int, default=1, help="prompt chunks in the step")
    parser.add_argument("--cprofile", action="store_true", help="the host's functions over the last mix's steps")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        path = write_checkpoint(Path(tmp) / "m", opts.size, act_order=False)
        cache = (max(opts.decoding) + 1) * (opts.context + 16) * 2 + 4 * opts.prompts * max(opts.chunk) + 1024
        loaded = load_model(path, LoadOptions(device="cuda", backend="exllama",
                                              context_length=max(opts.context, max(opts.chunk)) + 64,
                                              cache_tokens=cache))
        engine = loaded.engine
        print(f"{torch.cuda.get_device_name()}; {opts.size}; decoding rows at position {opts.context}; prompt "
              f"blocks {'scattered' if opts.scattered else 'consecutive'}\n")
        print("| decoding rows | prompt chunk | host enqueue ms | wall ms | GPU kernels ms | top kernels (ms) |")
        print("|---|---|---|---|---|---|")
        with torch.inference_mode():
            for chunk in opts.chunk:
                for decoding in opts.decoding:
                    args = make_step(engine, decoding, chunk, opts.context, opts.scattered, opts.prompts)
                    for _ in range(3):  # tuners and allocator warmed
                        run_step(engine, *args)
                    times = [run_step(engine, *args) for _ in range(REPEATS)]
                    totals = kernel_totals(engine, args)
                    top = sorted(totals.items(), key=lambda kv: -kv[1])[:6]
                    top_text = "; ".join(f"{name} {us / 1e3:.2f}" for name, us in top)
                    print(f"| {decoding} | {chunk} | {statistics.median(t[0] for t in times) * 1e3:.2f} | "
                          f"{statistics.median(t[1] for t in times) * 1e3:.2f} | {sum(totals.values()) / 1e3:.2f} | "
                          f"{top_text} |", flush=True)
            if opts.cprofile:
                args = make_step(engine, opts.decoding[-1], opts.chunk[-1], opts.context, opts.scattered, opts.prompts)
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(REPEATS):
                    run_step(engine, *args)
                prof.disable()
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
                print(f"\ncProfile of {REPEATS} steps ({opts.decoding[-1]} decoding rows, {opts.chunk[-1]}-token "
                      "chunk):")
                print(out.getvalue())
        engine.close()


if __name__ == "__main__":
    main()

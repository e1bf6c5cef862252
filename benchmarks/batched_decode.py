"""Many concurrent streams through the engine: aggregate decode throughput and per-token latency.

    python -m benchmarks.batched_decode [--sizes 7B 13B] [--streams 1 4 16 64] [--backend exllama] [--kv-cache fp8]
    python -m benchmarks.batched_decode --device cpu --sizes 7B --streams 1 4 8 --prompt 64 --new 64

For each size it writes a random-weight 4-bit g128 Llama-2-shaped checkpoint, loads it as the app does and
starts N greedy generations at once (each a distinct 512-token prompt, 256 new tokens), the way N API
clients would. It reports:
- aggregate decode tokens/s: the tokens generated after each stream's first, over the time from the first
  stream's first token to the last stream's end;
- per-token latency: each stream's decode seconds per token (median over streams), which includes the
  steps that prefill the other streams' prompts; and the steady step: the median gap between a stream's
  tokens while every stream decodes;
- time to first token (median) and the whole run's wall time;
- KV cache held at its peak against the sum of the sequences' lengths at that moment (memory follows
  the tokens);
- on the GPU, the floor of a step: the bytes it must read (every weight once, and each stream's keys and
  values at the run's mean length) at the measured copy bandwidth, and the aggregate that floor allows.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from backends.generation import Generation
from backends.loader import LoadOptions, load_model
from backends.sampling import SamplingParams
from benchmarks.llama2 import SIZES, VOCAB, g128_bytes, write_checkpoint
from kernels.timing import copy_bandwidth

PROMPT = 512
NEW = 256


def run_streams(loaded, n: int, seed: int, prompt: int = PROMPT, new: int = NEW) -> dict:
    g = torch.Generator().manual_seed(seed)
    # Tokens from 3 up: the random model's end token (2) never stops a stream early.
    prompts = [torch.randint(3, VOCAB, (prompt,), generator=g).tolist() for _ in range(n)]
    params = SamplingParams(temperature=0, max_new_tokens=new, stop_token_ids=())
    gens = [Generation(loaded, p, params) for p in prompts]
    engine = loaded.engine
    peak = {"held": 0, "tokens": 0}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            held = engine.kv_tokens_held()
            if held > peak["held"]:
                peak["held"] = held
                peak["tokens"] = sum(len(x.prompt_ids) + x.result.new_tokens for x in gens)
            time.sleep(0.002)

    stamps: list[list[float]] = [[] for _ in gens]

    def consume(gen, times: list[float]) -> None:
        for _ in gen:  # a piece a token: the benchmark tokenizer's tokens are whole words
            times.append(time.perf_counter())

    threads = [threading.Thread(target=consume, args=(x, t)) for x, t in zip(gens, stamps)]
    watcher = threading.Thread(target=watch)
    steps_before = engine.steps
    started = time.perf_counter()
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    done.set()
    watcher.join()
    results = [x.result for x in gens]
    first_tokens = [started + r.prefill_seconds for r in results]
    ends = [started + r.prefill_seconds + r.decode_seconds for r in results]
    decoded = sum(r.decode_steps for r in results)
    window = max(ends) - min(first_tokens)
    # While every stream decodes (after the last one's first token, before the first one ends): no prompt
    # is being prefilled, so the gap between a stream's tokens is one decode step of all of them.
    steady_from, steady_to = max(t[0] for t in stamps), min(t[-1] for t in stamps)
    gaps = [b - a for t in stamps for a, b in zip(t, t[1:]) if a >= steady_from and b <= steady_to]
    return {
        "streams": n, "aggregate_tok_s": decoded / window,
        "latency_ms": statistics.median(r.decode_seconds / r.decode_steps * 1e3 for r in results),
        "ttft_s": statistics.median(r.prefill_seconds for r in results), "wall_s": wall,
        "new_tokens": sum(r.new_tokens for r in results), "kv_held": peak["held"], "kv_tokens": peak["tokens"],
        "step_ms": wall / (engine.steps - steps_before) * 1e3,
        "steady_ms": statistics.median(gaps) * 1e3 if gaps else float("nan"),
    }


def replay_ms(graph: torch.cuda.CUDAGraph, repeats: int = 20) -> float:
    """Milliseconds of one replay of ``graph``, replayed back to back after an untimed one."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def graph_replay_ms(loaded) -> dict[int, float]:
    """GPU time of one replay of each batch-size graph, replaying its last step's inputs (the streams are
    done; the engine is closed afterwards): the step without the host's part."""
    return {size: replay_ms(graph) for size, (graph, _) in loaded.engine.batched.graphs.items()}


def step_bytes(size: str, streams: int, mean_length: float, kv_element: int = 2) -> float:
    """What a decode step of ``streams`` rows must read at least: the 4-bit g128 layers, the fp16 head, and
    each row's keys and values (``kv_element`` bytes each: 2 fp16, 1 fp8; every layer) at ``mean_length``
    tokens."""
    shape = SIZES[size]
    h, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    weights = layers * (g128_bytes(h, 3 * h) + g128_bytes(h, h) + g128_bytes(h, 2 * i) + g128_bytes(i, h))
    weights += VOCAB * h * 2
    kv_per_token = 2 * layers * h * kv_element  # Llama-2 7B and 13B: as many kv heads as heads
    return weights + streams * mean_length * kv_per_token


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--streams", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--backend", choices=["exllama", "triton", "cpu"],
                        help="default: exllama on the GPU, cpu on the CPU")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--prompt", type=int, default=PROMPT, help="tokens of each stream's prompt")
    parser.add_argument("--new", type=int, default=NEW, help="new tokens of each stream")
    parser.add_argument("--kv-cache", default="auto", choices=["auto", "fp8"], help="the engine's cache type")
    opts = parser.parse_args()
    on_gpu = opts.device == "cuda"
    backend = opts.backend or ("exllama" if on_gpu else "cpu")
    where = torch.cuda.get_device_properties(0).name if on_gpu else f"CPU, {os.cpu_count()} cores"
    print(f"{where}; {time.strftime('%Y-%m-%d')}; backend {backend}; KV cache {opts.kv_cache}; {opts.prompt}-token "
          f"prompts, {opts.new} new tokens each", flush=True)
    bandwidth = copy_bandwidth() if on_gpu else None
    rows = []
    for size in opts.sizes:
        with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
            path = write_checkpoint(Path(tmp) / "m", size, act_order=False, device=opts.device)
            cache = max(opts.streams) * (opts.prompt + opts.new) + 1024
            loaded = load_model(path, LoadOptions(device=opts.device, backend=backend, kv_cache=opts.kv_cache,
                                                  context_length=opts.prompt + opts.new + 64, cache_tokens=cache))
            # warm-up: on the GPU kernels tuned and graphs of every bucket captured; on the CPU pages touched
            for n in opts.streams if on_gpu else opts.streams[:1]:
                run_streams(loaded, n, 0, opts.prompt, opts.new)
            base = None
            for n in opts.streams:
                r = run_streams(loaded, n, n, opts.prompt, opts.new)
                base = base or r
                r["size"], r["vs_1"] = size, r["aggregate_tok_s"] / base["aggregate_tok_s"]
                r["latency_vs_1"] = r["latency_ms"] / base["latency_ms"]
                if bandwidth:
                    kv_element = loaded.engine.pool.k.element_size()
                    r["floor_ms"] = step_bytes(size, n, opts.prompt + opts.new / 2, kv_element) / bandwidth * 1e3
                    r["floor_vs_1"] = n / r["floor_ms"] * 1e3 / base["aggregate_tok_s"]
                rows.append(r)
                print(f"  {size} x{n}: {r['aggregate_tok_s']:.0f} tok/s, {r['latency_ms']:.2f} ms/token", flush=True)
            if loaded.engine.batched is not None:
                replay = graph_replay_ms(loaded)
                for r in rows:
                    if r["size"] == size and r["streams"] > 1:
                        r["replay_ms"] = replay.get(loaded.engine.batched.bucket(r["streams"]))
            loaded.engine.close()
            del loaded
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()
    print("\n| model | streams | aggregate decode tok/s | × 1 stream | per-token latency (ms) | × 1 stream | "
          "TTFT median (s) | wall (s) | ms per engine step | steady ms per token | GPU ms per graph replay | "
          "floor ms (× 1 stream) | tokens | KV held at peak / sum of lengths |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        replay = "-" if r.get("replay_ms") is None else f"{r['replay_ms']:.2f}"
        floor = "-" if "floor_ms" not in r else f"{r['floor_ms']:.2f} ({r['floor_vs_1']:.1f})"
        print(f"| {r['size']} | {r['streams']} | {r['aggregate_tok_s']:.0f} | {r['vs_1']:.2f} | {r['latency_ms']:.2f} | "
              f"{r['latency_vs_1']:.2f} | {r['ttft_s']:.2f} | {r['wall_s']:.1f} | {r['step_ms']:.2f} | "
              f"{r['steady_ms']:.2f} | {replay} | {floor} | {r['new_tokens']} | {r['kv_held']} / {r['kv_tokens']} |")


if __name__ == "__main__":
    main()

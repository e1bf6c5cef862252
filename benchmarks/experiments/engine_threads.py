"""The engine's host side at many streams, on any machine: the real engine, consumers and tokenizer, with
the GPU's batched decode replaced by a stand-in that takes a fixed time per step (the host waits for it with
the GIL released, as for the token pipe's event). The steady gap between a stream's tokens against that
fixed time is what the host adds to a decode step of N streams.

    python -m benchmarks.experiments.engine_threads [--streams 16 64] [--gpu-ms 10] [--switch-ms 0.2 5]

Prompts are prefilled by a tiny real model on the CPU; only the batched decode steps are stood in for.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from backends.generation import Generation
from backends.loader import LoadOptions, load_model
from backends.paged_attention import DecodeStep
from backends.sampling import SamplingParams
from benchmarks.llama2 import write_plain_tokenizer
from tests.gptq_testing import tiny_config, write_random_checkpoint

VOCAB = 2048


class StandInGPU:
    """The batched decoder and its token pipe: a step queued at t runs from max(t, the previous step's end)
    for ``step_s``; the tokens sampled from a step are ready at its end. ``fill`` is the real one (host
    work the real step does)."""

    def __init__(self, engine, step_s: float):
        self.step_s, self.ends, self.ready_at = step_s, 0.0, 0.0
        self.engine = engine
        self.logits = torch.randn(engine.config.max_batch, VOCAB)
        self.steps: dict[int, DecodeStep] = {}
        self.tokens: list[int] = []
        self.max_blocks = -(-engine.context_length // engine.config.block_size)

    # the BatchedDecoder side
    def step(self, rows, tokens=None) -> torch.Tensor:
        size = len(rows)
        if size not in self.steps:
            self.steps[size] = DecodeStep(self.engine.pool, size, self.max_blocks, 0, None, 1)
        self.steps[size].fill(rows, tokens)
        self.ends = max(time.perf_counter(), self.ends) + self.step_s
        return self.logits[:size]

    # the TokenPipe side
    def send(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens.tolist()
        self.ready_at = self.ends  # the step whose logits were sampled is the last one queued

    def receive_all(self) -> list[int]:
        wait = self.ready_at - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        return self.tokens


def steady_gap_ms(loaded, n: int, prompt: int, new: int) -> tuple[float, float]:
    g = torch.Generator().manual_seed(n)
    prompts = [torch.randint(3, VOCAB, (prompt,), generator=g).tolist() for _ in range(n)]
    params = SamplingParams(temperature=0, max_new_tokens=new, stop_token_ids=())
    gens = [Generation(loaded, p, params) for p in prompts]
    stamps: list[list[float]] = [[] for _ in gens]

    def consume(gen, times) -> None:
        for _ in gen:
            times.append(time.perf_counter())

    threads = [threading.Thread(target=consume, args=(x, t)) for x, t in zip(gens, stamps)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start, end = max(t[0] for t in stamps), min(t[-1] for t in stamps)
    gaps = [b - a for t in stamps for a, b in zip(t, t[1:]) if a >= start and b <= end]
    tokens = sum(len(t) for t in stamps)
    return statistics.median(gaps) * 1e3, tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--gpu-ms", type=float, default=10.0, help="the stand-in's time per decode step")
    parser.add_argument("--switch-ms", nargs="+", type=float, default=[0.2, 5.0])
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=200)
    opts = parser.parse_args()
    config = tiny_config(vocab_size=VOCAB, max_position_embeddings=1024)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(Path(tmp) / "m", config, 4, 32, False)
        write_plain_tokenizer(path, VOCAB)
        loaded = load_model(path, LoadOptions(device="cpu", context_length=opts.prompt + opts.new + 16,
                                              cache_tokens=max(opts.streams) * (opts.prompt + opts.new + 16)))
        engine = loaded.engine
        stand_in = StandInGPU(engine, opts.gpu_ms / 1e3)
        engine.batched, engine.batch_pipe = stand_in, stand_in
        print(f"{sys.version.split()[0]}; stand-in GPU step {opts.gpu_ms} ms; {opts.prompt}-token prompts, "
              f"{opts.new} new tokens\n")
        print("| streams | switch interval ms | steady ms per token | host's excess over the GPU step |")
        print("|---|---|---|---|")
        before = sys.getswitchinterval()
        for n in opts.streams:
            for switch in opts.switch_ms:
                sys.setswitchinterval(switch / 1e3)
                gap, _ = steady_gap_ms(loaded, n, opts.prompt, opts.new)
                print(f"| {n} | {switch} | {gap:.2f} | {gap - opts.gpu_ms:+.2f} |", flush=True)
        sys.setswitchinterval(before)
        engine.close()


if __name__ == "__main__":
    main()

"""Where a batched decode step's time goes on the host: the engine thread's step time split into waiting
for the GPU (the token pipe) and the rest, under a few variants of the consumers and the interpreter's
thread switch interval, and a cProfile taken while the engine steps (Python 3.12's profiler sees every
thread: the consumers' calls are in it too).

    python -m benchmarks.experiments.engine_host [--size 7B] [--streams 16 64]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from backends import generation
from backends.loader import LoadOptions, load_model
from benchmarks.batched_decode import run_streams
from benchmarks.llama2 import write_checkpoint

PROMPT, NEW = 512, 256


class StepClock:
    """Wraps the engine's step and its token pipe's wait, summing their wall time."""

    def __init__(self, engine):
        self.engine, self.step_s, self.wait_s, self.steps = engine, 0.0, 0.0, 0
        self.profile: cProfile.Profile | None = None
        step, pipe = engine._step, engine.batch_pipe
        receive = pipe.receive_all

        def timed_step() -> None:
            began = time.perf_counter()
            if self.profile is not None:
                self.profile.enable()
            try:
                step()
            finally:
                if self.profile is not None:
                    self.profile.disable()
                self.step_s += time.perf_counter() - began
                self.steps += 1

        def timed_receive() -> list[int]:
            began = time.perf_counter()
            try:
                return receive()
            finally:
                self.wait_s += time.perf_counter() - began

        engine._step = timed_step
        pipe.receive_all = timed_receive

    def reset(self) -> None:
        self.step_s, self.wait_s, self.steps = 0.0, 0.0, 0


@contextmanager
def switch_interval(seconds: float):
    before = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


@contextmanager
def wrapped_detokenizing():
    """Text decoded through transformers' ``decode``, as before ``generation.text_decoder``."""
    direct = generation.text_decoder
    generation.text_decoder = lambda tokenizer: lambda ids: tokenizer.decode(
        ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    try:
        yield
    finally:
        generation.text_decoder = direct


@contextmanager
def _both(seconds: float):
    with switch_interval(seconds), wrapped_detokenizing():
        yield


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="7B")
    parser.add_argument("--streams", nargs="+", type=int, default=[16, 64])
    opts = parser.parse_args()
    variants = {f"switch {ms} ms": (lambda ms=ms: switch_interval(ms / 1e3)) for ms in (5, 1, 0.5, 0.2)}
    variants["switch 0.2 ms, detokenizing through transformers"] = lambda: _both(0.0002)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        path = write_checkpoint(Path(tmp) / "m", opts.size, act_order=False)
        loaded = load_model(path, LoadOptions(device="cuda", backend="exllama", context_length=PROMPT + NEW + 64,
                                              cache_tokens=max(opts.streams) * (PROMPT + NEW) + 1024))
        clock = StepClock(loaded.engine)
        for n in opts.streams:
            run_streams(loaded, n, 0, PROMPT, NEW)  # graphs captured, kernels tuned
        print("| streams | variant | tok/s | engine steps | ms a step | of which waiting on the GPU | host ms |")
        print("|---|---|---|---|---|---|---|")
        names = list(variants)
        for n in opts.streams:
            for name in [*names, *reversed(names)]:  # two rounds, the second in reverse order
                variant = variants[name]
                clock.reset()
                with variant():
                    r = run_streams(loaded, n, n, PROMPT, NEW)
                step, wait = clock.step_s / clock.steps * 1e3, clock.wait_s / clock.steps * 1e3
                print(f"| {n} | {name} | {r['aggregate_tok_s']:.0f} | {clock.steps} | {step:.2f} | {wait:.2f} | "
                      f"{step - wait:.2f} |", flush=True)
        for n in opts.streams:
            clock.reset()
            clock.profile = cProfile.Profile()
            run_streams(loaded, n, n, PROMPT, NEW)
            out = io.StringIO()
            stats = pstats.Stats(clock.profile, stream=out)
            stats.sort_stats("tottime").print_stats(30)
            print(f"\n## {n} streams, {clock.steps} steps: every thread's calls during the steps, by own time\n")
            print(out.getvalue())
            clock.profile = None
        loaded.engine.close()


if __name__ == "__main__":
    main()

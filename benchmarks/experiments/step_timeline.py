"""Where the batched benchmark's wall time goes, step by step: each engine step of a `batched_decode` run
timed on the engine thread and told apart as a mixed step (some prompt being prefilled; run eagerly) or a
decode step (graph replay), with the engine's idle time between steps. It answers why the aggregate falls
short of the steady step: the prefill steps, slow decode steps, or time outside the steps.

    python -m benchmarks.experiments.step_timeline [--size 7B] [--streams 16 64] [--switch-ms 0.2 5]
        [--cudnn no yes] [--rounds 2] [--detail] [--cprofile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from backends import paged_attention
from backends.loader import LoadOptions, load_model
from benchmarks.batched_decode import NEW, PROMPT, run_streams
from benchmarks.llama2 import write_checkpoint


class Timeline:
    """Wraps the engine's step: (began, seconds, mixed, running) of each."""

    def __init__(self, engine):
        self.steps: list[tuple[float, float, bool, int]] = []
        self.profile: cProfile.Profile | None = None  # enabled around the mixed steps when set
        self.forward_s = 0.0  # host seconds in the mixed steps' forward (its kernels enqueued)
        self.spans: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # the mixed forwards' GPU spans
        step, forward = engine._step, engine.model.forward_paged

        def timed() -> None:
            mixed = bool(engine._waiting) or any(s.prefilling for s in engine._running)
            began = time.perf_counter()
            if mixed and self.profile is not None:
                self.profile.enable()
            try:
                step()
            finally:
                if mixed and self.profile is not None:
                    self.profile.disable()
                self.steps.append((began, time.perf_counter() - began, mixed, len(engine._running)))

        def timed_forward(*args, **kwargs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            began = time.perf_counter()
            start.record()
            try:
                return forward(*args, **kwargs)
            finally:
                end.record()
                self.forward_s += time.perf_counter() - began
                self.spans.append((start, end))

        engine._step = timed
        engine.model.forward_paged = timed_forward

    def gpu_span_s(self) -> float:
        """Seconds from each mixed forward's first kernel's start to its last's end, summed: its kernels'
        time plus any time the GPU waited for the host to launch the next."""
        torch.cuda.synchronize()
        return sum(start.elapsed_time(end) for start, end in self.spans) / 1e3


def summary(label: str, seconds: list[float]) -> str:
    if not seconds:
        return f"{label}: none"
    ms = sorted(s * 1e3 for s in seconds)
    p90 = ms[int(0.9 * (len(ms) - 1))]
    return (f"{label}: {len(ms)} steps, {sum(ms):.0f} ms; median {statistics.median(ms):.2f}, mean "
            f"{statistics.mean(ms):.2f}, p90 {p90:.2f}, max {ms[-1]:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="7B")
    parser.add_argument("--streams", nargs="+", type=int, default=[16, 64])
    parser.add_argument("--switch-ms", nargs="+", type=float, default=[0],
                        help="the interpreter's thread switch interval for the runs (0: the engine's)")
    parser.add_argument("--cudnn", nargs="+", choices=["yes", "no"], default=["no"],
                        help="whether prompt chunks may attend through cuDNN's SDPA "
                             "(paged_attention.PROMPT_SDPA_BACKENDS)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--detail", action="store_true", help="each run's steps in detail")
    parser.add_argument("--cprofile", action="store_true", help="profile the last stream count's mixed steps")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        path = write_checkpoint(Path(tmp) / "m", opts.size, act_order=False)
        loaded = load_model(path, LoadOptions(device="cuda", backend="exllama", context_length=PROMPT + NEW + 64,
                                              cache_tokens=max(opts.streams) * (PROMPT + NEW) + 1024))
        timeline = Timeline(loaded.engine)
        engine_switch = sys.getswitchinterval()
        for n in opts.streams:
            run_streams(loaded, n, 0)  # graphs captured, kernels tuned
        runs = [(n, ms, cudnn) for n in opts.streams for _ in range(opts.rounds) for ms in opts.switch_ms
                for cudnn in opts.cudnn]
        chosen = paged_attention.PROMPT_SDPA_BACKENDS
        table = []
        for seed, (n, switch_ms, cudnn) in enumerate(runs, start=1000):  # prompts never seen: none reused
            paged_attention.PROMPT_SDPA_BACKENDS = None if cudnn == "yes" else chosen
            sys.setswitchinterval(switch_ms / 1e3 if switch_ms else engine_switch)
            timeline.steps.clear()
            timeline.forward_s = 0.0
            timeline.spans.clear()
            began = time.perf_counter()
            r = run_streams(loaded, n, seed)
            steps = timeline.steps
            mixed = [s[1] for s in steps if s[2]]
            decode = [s[1] for s in steps if not s[2]]
            table.append(f"| {n} | {sys.getswitchinterval() * 1e3:.1f} | {cudnn} | {r['aggregate_tok_s']:.0f} | "
                         f"{r['ttft_s']:.2f} | {len(mixed)}, {sum(mixed) * 1e3:.0f} ms, median "
                         f"{statistics.median(mixed) * 1e3:.1f} | {timeline.forward_s * 1e3:.0f} | "
                         f"{timeline.gpu_span_s() * 1e3:.0f} | {statistics.median(decode) * 1e3:.2f} |")
            if opts.detail:
                first, last = steps[0], steps[-1]
                busy = sum(s[1] for s in steps)
                span = last[0] + last[1] - first[0]
                print(f"\n## {opts.size}, {n} streams, switch interval {sys.getswitchinterval() * 1e3:.1f} ms, "
                      f"cuDNN SDPA {cudnn}: {r['aggregate_tok_s']:.0f} tok/s, wall {r['wall_s']:.2f} s")
                print(f"- first step began {(first[0] - began) * 1e3:.1f} ms after the streams were started; the "
                      f"steps span {span * 1e3:.0f} ms, of which in steps {busy * 1e3:.0f} ms")
                print("- " + summary("mixed (prefilling)", mixed))
                print("- " + summary("decode", decode))
                print("- " + summary(f"decode with all {n} running", [s[1] for s in steps if not s[2] and s[3] == n]))
                timing = [(round((s[0] - began) * 1e3), round(s[1] * 1e3, 1), s[3]) for s in steps if s[2]]
                print(f"- mixed steps (began ms, took ms, running): {timing[:24]}", flush=True)
        print(f"\n{opts.size}; mixed steps prefill prompts beside decoding streams (run eagerly); forward: the host's "
              "time to enqueue the mixed steps' forwards, and their span on the GPU\n")
        print("| streams | switch interval ms | cuDNN SDPA | tok/s | TTFT median s | mixed steps | forward "
              "enqueued ms | forward GPU span ms | decode step median ms |")
        print("|---|---|---|---|---|---|---|---|---|")
        print("\n".join(table), flush=True)
        if opts.cprofile:
            n = opts.streams[-1]
            timeline.profile = cProfile.Profile()
            run_streams(loaded, n, 999)  # prompts not seen before: nothing reused
            out = io.StringIO()
            pstats.Stats(timeline.profile, stream=out).sort_stats("tottime").print_stats(30)
            print(f"\n## {n} streams: the mixed steps' calls (every thread), by own time\n{out.getvalue()}")
        loaded.engine.close()


if __name__ == "__main__":
    main()

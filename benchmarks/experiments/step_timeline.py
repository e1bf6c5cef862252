"""Where the batched benchmark's wall time goes, step by step: each engine step of a `batched_decode` run
timed on the engine thread and told apart as a mixed step (some prompt being prefilled; run eagerly) or a
decode step (graph replay), with the engine's idle time between steps. It answers why the aggregate falls
short of the steady step: the prefill steps, slow decode steps, or time outside the steps.

    python -m benchmarks.experiments.step_timeline [--size 7B] [--streams 16 64]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from backends.loader import LoadOptions, load_model
from benchmarks.batched_decode import NEW, PROMPT, run_streams
from benchmarks.llama2 import write_checkpoint


class Timeline:
    """Wraps the engine's step: (began, seconds, mixed, running) of each."""

    def __init__(self, engine):
        self.steps: list[tuple[float, float, bool, int]] = []
        step = engine._step

        def timed() -> None:
            mixed = bool(engine._waiting) or any(s.prefilling for s in engine._running)
            began = time.perf_counter()
            try:
                step()
            finally:
                self.steps.append((began, time.perf_counter() - began, mixed, len(engine._running)))

        engine._step = timed


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
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        path = write_checkpoint(Path(tmp) / "m", opts.size, act_order=False)
        loaded = load_model(path, LoadOptions(device="cuda", backend="exllama", context_length=PROMPT + NEW + 64,
                                              cache_tokens=max(opts.streams) * (PROMPT + NEW) + 1024))
        timeline = Timeline(loaded.engine)
        for n in opts.streams:
            run_streams(loaded, n, 0)  # graphs captured, kernels tuned
        for n in opts.streams:
            timeline.steps.clear()
            began = time.perf_counter()
            r = run_streams(loaded, n, n)
            steps = timeline.steps
            first, last = steps[0], steps[-1]
            busy = sum(s[1] for s in steps)
            span = last[0] + last[1] - first[0]
            print(f"\n## {opts.size}, {n} streams: {r['aggregate_tok_s']:.0f} tok/s, TTFT median {r['ttft_s']:.2f} s, "
                  f"wall {r['wall_s']:.2f} s")
            print(f"- first step began {(first[0] - began) * 1e3:.1f} ms after the streams were started; the steps "
                  f"span {span * 1e3:.0f} ms, of which in steps {busy * 1e3:.0f} ms, between them "
                  f"{(span - busy) * 1e3:.0f} ms")
            print("- " + summary("mixed (prefilling)", [s[1] for s in steps if s[2]]))
            print("- " + summary("decode", [s[1] for s in steps if not s[2]]))
            decode_full = [s[1] for s in steps if not s[2] and s[3] == n]
            print("- " + summary(f"decode with all {n} running", decode_full))
            mixed = [(round((s[0] - began) * 1e3), round(s[1] * 1e3, 1), s[3]) for s in steps if s[2]]
            print(f"- mixed steps (began ms, took ms, running): {mixed[:24]}")
            slow = sorted(((s[1] * 1e3, s[0] - began) for s in steps if not s[2]), reverse=True)[:8]
            print("- slowest decode steps (ms, at s): " + ", ".join(f"{ms:.1f} @ {at:.2f}" for ms, at in slow),
                  flush=True)
        loaded.engine.close()


if __name__ == "__main__":
    main()

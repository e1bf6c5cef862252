"""Which of the decode step's fusions pays: one 7B model, its CUDA-graph step timed with each switched on/off.

    python benchmarks/decode_variants.py [--size 7B] [--act-order]

Variants: the RMSNorm folded into the GEMVs (else a kernel per norm), the
one-token attention kernel (else the rotary kernel + cuDNN SDPA with an
additive mask), programmatic dependent launch of the CUDA kernels, and the
decode chain that hands the GEMVs' split-K sums to the next kernel
(backends/exllama_decode.py; it needs the first two). ``--define`` builds the
kernel library with a macro, e.g. Q4_NO_WAIT (no kernel waits for the previous
one: wrong results, the time without the dependencies).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.cuda_graph import GraphedDecoder  # noqa: E402
from backends.exllama_backend import ExllamaLinear  # noqa: E402
from backends.loader import LoadOptions, build_model  # noqa: E402
from benchmarks.decode import CONTEXT, SIZES, llama2_config, write_random_gptq  # noqa: E402
from kernels import cuda_lib, q4_gemv  # noqa: E402


def step_ms(model, steps: int = 128, start: int = 16) -> float:
    decoder = GraphedDecoder(model)
    with torch.inference_mode():
        for i in range(4):
            decoder.step(1, start + i)
        torch.cuda.synchronize()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for i in range(steps):
            decoder.step(1, start + i)
        end.record()
        end.synchronize()
    return begin.elapsed_time(end) / steps


def step_tune(model, linears, chain) -> None:
    """Each one-row GEMV configuration chosen by the whole step's time (one shape at a time, the others fixed):
    the per-shape tuner times a GEMV after itself, where in a step it follows another kernel."""
    os.environ["GPTQ_CUDA_PDL"] = "1"
    model.decode_chain = chain
    for m in linears:
        m.folds_norm = True
    model.setup_cache(batch=1, max_seq_len=CONTEXT)
    baseline = step_ms(model)
    print(f"\nstep-level tuning, from {baseline:.3f} ms per step")
    print("| GEMV (M, N, K, norm, x_mode, sums) | tuned alone | in the step | step ms |")
    print("|---|---|---|---|")
    for key in sorted(k for k in q4_gemv.TUNER.best if k[0] == 1):
        alone = q4_gemv.TUNER.best[key]
        times = {}
        for config in (c for c in q4_gemv.CONFIGS if q4_gemv._fits(c, 1)):
            q4_gemv.TUNER.best[key] = config
            times[config] = step_ms(model, steps=64)
        q4_gemv.TUNER.best[key] = min(times, key=times.get)
        print(f"| {key} | {alone} ({times[alone]:.3f}) | {q4_gemv.TUNER.best[key]} | "
              f"{times[q4_gemv.TUNER.best[key]]:.3f} |", flush=True)
    print(f"step-tuned: {step_ms(model):.3f} ms per step (was {baseline:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", default="7B", choices=list(SIZES))
    parser.add_argument("--act-order", action="store_true")
    parser.add_argument("--define", nargs="*", default=[], help="GEMV library variants to time as well (A,B: both)")
    parser.add_argument("--quick", action="store_true", help="only everything on (and the --define variants)")
    parser.add_argument("--step-tune", action="store_true",
                        help="then pick each GEMV's launch configuration by the step's time instead of its own")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_gptq(Path(tmp) / "m", llama2_config(opts.size), opts.act_order)
        model, *_ = build_model(path, LoadOptions(backend="exllama", context_length=CONTEXT))
    linears = [m for m in model.modules() if isinstance(m, ExllamaLinear)]
    print(f"{opts.size} act-order={opts.act_order}, {torch.cuda.get_device_name()}")
    print("| norm folded | attention kernel | PDL | sums chain | step ms | tok/s |")
    print("|---|---|---|---|---|---|")
    chain = model.decode_chain
    combos = [(True, True, True, True), (True, True, True, False)]
    if not opts.quick:
        combos += [(True, True, False, True)] + [
            (*c, False) for c in itertools.product((False, True), (False, True), (True, False)) if c[:2] != (True, True)]
        combos.append((True, True, False, False))
    for fold, attn, pdl, chained in combos:
        os.environ["GPTQ_CUDA_PDL"] = "1" if pdl else "0"
        model.decode_chain = chain if chained else None
        for m in linears:
            m.folds_norm = fold
        model.setup_cache(batch=1, max_seq_len=CONTEXT)
        if not attn:
            for layer in model.layers:
                layer.self_attn.decode_workspace = None
        ms = step_ms(model)
        print(f"| {fold} | {attn} | {pdl} | {chained} | {ms:.3f} | {1e3 / ms:.0f} |", flush=True)
    if opts.step_tune:
        step_tune(model, linears, chain)
    # All on, with a variant of the GEMV library (e.g. Q4_GEMV_SMEM_WEIGHTS), re-tuned.
    for define in opts.define:
        os.environ["GPTQ_CUDA_PDL"] = "1"
        model.decode_chain = chain
        for m in linears:
            m.folds_norm = True
        model.setup_cache(batch=1, max_seq_len=CONTEXT)
        built = cuda_lib.library
        cuda_lib.library = lambda arch, defines=(): built(arch, (*defines, *define.split(",")))
        q4_gemv.TUNER.best.clear()
        ms = step_ms(model)
        print(f"| True | True | True, {define} | True | {ms:.3f} | {1e3 / ms:.0f} |", flush=True)
        cuda_lib.library = built


if __name__ == "__main__":
    main()

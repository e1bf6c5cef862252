"""Perplexity of every SmolLM2 test branch next to the fp32 model it was quantized from.

    python -m benchmarks.perplexity [--device cpu|cuda] [--backend reference]

Builds (or reuses) the cached fixture checkpoints, then prints a table.
"""

from __future__ import annotations

import argparse
import time

from backends.loader import LoadOptions, load_model
from backends.perplexity import perplexity
from tests.fixture_models import BRANCHES, DATA, base_checkpoint, branch_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="reference")
    opts = parser.parse_args()
    texts = {"eval.txt": (DATA / "eval.txt").read_text(), "calibration.txt": (DATA / "calibration.txt").read_text()}
    rows = []
    base = load_model(base_checkpoint(), LoadOptions(device=opts.device, backend="reference"))
    base_ppl = {name: perplexity(base, text) for name, text in texts.items()}
    rows.append(("fp32 (SmolLM2-135M-Instruct)", "-", base_ppl, base.memory_bytes()))
    for name, branch in BRANCHES.items():
        loaded = load_model(branch_checkpoint(name), LoadOptions(device=opts.device, backend=opts.backend))
        q = branch.qconfig
        desc = f"{q.bits}b g{q.group_size} {'act' if q.desc_act else 'noact'} {'sym' if q.sym else 'asym'}"
        rows.append((name, desc, {n: perplexity(loaded, t) for n, t in texts.items()}, loaded.memory_bytes()))
    print(f"\nperplexity, {time.strftime('%Y-%m-%d')}, device {opts.device}, backend {opts.backend}\n")
    print(f"| {'branch':32} | {'quantization':22} | {'eval.txt':>9} | {'vs fp32':>8} | {'calibration.txt':>15} |")
    print(f"|{'-' * 34}|{'-' * 24}|{'-' * 11}|{'-' * 10}|{'-' * 17}|")
    for name, desc, ppl, _ in rows:
        ratio = ppl["eval.txt"] / base_ppl["eval.txt"] - 1
        print(f"| {name:32} | {desc:22} | {ppl['eval.txt']:9.3f} | {ratio:+8.1%} | {ppl['calibration.txt']:15.3f} |")


if __name__ == "__main__":
    main()

"""What an fp8 (e4m3) KV cache costs in accuracy on a real model: the SmolLM2 test branches score the
evaluation text through the engine's paged attention with a cache in the model's dtype and with an fp8
one, window by window; perplexity of each, how often the most likely next token is the same, and the mean
KL divergence of the fp8 cache's next-token distribution from the full one's.

    python -m benchmarks.experiments.kv_fp8_quality [--device cpu] [--backend reference] [--window 512]
        [--text eval|calibration]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from backends.loader import LoadOptions, load_model
from backends.paged_attention import PagedStep, Segment
from backends.paged_cache import BLOCK_SIZE, CacheShape, KVPool
from tests.fixture_models import BRANCHES, DATA, branch_checkpoint


def window_logits(loaded, ids: list[int], kv_dtype: torch.dtype) -> torch.Tensor:
    args = loaded.args
    blocks = -(-len(ids) // BLOCK_SIZE)
    pool = KVPool(CacheShape(args.n_layers, args.n_kv_heads, args.head_dim, blocks), kv_dtype, loaded.device)
    step = PagedStep(pool, [Segment(0, len(ids), 0, tuple(range(blocks)))], args.sliding_window, loaded.dtype,
                     args.n_heads)
    tokens = torch.tensor(ids, device=loaded.device)
    with torch.inference_mode():
        return loaded.model.forward_paged(tokens, step.positions, step, torch.arange(len(ids), device=loaded.device))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="reference")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--branches", nargs="+", default=list(BRANCHES))
    parser.add_argument("--text", default="eval", choices=["eval", "calibration"], help="tests/data/TEXT.txt")
    opts = parser.parse_args()
    text = (DATA / f"{opts.text}.txt").read_text()
    print(f"fp8 KV cache against the model's dtype, {time.strftime('%Y-%m-%d')}, device {opts.device}, backend "
          f"{opts.backend}, {opts.text}.txt in windows of {opts.window} tokens\n")
    print("| branch | model dtype | tokens | perplexity, full cache | perplexity, fp8 cache | change | top-1 same | "
          "mean KL (nats) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in opts.branches:
        loaded = load_model(branch_checkpoint(name), LoadOptions(device=opts.device, backend=opts.backend))
        ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
        nll = {"full": 0.0, "fp8": 0.0}
        same, kl, count = 0, 0.0, 0
        for start in range(0, len(ids) - 1, opts.window):
            chunk = ids[start : start + opts.window]
            if len(chunk) < 2:
                break
            target = torch.tensor(chunk[1:], device=loaded.device)
            full = window_logits(loaded, chunk, loaded.dtype)[:-1].float().log_softmax(-1)
            fp8 = window_logits(loaded, chunk, torch.float8_e4m3fn)[:-1].float().log_softmax(-1)
            rows = torch.arange(len(target), device=loaded.device)
            nll["full"] -= float(full[rows, target].sum())
            nll["fp8"] -= float(fp8[rows, target].sum())
            same += int((full.argmax(-1) == fp8.argmax(-1)).sum())
            kl += float((full.exp() * (full - fp8)).sum())
            count += len(target)
        ppl = {k: math.exp(v / count) for k, v in nll.items()}
        print(f"| {name} | {str(loaded.dtype).removeprefix('torch.')} | {count} | {ppl['full']:.3f} | "
              f"{ppl['fp8']:.3f} | {ppl['fp8'] / ppl['full'] - 1:+.2%} | {same / count:.1%} | {kl / count:.4f} |",
              flush=True)
        loaded.engine.close()


if __name__ == "__main__":
    main()

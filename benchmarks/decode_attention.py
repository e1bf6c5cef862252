"""The one-token attention kernel against cuDNN/flash SDPA (+ the rotary kernel it replaces), 7B/GQA shapes.

    python -m benchmarks.decode_attention [--ncu]
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import torch
import torch.nn.functional as F

from kernels import decode_attention as da
from kernels import rotary
from kernels.timing import graph_us

SEQ = 4096


def case(n_heads: int, n_kv_heads: int, head_dim: int, position: int, kv_len: int):
    q, k, v = (torch.randn(h * head_dim, device="cuda", dtype=torch.float16) for h in (n_heads, n_kv_heads, n_kv_heads))
    k_cache, v_cache = (torch.randn(1, n_kv_heads, SEQ, head_dim, device="cuda", dtype=torch.float16) for _ in "kv")
    cos, sin = torch.rand(1, head_dim, device="cuda"), torch.rand(1, head_dim, device="cuda")
    pos = torch.tensor([position], device="cuda")
    ws = da.Workspace(n_heads, n_kv_heads, head_dim, torch.device("cuda"))
    mask = torch.zeros(1, kv_len, device="cuda", dtype=torch.float16)
    mask[:, position + 1:] = float("-inf")

    def kernel(splits=None):
        da.decode_attention(q, k, v, cos, sin, pos, k_cache, v_cache, kv_len, None, ws, splits=splits)

    def sdpa():
        qr = rotary.rotary_qkv(q.view(1, 1, n_heads, head_dim), k.view(1, 1, n_kv_heads, head_dim),
                               v.view(1, 1, n_kv_heads, head_dim), cos, sin, k_cache, v_cache, pos).transpose(1, 2)
        F.scaled_dot_product_attention(qr, k_cache[:, :, :kv_len], v_cache[:, :, :kv_len], attn_mask=mask,
                                       enable_gqa=n_heads != n_kv_heads)

    return kernel, sdpa


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ncu", action="store_true", help="profile the kernel once with Nsight Compute")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # the process ncu profiles
    opts = parser.parse_args()
    if opts.one:
        kernel, _ = case(32, 32, 128, 20, 128)
        for _ in range(3):
            kernel()
        torch.cuda.synchronize()
        return
    if opts.ncu:
        subprocess.run(["ncu", "--kernel-name", "regex:decode_attention", "--launch-skip", "2", "--launch-count", "1",
                        "--section", "SpeedOfLight", "--section", "WarpStateStats", "--section", "SourceCounters",
                        "--section", "MemoryWorkloadAnalysis", sys.executable, "-m", "benchmarks.decode_attention", "--one"], check=False)
        return
    print(f"{torch.cuda.get_device_name()}")
    print("| heads / kv heads / dim | position | kv_len | kernel µs (splits) | rotary + SDPA µs | "
          "kernel µs at splits 1 / 2 / 4 / 8 / 16 |")
    print("|---|---|---|---|---|---|")
    for heads, kv_heads, dim in ((32, 32, 128), (40, 40, 128), (32, 8, 128)):
        for position, kv_len in ((20, 128), (200, 256), (1000, 1024), (4000, 4096)):
            kernel, sdpa = case(heads, kv_heads, dim, position, kv_len)
            chosen = da.splits_for(kv_len, kv_heads, torch.device("cuda"))
            each = " / ".join(f"{graph_us(lambda: kernel(s)):.1f}" for s in (1, 2, 4, 8, 16))
            print(f"| {heads}/{kv_heads}/{dim} | {position} | {kv_len} | {graph_us(kernel):.1f} ({chosen}) | "
                  f"{graph_us(sdpa):.1f} | {each} |", flush=True)


if __name__ == "__main__":
    main()

"""The model's head for one decoded token: RMSNorm + fp16 lm_head (cuBLAS) + cast, against kernels/head_gemv.cu.

    python benchmarks/head_gemv.py

Each timed as 20 calls captured in a CUDA graph (weights rotated past L2), in µs per call; effective bandwidth
from the weight bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backends.model import RMSNorm  # noqa: E402
from kernels import head_gemv  # noqa: E402
from kernels.q4_gemv import _graph_us  # noqa: E402

SHAPES = {"Llama-2-7B (32000 x 4096)": (32000, 4096), "Llama-2-13B (32000 x 5120)": (32000, 5120),
          "Llama-3-8B (128256 x 4096)": (128256, 4096)}


def main() -> None:
    print(torch.cuda.get_device_name())
    print("| lm_head | norm + cuBLAS + cast µs | head_gemv µs | head_gemv GB/s |")
    print("|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        copies = [(torch.randn(n, k, device="cuda") * 0.05).to(torch.float16) for _ in range(2)]
        norm = RMSNorm(k, 1e-5)
        norm.weight = torch.nn.Parameter(torch.ones(k, device="cuda", dtype=torch.float16), requires_grad=False)
        x = torch.randn(1, 1, k, device="cuda").to(torch.float16)
        calls = {"n": 0}

        def weight() -> torch.Tensor:
            calls["n"] += 1
            return copies[calls["n"] % len(copies)]

        plain = _graph_us(lambda: torch.nn.functional.linear(norm(x), weight()).float())
        fused = _graph_us(lambda: head_gemv.head_gemv(x, weight(), norm.weight, norm.eps))
        print(f"| {name} | {plain:.1f} | {fused:.1f} | {n * k * 2 / fused / 1e3:.0f} |", flush=True)
        del copies


if __name__ == "__main__":
    main()

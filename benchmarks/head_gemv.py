"""The model's head for one decoded token: RMSNorm + fp16 lm_head (cuBLAS) + cast, against kernels/head_gemv.cu.

    python -m benchmarks.head_gemv

Each timed by kernels.timing (CUDA-graph replay, weights rotated past L2), in µs per call; effective bandwidth
from the weight bytes.
"""

from __future__ import annotations

import torch

from backends.cuda_ops import CudaOps
from backends.model import RMSNorm
from kernels import head_gemv
from kernels.timing import cold_copies, graph_us, in_turn

SHAPES = {"Llama-2-7B (32000 x 4096)": (32000, 4096), "Llama-2-13B (32000 x 5120)": (32000, 5120),
          "Llama-3-8B (128256 x 4096)": (128256, 4096)}


def main() -> None:
    print(torch.cuda.get_device_name())
    print("| lm_head | norm + cuBLAS + cast µs | head_gemv µs | head_gemv GB/s |")
    print("|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        copies = cold_copies([(torch.randn(n, k, device="cuda") * 0.05).to(torch.float16)])
        norm = RMSNorm(k, 1e-5, CudaOps(torch.device("cuda")))  # as the model normalizes on a GPU
        norm.weight = torch.nn.Parameter(torch.ones(k, device="cuda", dtype=torch.float16), requires_grad=False)
        x = torch.randn(1, 1, k, device="cuda").to(torch.float16)
        plain = graph_us(in_turn(copies, lambda w: torch.nn.functional.linear(norm(x), w[0]).float()))
        fused = graph_us(in_turn(copies, lambda w: head_gemv.head_gemv(x, w[0], norm.weight, norm.eps)))
        print(f"| {name} | {plain:.1f} | {fused:.1f} | {n * k * 2 / fused / 1e3:.0f} |", flush=True)
        del copies


if __name__ == "__main__":
    main()

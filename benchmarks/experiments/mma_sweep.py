"""Every launch configuration of the tensor-core matmul timed at a few shapes and row counts, with and
without prefetching the weights into L2 ahead of the loads: which knobs matter; and the best one with its
weights left in L2, against the same from memory.

    python -m benchmarks.experiments.mma_sweep
"""

from __future__ import annotations

import torch

from benchmarks.experiments.mma_profile import SHAPES, layer
from kernels.timing import cold_copies, graph_us, in_turn

PREFETCH = (0, 12, 32)


def main() -> None:
    from kernels import q4_mma

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for name, (k, n) in SHAPES.items():
        t = layer(k, n)
        copies = cold_copies([t["qweight"], t["scales"], t["qzeros"]])
        for m in (8, 16, 64):
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            times = []
            for config in q4_mma.candidates(m, n, k, sms):
                for pf in PREFETCH:
                    cfg = (*config[:4], pf)
                    call = in_turn(copies, lambda w, cfg=cfg: q4_mma.q4_mma(x, w[0], w[1], w[2], 1, 128, config=cfg))
                    call()
                    times.append((graph_us(call, replays=5), cfg))
            times.sort()
            print(f"{name} ({k}x{n}) M={m}: best {times[0][0]:.1f} µs {times[0][1]}")
            print("  top:", ", ".join(f"{us:.1f} {c}" for us, c in times[:6]))
            for pf in PREFETCH:
                best = min(t for t in times if t[1][4] == pf)
                print(f"  prefetch {pf:2d}: {best[0]:.1f} µs {best[1]}")
            for depth in (2, 4, 8):
                best = min(t for t in times if t[1][1] == depth)
                print(f"  depth {depth}: {best[0]:.1f} µs {best[1]}")
            for wn in (1, 2, 4):
                best = min(t for t in times if t[1][3] == wn)
                print(f"  warps_n {wn}: {best[0]:.1f} µs {best[1]}")
            # the same call with its weights left in L2 (one copy, called again and again): what memory costs
            best = times[0][1]
            hot = graph_us(lambda: q4_mma.q4_mma(x, t["qweight"], t["scales"], t["qzeros"], 1, 128, config=best))
            print(f"  weights in L2: {hot:.1f} µs ({times[0][0]:.1f} from memory)")


if __name__ == "__main__":
    main()

import sys, torch, triton, numpy as np
sys.path.insert(0, ".")
from kernels.triton_gptq import _gptq_gemv_tile_kernel, _gemv_workspace
from kernels.gptq_format import reference_matmul
from tests.gptq_testing import random_gptq_layer
for (k, n), sym, xs in [((4096, 4096), True, 1.0), ((11008, 4096), False, 1.0), ((1024, 256), True, 100.0), ((1024, 256), False, 0.01)]:
    t = {key: v.cuda() for key, v in random_gptq_layer(k, n, 4, 128, False, sym, np.random.default_rng(1)).items()}
    x = (torch.randn(1, k, device="cuda") * xs).half()
    ref = reference_matmul(x.float(), t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 1)
    for bn, ck, c, w in [(128, 128, 2, 4), (64, 128, 2, 2), (128, 64, 4, 4), (128, 32, 8, 4)]:
        errs = []
        for paired in (False, True):
            out = torch.empty(1, n, device="cuda", dtype=torch.float16)
            ws = _gemv_workspace(n, x.device)
            split = triton.cdiv(k, ck * c)
            _gptq_gemv_tile_kernel[(triton.cdiv(n, bn), split)](x, t["qweight"], t["scales"], t["qzeros"], out, ws, ws, ws, n, k, 128,
                BITS=4, ZERO_OFFSET=1, BLOCK_N=bn, CHUNK_K=ck, CHUNKS=c, SPLIT_K=split, ASM=True, PDL=True, PAIRED=paired, num_warps=w, launch_pdl=True)
            errs.append(float((out.float() - ref).norm() / ref.norm()))
            assert not ws.any()
        print(k, n, sym, xs, (bn, ck, c, w), "rel err plain %.2e paired %.2e" % tuple(errs))

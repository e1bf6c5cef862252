"""The CUDA tensor-core 4-bit matmul (kernels/q4_mma.cu) against the fp32 dequantized reference, at every
format the exllama backend loads; GPU only (device)."""

import numpy as np
import pytest
import torch

from backends.packed_linear import contiguous_layout
from kernels.gptq_format import dequantize
from tests.gptq_testing import random_gptq_layer, relative_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA matmul needs a GPU (run on the device)")

TOLERANCE = 3e-3  # fp16 weights and rows, fp32 sums: a wrong fragment or row mapping is off by ~1


def regrouped(k: int, n: int, group_size: int, act_order: bool, sym: bool, seed: int):
    """A random layer as the exllama backend holds it (act-order rows sorted by group, perm int32), and its
    fp32 dequantized weight in checkpoint row order."""
    t = {key: v.cuda() for key, v in
         random_gptq_layer(k, n, 4, group_size, act_order, sym, np.random.default_rng(seed)).items()}
    w = dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 1)
    gs = k if group_size == -1 else group_size
    qweight, perm, kernel_gs = contiguous_layout(t["qweight"], t["g_idx"], 4, gs)
    assert kernel_gs == gs
    perm32 = perm.to(torch.int32).contiguous() if perm is not None else None
    return qweight, t["scales"], t["qzeros"], gs, perm32, w


@pytest.mark.parametrize("k, n, group_size, act_order, sym", [
    (4096, 1024, 128, False, True), (4096, 1024, 128, True, True), (576, 1536, 32, True, False),
    (1024, 1280, 64, False, False), (11008, 512, -1, False, False), (352, 328, 32, False, True)])
def test_every_configuration_matches_the_reference(k, n, group_size, act_order, sym):
    """Every launch configuration the tuner may pick (columns per block, depth, split of K), at row counts
    across the kernel's 8/16/32/64-row instances and between them."""
    from kernels import q4_mma

    qweight, scales, qzeros, gs, perm, w = regrouped(k, n, group_size, act_order, sym, k + n)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for m in (1, 5, 8, 16, 17, 33, 64):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        ref = x.float() @ w
        configs = q4_mma.candidates(m, n, k, sms)
        assert configs, m
        configs += [(*configs[0][:4], 0), (*configs[-1][:4], 1)]  # no L2 prefetch; the next step's
        for config in configs:
            y = q4_mma.q4_mma(x, qweight, scales, qzeros, 1, gs, perm=perm, config=config)
            assert y.shape == (m, n)
            assert relative_error(y, ref) < TOLERANCE, (m, config, relative_error(y, ref))
    torch.cuda.synchronize()
    device = torch.device("cuda", 0)
    assert not q4_mma.SCRATCH.counters[device].any() and not q4_mma.SCRATCH.sums[device].any(), \
        "the kernel leaves its workspace zero"


def test_a_row_does_not_depend_on_the_others():
    from kernels import q4_mma

    qweight, scales, qzeros, gs, perm, _ = regrouped(4096, 2048, 128, True, True, 5)
    x = torch.randn(64, 4096, device="cuda", dtype=torch.float16)
    full = q4_mma.q4_mma(x, qweight, scales, qzeros, 1, gs, perm=perm)
    for m in (9, 20, 40):
        part = q4_mma.q4_mma(x[:m].contiguous(), qweight, scales, qzeros, 1, gs, perm=perm)
        assert relative_error(part, full[:m]) < 1e-3, m


def test_the_exllama_layer_runs_batches_on_it():
    """ExllamaLinear takes 5..32 rows through the tensor-core matmul (64 through Triton's): act-order, and
    gate/up fused (SiLU(gate) * up from columns interleaved in tiles)."""
    from backends.base import GPTQTensors
    from backends.exllama_linear import ExllamaLinear
    from backends.quant_config import QuantConfig

    k, n = 1024, 512

    def make(seed: int, act_order: bool):
        t = random_gptq_layer(k, n, 4, 128, act_order, True, np.random.default_rng(seed))
        tensors = GPTQTensors(f"l{seed}", t["qweight"], t["qzeros"], t["scales"], t["g_idx"], None, k, n)
        linear = ExllamaLinear(tensors, QuantConfig(bits=4, group_size=128, desc_act=act_order), torch.float16,
                               torch.device("cuda"))
        return linear, dequantize(*(t[key].cuda() for key in ("qweight", "qzeros", "scales", "g_idx")), 4, 1)

    ordered, w_ordered = make(1, True)
    (gate, w_gate), (up, w_up) = make(2, False), make(3, False)
    glu = ExllamaLinear.fuse_glu(gate, up)
    assert ordered.q_perm is not None and glu is not None
    for m in (5, 16, 32, 64):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        assert relative_error(ordered(x), x.float() @ w_ordered) < TOLERANCE, m
        expected = torch.nn.functional.silu(x.float() @ w_gate) * (x.float() @ w_up)
        assert relative_error(glu.silu_mul(x), expected) < 5e-3, m

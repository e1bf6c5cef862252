"""The CUDA 4-bit GEMV (kernels/q4_gemv.cu) against the fp32 dequantized reference; GPU only (device)."""

import numpy as np
import pytest
import torch

from kernels.gptq_format import dequantize
from tests.gptq_testing import random_gptq_layer, relative_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA GEMV needs a GPU (run on the device)")


@pytest.mark.parametrize("k, n, group_size, sym", [(4096, 4096, 128, True), (576, 1536, 32, False),
                                                   (11008, 512, -1, False), (1024, 1280, 64, True)])
def test_gemv_matches_reference_for_every_epilogue(k, n, group_size, sym):
    from kernels import q4_gemv

    t = {key: v.cuda() for key, v in random_gptq_layer(k, n, 4, group_size, False, sym, np.random.default_rng(k)).items()}
    w = dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 1)
    gs = k if group_size == -1 else group_size
    ws = q4_gemv.Workspace(n, torch.device("cuda"))
    glu = [q4_gemv.interleave_glu(t["qweight"]), q4_gemv.interleave_glu(t["scales"]),
           q4_gemv.interleave_glu(t["qzeros"], 8)] if n % 256 == 0 else None
    for m in range(1, 5):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        residual = torch.randn(m, n, device="cuda", dtype=torch.float16)
        ref = x.float() @ w
        for config in [c for c in q4_gemv.CONFIGS if q4_gemv.fits(c, m)]:
            y = q4_gemv.q4_gemv(x, t["qweight"], t["scales"], t["qzeros"], 1, gs, ws, config=config)
            assert relative_error(y, ref) < 1e-2, (m, config)
            y = q4_gemv.q4_gemv(x, t["qweight"], t["scales"], t["qzeros"], 1, gs, ws, residual=residual, config=config)
            assert relative_error(y, ref + residual.float()) < 1e-2, (m, config)
            if glu is not None:
                y = q4_gemv.q4_gemv(x, *glu, 1, gs, ws, silu_mul=True, config=config)
                gate, up = ref.chunk(2, dim=1)
                assert relative_error(y, torch.nn.functional.silu(gate) * up) < 1e-2, (m, config)
    torch.cuda.synchronize()
    assert not ws.sums.any() and not ws.counters.any(), "the kernel leaves its workspace zeroed"


@pytest.mark.parametrize("act_order", [False, True])
def test_gemv_folds_the_rms_norm_of_its_input(act_order):
    """norm=(weight, eps): the kernel computes RMSNorm(x) itself (every epilogue, 1..4 rows)."""
    from backends.model import RMSNorm
    from kernels import q4_gemv

    k, n = 4096, 1024
    t = {key: v.cuda() for key, v in random_gptq_layer(k, n, 4, 128, False, True, np.random.default_rng(3)).items()}
    w = dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 1)
    perm = torch.randperm(k, device="cuda").to(torch.int32) if act_order else None
    norm = RMSNorm(k, 1e-5)
    norm.weight = torch.nn.Parameter(torch.rand(k, device="cuda", dtype=torch.float16) + 0.5, requires_grad=False)
    ws = q4_gemv.Workspace(n, torch.device("cuda"))
    glu = [q4_gemv.interleave_glu(t["qweight"]), q4_gemv.interleave_glu(t["scales"]),
           q4_gemv.interleave_glu(t["qzeros"], 8)]
    for m in range(1, 5):
        x = (torch.randn(m, k, device="cuda") * 20).to(torch.float16)  # far from unit RMS
        xn = norm(x)
        xn = xn[:, perm.long()] if act_order else xn
        ref = xn.float() @ w
        residual = torch.randn(m, n, device="cuda", dtype=torch.float16)
        args = dict(perm=perm, norm=(norm.weight, norm.eps))
        y = q4_gemv.q4_gemv(x, t["qweight"], t["scales"], t["qzeros"], 1, 128, ws, **args)
        assert relative_error(y, ref) < 1e-2, m
        y = q4_gemv.q4_gemv(x, t["qweight"], t["scales"], t["qzeros"], 1, 128, ws, residual=residual, **args)
        assert relative_error(y, ref + residual.float()) < 1e-2, m
        y = q4_gemv.q4_gemv(x, *glu, 1, 128, ws, silu_mul=True, **args)
        gate, up = ref.chunk(2, dim=1)
        assert relative_error(y, torch.nn.functional.silu(gate) * up) < 1e-2, m


def test_gemv_gathers_rows_through_perm():
    from kernels import q4_gemv

    k, n = 1024, 512
    t = {key: v.cuda() for key, v in random_gptq_layer(k, n, 4, 128, False, False, np.random.default_rng(9)).items()}
    w = dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 1)
    perm = torch.randperm(k, device="cuda").to(torch.int32)
    x = torch.randn(3, k, device="cuda", dtype=torch.float16)
    y = q4_gemv.q4_gemv(x, t["qweight"], t["scales"], t["qzeros"], 1, 128, q4_gemv.Workspace(n, x.device), perm=perm)
    assert relative_error(y, x[:, perm.long()].float() @ w) < 1e-2


def test_sums_are_left_in_the_workspace_and_read_as_the_next_input():
    """sums=True: x @ W stays in the fp32 workspace (no finishing tail); x_sums: the rows are x + sums rounded to
    fp16 (x_out receives them); glu_sums: silu(gate) * up of a gate/up layer's sums; zero: buffers cleared."""
    from backends.model import RMSNorm
    from kernels import q4_gemv

    k, n = 1024, 512
    t = {key: v.cuda() for key, v in random_gptq_layer(k, n, 4, 128, False, False, np.random.default_rng(5)).items()}
    w = dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 1)
    weights = (t["qweight"], t["scales"], t["qzeros"], 1, 128)
    perm = torch.randperm(k, device="cuda").to(torch.int32)
    norm = RMSNorm(k, 1e-5)
    norm.weight = torch.nn.Parameter(torch.rand(k, device="cuda", dtype=torch.float16) + 0.5, requires_grad=False)
    ws = q4_gemv.Workspace(n, torch.device("cuda"))
    for m in range(1, 5):
        x = (torch.randn(m, k, device="cuda") * 20).to(torch.float16)
        for config in [c for c in q4_gemv.CONFIGS if q4_gemv.fits(c, m)][::3]:
            y = q4_gemv.q4_gemv(x, *weights, ws, sums=True, config=config)
            assert y.dtype == torch.float32 and y.data_ptr() == ws.sums.data_ptr()
            assert relative_error(y, x.float() @ w) < 1e-2, (m, config)
            ws.sums.zero_()

        sums = torch.randn(m, k, device="cuda") * 20
        x_out = torch.empty(m, k, device="cuda", dtype=torch.float16)
        y = q4_gemv.q4_gemv(x, *weights, ws, x_sums=sums, x_out=x_out, norm=(norm.weight, norm.eps), perm=perm)
        stream = (x.float() + sums).to(torch.float16)
        torch.testing.assert_close(x_out, stream, rtol=0, atol=0)
        assert relative_error(y, norm(stream)[:, perm.long()].float() @ w) < 1e-2, m

        glu = torch.randn(m, 2 * k, device="cuda") * 3  # gate tile 0, up tile 0, gate tile 1, ...
        tiles = glu.view(m, -1, 2, q4_gemv.TILE_N)
        hidden = (torch.nn.functional.silu(tiles[:, :, 0]) * tiles[:, :, 1]).reshape(m, k).to(torch.float16)
        y = q4_gemv.q4_gemv(None, *weights, ws, glu_sums=glu, perm=perm)
        assert relative_error(y, hidden[:, perm.long()].float() @ w) < 1e-2, m

    cleared, kept = torch.ones(2, 1000, device="cuda"), torch.ones(12, device="cuda")
    q4_gemv.q4_gemv(x, *weights, ws, zero=(cleared[0], kept[:8]))
    torch.cuda.synchronize()
    assert not cleared[0].any() and not kept[:8].any() and bool((cleared[1] == 1).all()) and bool((kept[8:] == 1).all())
    assert not ws.sums.any() and not ws.counters.any()


def test_bad_arguments_are_refused():
    from kernels import q4_gemv

    t = {key: v.cuda() for key, v in random_gptq_layer(256, 256, 4, 32, False, True, np.random.default_rng(0)).items()}
    ws = q4_gemv.Workspace(256, torch.device("cuda"))
    with pytest.raises(ValueError, match="1 to 4 rows"):
        q4_gemv.q4_gemv(torch.randn(5, 256, device="cuda", dtype=torch.float16), t["qweight"], t["scales"],
                        t["qzeros"], 1, 32, ws)
    with pytest.raises(RuntimeError, match="unsupported"):
        q4_gemv.q4_gemv(torch.randn(1, 256, device="cuda", dtype=torch.float16), t["qweight"], t["scales"],
                        t["qzeros"], 1, 48, ws)
    x = torch.randn(1, 256, device="cuda", dtype=torch.float16)
    sums = torch.zeros(1, 256, device="cuda")
    with pytest.raises(ValueError, match="x_out"):
        q4_gemv.q4_gemv(x, t["qweight"], t["scales"], t["qzeros"], 1, 32, ws, x_sums=sums, x_out=x.clone())
    with pytest.raises(ValueError, match="glu_sums is the whole input"):
        q4_gemv.q4_gemv(x, t["qweight"], t["scales"], t["qzeros"], 1, 32, ws, glu_sums=torch.zeros(1, 512, device="cuda"))
    with pytest.raises(ValueError, match="one epilogue"):
        q4_gemv.q4_gemv(x, t["qweight"], t["scales"], t["qzeros"], 1, 32, ws, sums=True, residual=x)


@pytest.mark.parametrize("act_order", [False, True])
def test_exllama_model_in_fp16_matches_reference(tmp_path, act_order):
    """The exllama backend in fp16 on the GPU (CUDA GEMV with fused residual adds and SiLU*up for the
    prompt of 3 tokens and each decoded token) against the reference backend in fp32."""
    from backends.exllama_backend import ExllamaBackend
    from backends.loader import LoadOptions, build_model
    from tests.gptq_testing import tiny_config, write_random_checkpoint

    config = tiny_config(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=64)
    path = write_random_checkpoint(tmp_path / "m", config, 4, 32, act_order)
    assert ExllamaBackend().note(torch.device("cuda")) == "decode GEMV: CUDA (kernels/q4_gemv.cu)"
    tokens = [5, 17, 3, 99, 42, 7]
    logits = {}
    for backend, dtype in (("exllama", "float16"), ("reference", "float32")):
        model, *_ = build_model(path, LoadOptions(backend=backend, device="cuda", dtype=dtype))
        if backend == "exllama" and not act_order:
            assert model.layers[0].mlp.gate_up_proj.glu, "gate/up fused for the SiLU*up epilogue"
        model.setup_cache(batch=1, max_seq_len=16)
        with torch.inference_mode():
            out = [model(torch.tensor([tokens[:3]], device="cuda"), torch.arange(3, device="cuda"))[0]]
            for p in range(3, len(tokens)):
                out.append(model(torch.tensor([[tokens[p]]], device="cuda"), torch.tensor([p], device="cuda"))[0])
        logits[backend] = torch.cat(out).float()
    assert relative_error(logits["exllama"], logits["reference"]) < 2e-2

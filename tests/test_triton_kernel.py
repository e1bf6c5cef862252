"""The Triton GPTQ kernel against the plain-torch reference: on a GPU when there
is one, otherwise under TRITON_INTERPRET=1 on the CPU."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from kernels.gptq_format import reference_matmul  # noqa: E402
from tests.gptq_testing import random_gptq_layer, relative_error  # noqa: E402

triton_gptq = pytest.importorskip("kernels.triton_gptq")
PackedWeight, LaunchConfig = triton_gptq.PackedWeight, triton_gptq.LaunchConfig

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("act_order", [False, True])
def test_kernel_matches_reference(bits, group_size, act_order):
    k, n = 256, 96
    rng = np.random.default_rng(bits * 1000 + group_size + act_order)
    sym = bool(rng.integers(0, 2))
    t = {key: v.to(DEVICE) for key, v in random_gptq_layer(k, n, bits, group_size, act_order, sym, rng).items()}
    for m in (1, 7, 20, 33, triton_gptq.DEQUANT_MIN_M):  # GEMV, fused small-M (16, 32, 64 rows), dequantize
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).half().to(DEVICE)
        expected = reference_matmul(x.float(), t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, 1)
        contiguous = 0 if act_order else (k if group_size == -1 else group_size)
        out = triton_gptq.gptq_matmul(x, PackedWeight(t["qweight"], t["scales"], t["qzeros"], bits, 1, contiguous, t["g_idx"]))
        assert out.dtype == torch.float16 and out.shape == (m, n)
        assert relative_error(out, expected) < 1e-2, (m, relative_error(out, expected))


@pytest.mark.parametrize("bits, group_size", [(4, 128), (8, 64), (4, 32), (4, 512)])
def test_every_gemv_configuration(bits, group_size):
    k, n = 512, 192
    rng = np.random.default_rng(group_size + bits)
    t = {key: v.to(DEVICE) for key, v in random_gptq_layer(k, n, bits, group_size, False, False, rng).items()}
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(5)).half().to(DEVICE)
    expected = reference_matmul(x.float(), t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, 1)
    configs = triton_gptq.gemv_candidates(n, k, group_size, bits)
    assert len(configs) >= 2
    for cfg in configs:
        out = triton_gptq.launch(cfg, x, PackedWeight(t["qweight"], t["scales"], t["qzeros"], bits, 1, group_size))
        assert out.dtype == torch.float16 and relative_error(out, expected) < 1e-2, cfg
    assert not triton_gptq.gemv_workspace(n, x.device).any(), "the split-K programs leave their workspace zero"


@pytest.mark.parametrize("bits, group_size", [(4, 128), (8, 32)])
def test_every_small_batch_matmul_configuration(bits, group_size):
    """Each tuner candidate for a batch of decoding sequences (2..64 rows) against the fp32 reference."""
    k, n = 256, 192
    rng = np.random.default_rng(group_size + bits)
    t = {key: v.to(DEVICE) for key, v in random_gptq_layer(k, n, bits, group_size, False, True, rng).items()}
    w = PackedWeight(t["qweight"], t["scales"], t["qzeros"], bits, 1, group_size)
    for m in (5, 40):
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).half().to(DEVICE)
        expected = reference_matmul(x.float(), t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, 1)
        configs = triton_gptq.matmul_candidates(m, group_size)
        assert len(configs) >= 2 and {c.block_m for c in configs} == {16 if m <= 16 else 64}
        for cfg in configs:
            out = triton_gptq.launch(cfg, x, w)
            assert relative_error(out, expected) < 1e-2, cfg


@pytest.mark.parametrize("x_scale, w_scale", [(1e-2, 1.0), (100.0, 10.0)])
def test_split_k_sums_far_from_one(x_scale, w_scale):
    """The split-K partial sums meet in fixed point (_store_columns): outputs from ~1e-4 to ~1e4, of both
    signs, stay within fp16 rounding of the fp32 reference, and columns whose sums are zero come out zero."""
    k, n = 1024, 128
    t = {key: v.to(DEVICE) for key, v in random_gptq_layer(k, n, 4, 128, False, True, np.random.default_rng(9)).items()}
    t["scales"] = t["scales"] * w_scale
    x = (torch.randn(1, k, generator=torch.Generator().manual_seed(9)) * x_scale).half().to(DEVICE)
    expected = reference_matmul(x.float(), t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 1)
    assert (expected.abs().max() > 5e3) if x_scale > 1 else (expected.abs().min() < 1e-3)
    assert (expected < 0).any() and (expected > 0).any()
    tolerance = 3e-3 * (expected.abs() + expected.pow(2).mean().sqrt())
    for cfg in triton_gptq.gemv_candidates(n, k, 128, 4):
        out = triton_gptq.launch(cfg, x, PackedWeight(t["qweight"], t["scales"], t["qzeros"], 4, 1, 128))
        assert torch.all((out.float() - expected).abs() <= tolerance), cfg
        zero = triton_gptq.launch(cfg, torch.zeros_like(x), PackedWeight(t["qweight"], t["scales"], t["qzeros"], 4, 1, 128))
        assert not zero.any(), cfg


def test_gemv_of_a_view_that_starts_mid_pair():
    """x at an odd fp16 offset (a row sliced out of a wider buffer) cannot be read as int32 pairs in place."""
    k, n = 256, 128
    t = {key: v.to(DEVICE) for key, v in random_gptq_layer(k, n, 4, 128, False, True, np.random.default_rng(3)).items()}
    x = torch.randn(1, k + 1, generator=torch.Generator().manual_seed(3)).half().to(DEVICE)[:, 1:]
    assert x.is_contiguous() and x.data_ptr() % 4
    expected = reference_matmul(x.float(), t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 1)
    for cfg in triton_gptq.gemv_candidates(n, k, 128, 4):
        out = triton_gptq.launch(cfg, x, PackedWeight(t["qweight"], t["scales"], t["qzeros"], 4, 1, 128))
        assert relative_error(out, expected) < 1e-2, cfg


@pytest.mark.parametrize("act_order", [False, True])
def test_dequantize_matches_reference(act_order):
    from kernels.gptq_format import dequantize

    rng = np.random.default_rng(7 + act_order)
    t = {key: v.to(DEVICE) for key, v in random_gptq_layer(256, 64, 4, 64, act_order, False, rng).items()}
    w = triton_gptq.gptq_dequantize(PackedWeight(t["qweight"], t["scales"], t["qzeros"], 4, 1, 0 if act_order else 64, t["g_idx"]))
    expected = dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 1)
    assert w.dtype == torch.float16 and relative_error(w, expected) < 1e-3


def test_g_idx_path_on_contiguous_groups_and_v2_zeros():
    rng = np.random.default_rng(11)
    t = {key: v.to(DEVICE) for key, v in random_gptq_layer(128, 64, 4, 32, False, False, rng).items()}
    x = torch.randn(3, 128).half().to(DEVICE)
    expected = reference_matmul(x.float(), t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 0)
    out = triton_gptq.gptq_matmul(x, PackedWeight(t["qweight"], t["scales"], t["qzeros"], 4, 0, 0, t["g_idx"]))
    assert relative_error(out, expected) < 1e-2


def test_bad_inputs_are_refused():
    rng = np.random.default_rng(1)
    t = random_gptq_layer(64, 32, 4, 32, False, True, rng)
    with pytest.raises(TypeError, match="float16"):
        triton_gptq.gptq_matmul(torch.randn(1, 64), PackedWeight(t["qweight"], t["scales"], t["qzeros"], 4, 1, 32, t["g_idx"]))
    with pytest.raises(ValueError, match="g_idx is needed"):
        triton_gptq.gptq_matmul(torch.randn(1, 64).half(), PackedWeight(t["qweight"], t["scales"], t["qzeros"], 4, 1, 0))


@pytest.mark.parametrize("bits, group_size, act_order", [(4, 32, True), (8, 64, False), (4, -1, True)])
def test_triton_backend_model_matches_reference_backend(tmp_path, bits, group_size, act_order):
    from tests.gptq_testing import backend_logits, tiny_config, write_random_checkpoint

    path = write_random_checkpoint(tmp_path / "m", tiny_config(num_hidden_layers=1), bits, group_size, act_order)
    tokens = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(0))
    logits = {backend: backend_logits(path, backend, tokens, DEVICE) for backend in ("reference", "triton")}
    assert relative_error(logits["triton"], logits["reference"]) < 1e-2


def test_act_order_rows_are_regrouped():
    from backends.packed_linear import contiguous_layout
    from kernels.gptq_format import unpack_rows

    rng = np.random.default_rng(2)
    t = random_gptq_layer(128, 32, 4, 32, True, True, rng)
    qweight, perm, gs = contiguous_layout(t["qweight"], t["g_idx"], 4, 32)
    assert gs == 32 and perm is not None
    assert torch.equal(t["g_idx"][perm].long(), torch.arange(128) // 32)
    assert torch.equal(unpack_rows(qweight, 4), unpack_rows(t["qweight"], 4)[perm])


def test_groups_the_kernel_cannot_tile_use_g_idx():
    from backends.packed_linear import contiguous_layout

    rng = np.random.default_rng(4)
    t = random_gptq_layer(48, 32, 4, -1, False, True, rng)  # one group of 48 rows
    qweight, perm, gs = contiguous_layout(t["qweight"], t["g_idx"], 4, 48)
    assert (gs, perm) == (0, None) and qweight is t["qweight"]
    x = torch.randn(2, 48).half().to(DEVICE)
    t = {key: v.to(DEVICE) for key, v in t.items()}
    expected = reference_matmul(x.float(), t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 1)
    out = triton_gptq.gptq_matmul(x, PackedWeight(t["qweight"], t["scales"], t["qzeros"], 4, 1, gs, t["g_idx"]))
    assert relative_error(out, expected) < 1e-2
    with pytest.raises(ValueError, match="not a multiple of 32"):
        triton_gptq.gptq_matmul(x, PackedWeight(t["qweight"], t["scales"], t["qzeros"], 4, 1, 48, t["g_idx"]))


def test_fused_rmsnorm_matches_torch():
    from kernels.rmsnorm import rmsnorm

    x = torch.randn(3, 5, 576, generator=torch.Generator().manual_seed(0)).half().to(DEVICE)
    w = torch.rand(576, generator=torch.Generator().manual_seed(1)).half().to(DEVICE)
    xf = x.float()
    expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * w.float()).half()
    out = rmsnorm(x, w, 1e-5)
    assert out.shape == x.shape and out.dtype == torch.float16
    assert relative_error(out, expected) < 2e-3


@pytest.mark.parametrize("head_dim, cache_dtype", [(16, torch.float16), (64, torch.float16),
                                                   (64, torch.float8_e4m3fn)])
def test_fused_rotary_matches_torch(head_dim, cache_dtype):
    if cache_dtype == torch.float8_e4m3fn and DEVICE == "cpu":
        pytest.skip("the interpreter narrows fp16 to fp8 wrongly (1.9453 -> 1.0: no carry into the exponent)")
    from backends.model import apply_rotary
    from kernels.rotary import rotary_qkv

    g = torch.Generator().manual_seed(head_dim)
    b, t, hq, hkv = 1, 5, 4, 2
    width = (hq + 2 * hkv) * head_dim
    qkv = torch.randn(b, t, width, generator=g).half()  # q, k, v are strided views of it, as in the model
    q, k, v = (p.reshape(b, t, -1, head_dim) for p in qkv.split([hq * head_dim, hkv * head_dim, hkv * head_dim], -1))
    angles = torch.rand(t, head_dim // 2, generator=g) * 6
    cos = torch.cat([angles.cos(), angles.cos()], -1)
    sin = torch.cat([angles.sin(), angles.sin()], -1)
    expected_q = apply_rotary(q.transpose(1, 2), cos, sin)  # [B, H, T, D]
    expected_k = apply_rotary(k.transpose(1, 2), cos, sin)
    k_cache = torch.zeros(b, hkv, 12, head_dim, dtype=cache_dtype, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    positions = torch.tensor([7, 8, 9, 10, 11], device=DEVICE)
    dev = [p.to(DEVICE) for p in (qkv, cos, sin)]
    q, k, v = (p.reshape(b, t, -1, head_dim) for p in dev[0].split([hq * head_dim, hkv * head_dim, hkv * head_dim], -1))
    out = rotary_qkv(q, k, v, dev[1], dev[2], k_cache, v_cache, positions)
    assert relative_error(out.transpose(1, 2).cpu(), expected_q) < 1e-3
    narrow = cache_dtype != torch.float16  # fp8 keeps 3 bits of mantissa: 2^-4 relative at most
    assert relative_error(k_cache[:, :, 7:].cpu(), expected_k) < (4e-2 if narrow else 1e-3)
    assert torch.equal(v_cache[:, :, 7:].cpu().float(), v.transpose(1, 2).cpu().to(cache_dtype).float())
    assert not k_cache[:, :, :7].float().any() and not v_cache[:, :, :7].float().any()


def test_the_inline_ptx_gemv_is_a_candidate_for_4_bit_on_a_gpu_only():
    """The CPU interpreter cannot run inline asm: there, and for 8-bit, the candidates leave it out. The
    integer kernel is 4-bit only; the interpreter runs its plain-Triton form."""
    four = triton_gptq.gemv_candidates(4096, 4096, 128, 4, interpreted=False)
    eight = triton_gptq.gemv_candidates(4096, 4096, 128, 8, interpreted=False)
    assert all(c.kernel in ("tile", "int") and c.asm for c in four)
    assert any(c.kernel == "tile" for c in four) and any(c.kernel == "int" for c in four)
    assert not any(c.asm or c.kernel == "int" for c in eight) and any(c.kernel == "tile" for c in eight)
    interpreted = triton_gptq.gemv_candidates(4096, 4096, 128, 4, interpreted=True)
    assert not any(c.asm for c in interpreted)
    assert any(c.kernel == "tile" for c in interpreted) and any(c.kernel == "int" for c in interpreted)


@pytest.mark.parametrize("sym", [True, False])
def test_integer_gemv_rounds_x_per_chunk(sym):
    """The integer GEMV rounds x to 16 bits of each chunk's largest |x|. A chunk holding one x ~1000 times
    the rest gives the fp32 reference within fp16-like error; an all-zero chunk (step 0) adds nothing; and a
    chunk of x ~1 next to a chunk of x ~1000 in the same program keeps its own scale: with group 0's scales
    zero, only the x ~1 chunk reaches the output, and it comes out exact to fp16, not rounded at a step of
    ~0.1 as one scale for the program would round it."""
    k, n = 512, 128
    t = {key: v.to(DEVICE) for key, v in random_gptq_layer(k, n, 4, 128, False, sym, np.random.default_rng(21)).items()}
    configs = [c for c in triton_gptq.gemv_candidates(n, k, 128, 4) if c.kernel == "int"]
    assert any(c.block_k * c.chunks >= 256 for c in configs)  # programs that hold both chunks
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(21))
    x[0, 10] = 1500.0
    x[0, 256:384] = 0.0
    x = x.half().to(DEVICE)
    expected = reference_matmul(x.float(), t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 1)
    big_first = torch.randn(1, k, generator=torch.Generator().manual_seed(22))
    big_first[0, :128] *= 1000
    big_first = big_first.half().to(DEVICE)
    scales = t["scales"].clone()
    scales[0] = 0
    expected_rest = reference_matmul(big_first.float(), t["qweight"], t["qzeros"], scales, t["g_idx"], 4, 1)
    for cfg in configs:
        out = triton_gptq.launch(cfg, x, PackedWeight(t["qweight"], t["scales"], t["qzeros"], 4, 1, 128))
        assert relative_error(out, expected) < 1e-3, cfg
        rest = triton_gptq.launch(cfg, big_first, PackedWeight(t["qweight"], scales, t["qzeros"], 4, 1, 128))
        assert relative_error(rest, expected_rest) < 2e-3, cfg


def test_gemv_candidates_split_k_no_further_than_the_workspace_counts():
    """The split-K count lives in 9 bits of the workspace (_store_columns): a very long K drops the tile shapes
    that would split it more often, and the launcher refuses such a split outright."""
    k = 128 * (triton_gptq.MAX_SPLIT_K + 1)
    tiles = [c for c in triton_gptq.gemv_candidates(4096, k, 128, 4) if c.kernel == "tile"]
    assert tiles and all(-(-k // (c.block_k * c.chunks)) <= triton_gptq.MAX_SPLIT_K for c in tiles)
    short = triton_gptq.gemv_candidates(4096, 4096, 128, 4)
    assert any(c.block_k * c.chunks == 128 for c in short if c.kernel == "tile")
    assert not any(c.block_k * c.chunks == 128 for c in tiles)
    x = torch.zeros(1, k, dtype=torch.float16)
    cfg = LaunchConfig("tile", block_n=64, block_k=64, num_warps=2, chunks=2)
    placeholder = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="splits into"):
        triton_gptq.launch(cfg, x, PackedWeight(torch.zeros(k // 8, 64, dtype=torch.int32), placeholder.half(),
                                                placeholder, 4, 1, 128))

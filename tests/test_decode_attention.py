"""The one-token attention kernel (kernels/decode_attention.cu) against its torch reference; GPU only (device)."""

import pytest
import torch

from tests.gptq_testing import relative_error

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels need a GPU (run on the device)")


def _inputs(n_heads, n_kv_heads, head_dim, seq, position, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=g).to(torch.float16)

    q, k, v = randn(n_heads * head_dim), randn(n_kv_heads * head_dim), randn(n_kv_heads * head_dim)
    k_cache, v_cache = randn(1, n_kv_heads, seq, head_dim), randn(1, n_kv_heads, seq, head_dim)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, device="cuda").float() / head_dim)
    angles = position * torch.cat((inv_freq, inv_freq))
    return q, k, v, angles.cos(), angles.sin(), k_cache, v_cache


@pytest.mark.parametrize("n_heads, n_kv_heads, head_dim", [(4, 4, 128), (9, 3, 64), (32, 8, 128), (16, 2, 64)])
@pytest.mark.parametrize("position, window", [(0, None), (37, None), (300, None), (1000, 128), (129, 4096)])
def test_matches_reference_for_any_split(n_heads, n_kv_heads, head_dim, position, window):
    from kernels import decode_attention as da

    seq = 1024 + 16
    q, k, v, cos, sin, k_cache, v_cache = _inputs(n_heads, n_kv_heads, head_dim, seq, position, position)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    expected = da.reference(q, k, v, cos, sin, position, k_ref, v_ref, window)
    ws = da.Workspace(n_heads, n_kv_heads, head_dim, torch.device("cuda"))
    pos = torch.tensor([position], device="cuda")
    for splits in (None, 1, 2, 7, da.MAX_SPLITS):
        kc, vc = k_cache.clone(), v_cache.clone()
        out = da.decode_attention(q, k, v, cos, sin, pos, kc, vc, position + 1, window, ws, splits=splits)
        assert relative_error(out, expected) < 2e-3, splits
        torch.testing.assert_close(kc, k_ref, rtol=2e-3, atol=1e-3)  # the new k rotated into its slot, rest intact
        torch.testing.assert_close(vc, v_ref, rtol=0, atol=0)
    torch.cuda.synchronize()
    assert not ws.counters.any(), "the kernel leaves its counters zeroed"


def test_takes_q_k_v_as_fp32_sums():
    """qkv_sums (a qkv GEMV's unfinished fp32 sums): the same as q, k and v rounded to fp16."""
    from kernels import decode_attention as da

    n_heads, n_kv_heads, head_dim, position = 8, 2, 128, 300
    q, k, v, cos, sin, k_cache, v_cache = _inputs(n_heads, n_kv_heads, head_dim, 512, position, 1)
    sums = torch.cat((q, k, v)).float() + torch.randn(q.numel() + 2 * k.numel(), device="cuda") * 1e-3
    q16, k16, v16 = sums.to(torch.float16).split([q.numel(), k.numel(), k.numel()])
    ws = da.Workspace(n_heads, n_kv_heads, head_dim, torch.device("cuda"))
    pos = torch.tensor([position], device="cuda")
    for splits in (1, 3):
        kc, vc = k_cache.clone(), v_cache.clone()
        expected = da.decode_attention(q16, k16, v16, cos, sin, pos, kc, vc, position + 1, None, ws, splits=splits)
        kc2, vc2 = k_cache.clone(), v_cache.clone()
        out = da.decode_attention(None, None, None, cos, sin, pos, kc2, vc2, position + 1, None, ws,
                                  qkv_sums=sums, splits=splits)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        torch.testing.assert_close(kc2, kc, rtol=0, atol=0)
        torch.testing.assert_close(vc2, vc, rtol=0, atol=0)


def test_reads_its_row_of_a_rotary_table():
    """cos/sin as tables [S, D] (the model's, made once): the same as passing the position's row."""
    from kernels import decode_attention as da

    position = 77
    q, k, v, cos, sin, k_cache, v_cache = _inputs(8, 2, 64, 256, position, 3)
    angles = torch.arange(256, device="cuda").float().unsqueeze(1) * (torch.atan2(sin, cos) / position)
    cos_t, sin_t = angles.cos(), angles.sin()
    ws = da.Workspace(8, 2, 64, torch.device("cuda"))
    pos = torch.tensor([position], device="cuda")
    row = da.decode_attention(q, k, v, cos_t[position], sin_t[position], pos, k_cache.clone(), v_cache.clone(),
                              position + 1, None, ws)
    table = da.decode_attention(q, k, v, cos_t, sin_t, pos, k_cache.clone(), v_cache.clone(), position + 1, None, ws)
    torch.testing.assert_close(table, row, rtol=0, atol=0)
    with pytest.raises(ValueError, match="tables"):
        da.decode_attention(q, k, v, cos_t[:50], sin_t[:50], pos, k_cache, v_cache, position + 1, None, ws)


def test_the_model_uses_it_for_one_token_and_matches_the_masked_path(tmp_path):
    """A tiny fp16 model decoding on the GPU: with the kernel (rotary, cache write, attention in one launch)
    and without it (rotary kernel + SDPA with an additive mask), and a sliding window."""
    from backends.loader import LoadOptions, build_model
    from tests.gptq_testing import tiny_config, write_random_checkpoint

    config = tiny_config("mistral", sliding_window=4, hidden_size=256, intermediate_size=512,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    path = write_random_checkpoint(tmp_path / "m", config, 4, 32, False)
    model, *_ = build_model(path, LoadOptions(backend="exllama", device="cuda", dtype="float16"))
    tokens = [5, 17, 3, 99, 42, 7, 1, 64, 8, 11]
    logits = {}
    for kernel in (True, False):
        model.setup_cache(batch=1, max_seq_len=32)
        if not kernel:
            for layer in model.layers:
                layer.self_attn.decode_workspace = None
        else:
            assert model.layers[0].self_attn.decode_workspace is not None
        out = []
        with torch.inference_mode():
            for p, t in enumerate(tokens):
                out.append(model(torch.tensor([[t]], device="cuda"), torch.tensor([p], device="cuda"), kv_len=16)[0])
        logits[kernel] = torch.cat(out)
    assert relative_error(logits[True], logits[False]) < 5e-3

"""The paged decode attention kernel (kernels/paged_attention.py) against its torch form and against
attention over each sequence's keys laid out in order; on a GPU, or under TRITON_INTERPRET=1 on the CPU."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import torch.nn.functional as F

from kernels.paged_attention import FLOAT, HALF, paged_decode_attention, paged_decode_attention_reference

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
BLOCK = 16


def _case(n_heads, n_kv_heads, head_dim, lens, seed, dtype=None):
    g = torch.Generator().manual_seed(seed)
    blocks_needed = [-(-n // BLOCK) for n in lens]
    num_blocks = sum(blocks_needed) + 3
    order = torch.randperm(num_blocks, generator=g).tolist()  # scattered, as after many requests
    width = max(blocks_needed)
    table = torch.zeros(len(lens), width, dtype=torch.int32)
    for i, need in enumerate(blocks_needed):
        table[i, :need] = torch.tensor([order.pop() for _ in range(need)])
    dtype = dtype or (torch.float16 if DEVICE == "cuda" else torch.float32)
    k = torch.randn(n_kv_heads, num_blocks * BLOCK, head_dim, generator=g).to(DEVICE, dtype)
    v = torch.randn(n_kv_heads, num_blocks * BLOCK, head_dim, generator=g).to(DEVICE, dtype)
    q = torch.randn(len(lens), n_heads, head_dim, generator=g).to(DEVICE, dtype)
    return q, k, v, table.to(DEVICE), torch.tensor(lens, dtype=torch.int32, device=DEVICE)


def _in_order(q, k, v, table, lens, window):
    """Plain SDPA over each sequence's keys gathered in position order: independent of the kernel's tiling."""
    outs = []
    for i, n in enumerate(lens.tolist()):
        pos = torch.arange(n, device=q.device)
        slots = table[i, pos // BLOCK].long() * BLOCK + pos % BLOCK
        mask = (pos >= n - window).view(1, 1, 1, -1) if window else None
        o = F.scaled_dot_product_attention(q[i].unsqueeze(1).float().unsqueeze(0), k[:, slots].float().unsqueeze(0),
                                           v[:, slots].float().unsqueeze(0), attn_mask=mask,
                                           enable_gqa=q.shape[1] != k.shape[0])
        outs.append(o[0, :, 0])
    return torch.stack(outs)


SHAPES = [(4, 4, 64), (6, 2, 64), (8, 1, 128)] if DEVICE == "cpu" else [(32, 32, 128), (40, 40, 128), (32, 8, 128), (9, 3, 64)]


@pytest.mark.parametrize("config", [HALF, FLOAT], ids=["dots", "products"])
@pytest.mark.parametrize("n_heads, n_kv_heads, head_dim", SHAPES)
@pytest.mark.parametrize("lens, window", [([1], None), ([5, 70, 17], None), ([130, 3, 64, 65], None), ([100, 20], 32),
                                          ([600, 257, 9], None), ([700, 40], 300)])  # past one chunk of 512
def test_matches_attention_over_the_sequence_keys(config, n_heads, n_kv_heads, head_dim, lens, window):
    # The tensor-core dots take fp16 (in the interpreter too); the fp32 products run on fp32 where they can.
    dtype = torch.float16 if config.dot or DEVICE == "cuda" else torch.float32
    q, k, v, table, kv_lens = _case(n_heads, n_kv_heads, head_dim, lens, seed=sum(lens), dtype=dtype)
    out = paged_decode_attention(q, k, v, table, kv_lens, BLOCK, window, config)
    expected = _in_order(q, k, v, table, kv_lens, window)
    torch.testing.assert_close(out.float(), expected, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(paged_decode_attention_reference(q, k, v, table, kv_lens, BLOCK, window).float(),
                               expected, atol=2e-3, rtol=2e-3)


def test_a_sequence_result_does_not_depend_on_the_others():
    q, k, v, table, kv_lens = _case(4, 2, 64, [40, 90, 7], seed=3)
    together = paged_decode_attention(q, k, v, table, kv_lens, BLOCK)
    alone = paged_decode_attention(q[1:2], k, v, table[1:2], kv_lens[1:2], BLOCK)
    assert torch.equal(together[1], alone[0])


@pytest.mark.parametrize("config", [HALF, FLOAT], ids=["dots", "products"])
@pytest.mark.parametrize("lens, window", [([5, 70, 17], None), ([600, 9], None), ([100, 20], 32)])
def test_reads_an_8_bit_cache(config, lens, window):
    """Keys and values kept as fp8 (e4m3): the kernel widens them exactly, so the result is attention over
    those very values."""
    dtype = torch.float16 if config.dot or DEVICE == "cuda" else torch.float32
    q, k, v, table, kv_lens = _case(6, 2, 64, lens, seed=len(lens), dtype=dtype)
    k8, v8 = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
    out = paged_decode_attention(q, k8, v8, table, kv_lens, BLOCK, window, config)
    assert out.dtype == q.dtype
    torch.testing.assert_close(out.float(), _in_order(q, k8, v8, table, kv_lens, window), atol=2e-3, rtol=2e-3)
    assert (out.float() - _in_order(q, k, v, table, kv_lens, window)).abs().max() > 1e-3, "fp8 was read, not fp16"

"""The AVX-512 VNNI 4-bit matmul (kernels/cpu_q4.cpp) against the dequantized weights in float64."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from kernels import cpu_q4

needs_kernel = pytest.mark.skipif(cpu_q4.load() is None, reason=f"the kernel does not run here: {cpu_q4.why_not()}")


def test_the_kernel_builds_where_the_cpu_can_run_it():
    """A build that breaks must fail here, not turn every kernel test below into a skip."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if "avx512_vnni" not in flags or shutil.which("c++") is None:
        pytest.skip("no AVX-512 VNNI or no C++ compiler here")
    assert cpu_q4.load() is not None, cpu_q4.why_not()


def reference(x, q, scales, zeros, group):
    g = torch.arange(q.shape[0]) // group
    return x.double() @ ((q.double() - zeros.double()[g]) * scales.double()[g])


@needs_kernel
@pytest.mark.parametrize("k, n, group", [(256, 64, 32), (576, 192, 64), (512, 1536, 128), (1536, 576, 1536)])
@pytest.mark.parametrize("m", [1, 3, 5, 130])
@pytest.mark.parametrize("symmetric", [False, True])
def test_matches_the_dequantized_weights(k, n, group, m, symmetric):
    """Asymmetric zero points as a float32 table of z * s; a symmetric checkpoint's one z (8) as a number."""
    gen = torch.Generator().manual_seed(k + n + m)
    q = torch.randint(0, 16, (k, n), generator=gen)
    scales = (torch.rand(k // group, n, generator=gen) * 0.02 + 1e-3).half().float()  # GPTQ keeps them in fp16
    zeros = torch.full((k // group, n), 8.0) if symmetric else torch.randint(0, 16, (k // group, n), generator=gen).float()
    x = torch.randn(m, k, generator=gen)
    x[:, 7] *= 50  # an outlier channel, as LLM activations have
    args = (cpu_q4.pack(q), cpu_q4.tile_params(scales, torch.float16),
            8.0 if symmetric else cpu_q4.tile_params(zeros * scales), group)
    y = cpu_q4.matmul(x, *args)
    expected = reference(x, q, scales, zeros, group)
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert ((y.double() - expected).norm() / expected.norm()).item() < 2e-4  # bf16 activations alone: ~3e-3
    # every row alone, and each row at its place: no row's numbers leak into another's
    torch.testing.assert_close(y[-1:], cpu_q4.matmul(x[-1:], *args))


@needs_kernel
def test_calls_from_several_threads_at_once_agree_with_one_call_alone():
    """The kernels split their work over a worker pool of their own: a call from the engine's thread, and
    calls from several threads at once (one gets the workers, the others run alone), give the same numbers as
    one call on the main thread, and none waits forever."""
    import threading

    gen = torch.Generator().manual_seed(3)
    k, n, group = 512, 1536, 128
    q = torch.randint(0, 16, (k, n), generator=gen)
    scales = (torch.rand(k // group, n, generator=gen) * 0.02 + 1e-3).half().float()
    args = (cpu_q4.pack(q), cpu_q4.tile_params(scales, torch.float16), 8.0, group)
    xs = [torch.randn(m, k, generator=gen) for m in (1, 2, 7, 33)]
    alone = [cpu_q4.matmul(x, *args) for x in xs]
    results: dict[tuple[int, int], torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for round_ in range(40):
                i = (worker + round_) % len(xs)
                results[worker, round_] = cpu_q4.matmul(xs[i], *args)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a call never returned"
    assert not errors, errors
    for (worker, round_), y in results.items():
        assert torch.equal(y, alone[(worker + round_) % len(xs)]), (worker, round_)
    assert len(results) == 3 * 40


@needs_kernel
def test_other_python_threads_run_while_a_call_computes():
    """A long call (a prompt's layer) releases the GIL: the app's other threads (its HTTP server, its UI) keep
    running during it, rather than waiting for its end."""
    import threading
    import time

    gen = torch.Generator().manual_seed(4)
    k, n, group = 4096, 4096, 128
    args = (cpu_q4.pack(torch.randint(0, 16, (k, n), generator=gen)),
            cpu_q4.tile_params(torch.rand(k // group, n, generator=gen).half(), torch.float16), 8.0, group)
    x = torch.randn(2048, k, generator=gen)
    started = time.perf_counter()
    cpu_q4.matmul(x, *args)
    alone = time.perf_counter() - started
    assert alone > 0.05, "the call must be long enough to tell"
    call = threading.Thread(target=cpu_q4.matmul, args=(x, *args))
    ticks = []
    call.start()
    while call.is_alive():
        ticks.append(time.perf_counter())
    call.join()
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    # Holding the GIL, the call would stop this loop for about its whole length in one gap.
    assert len(ticks) > 100 and max(gaps) < alone / 2, (len(ticks), max(gaps, default=None), alone)


@needs_kernel
def test_the_packed_layout():
    k, n = 16, 32
    q = torch.arange(k * n).reshape(k, n) % 16
    packed = cpu_q4.pack(q)
    assert packed.shape == (n // 16, k // 8, 64) and packed.dtype == torch.uint8
    # tile 1, k 8..15, column 16 + 3: bytes 12..15 hold k 8..11 (low nibbles) and 12..15 (high)
    column = 16 + 3
    chunk = packed[1, 1, 12:16]
    assert (chunk & 0xF).tolist() == q[8:12, column].tolist()
    assert (chunk >> 4).tolist() == q[12:16, column].tolist()


@needs_kernel
def test_shapes_it_cannot_take_are_named():
    assert cpu_q4.takes(4096, 11008, 128) and cpu_q4.takes(576, 192, 64)
    assert not cpu_q4.takes(4096, 11000, 128)  # columns in tiles of 16
    assert not cpu_q4.takes(576, 192, 128)  # the group must divide K
    assert not cpu_q4.takes(64, 64, 16)  # and be whole activation blocks of 32


@needs_kernel
def test_the_cpu_backend_runs_it_on_every_4bit_layer(smollm2_branch):
    from backends.loader import LoadOptions, load_model

    loaded = load_model(smollm2_branch("gptq-4bit-32g-actorder_True"), LoadOptions(backend="cpu", device="cpu",
                                                                                   context_length=256))
    try:
        assert "AVX-512 VNNI" in loaded.backend_note
        layer = loaded.model.layers[0]
        assert layer.self_attn.qkv_proj.vnni and layer.mlp.gate_up_proj.vnni and layer.mlp.down_proj.vnni
        # and the head: its kernel's logits, not torch's bf16 matmul's (which rounds each to bf16)
        x = torch.randn(1, 3, loaded.args.hidden_size).bfloat16()
        logits = loaded.model.head(x)
        expected = cpu_q4.norm_head(x[0], loaded.model.norm.weight, loaded.model.norm.eps, loaded.model.lm_head.weight)
        assert torch.equal(logits[0], expected)
    finally:
        loaded.engine.close()


@needs_kernel
@pytest.mark.parametrize("window", [None, 20])
def test_paged_decode_attention_reads_the_blocks_in_place(window):
    """Each sequence's one query over its keys, scattered over the pool's blocks (GQA 4:1), against softmax
    attention over the keys gathered in order, in fp32."""
    import math

    gen = torch.Generator().manual_seed(3)
    hq, hkv, d, bs, blocks = 8, 2, 64, 16, 40
    k = torch.randn(hkv, blocks * bs, d, generator=gen).bfloat16()
    v = torch.randn(hkv, blocks * bs, d, generator=gen).bfloat16()
    lens = torch.tensor([37, 5, 300], dtype=torch.int32)
    order = torch.randperm(blocks, generator=gen)
    table = torch.stack([order[:19], order[19:38], order[21:40]]).int()
    q = torch.randn(3, hq, d, generator=gen).bfloat16()
    out = cpu_q4.paged_decode_attention(q, k, v, table, lens, bs, window)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    for b, length in enumerate(lens.tolist()):
        slots = torch.tensor([int(table[b][j // bs]) * bs + j % bs for j in range(length)])
        slots = slots[0 if window is None else max(0, length - window):]
        keys = k[:, slots].float().repeat_interleave(hq // hkv, 0)
        values = v[:, slots].float().repeat_interleave(hq // hkv, 0)
        expected = torch.softmax(q[b].float().unsqueeze(1) @ keys.transpose(1, 2) / math.sqrt(d), -1) @ values
        torch.testing.assert_close(out[b].float(), expected[:, 0], atol=8e-3, rtol=8e-3)  # bf16 output


def _torch_steps(x, q, scales, zeros, group, norm_weight, eps, perm):
    """The bf16 model's steps in torch: RMSNorm rounded to bf16, the act-order gather, the projection rounded."""
    xf = x.float()
    normed = (norm_weight.float() * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps))).to(torch.bfloat16)
    rows = normed[:, perm] if perm is not None else normed
    y = cpu_q4.matmul(rows, *_kernel_args(q, scales, zeros, group))
    return rows, y.to(torch.bfloat16)


def _kernel_args(q, scales, zeros, group):
    return cpu_q4.pack(q), cpu_q4.tile_params(scales, torch.float16), cpu_q4.tile_params(zeros * scales), group


def _mostly_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    """bf16 results of the same arithmetic in another order: equal but for a rare last-bit rounding."""
    torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2 * float(b.float().abs().mean()))
    assert (a == b).float().mean() > 0.98


@needs_kernel
@pytest.mark.parametrize("m, act_order", [(1, False), (3, True), (17, True)])
def test_one_call_layer_step_matches_the_torch_steps(m, act_order):
    """cpu_q4.linear: the input's RMSNorm, the act-order gather, the residual add and SiLU(gate) * up around the
    matmul, as the model's torch steps compute them in bf16."""
    k, n, group, eps = 512, 256, 128, 1e-5
    gen = torch.Generator().manual_seed(m)
    q = torch.randint(0, 16, (k, n), generator=gen)
    scales = (torch.rand(k // group, n, generator=gen) * 0.02 + 1e-3).half().float()
    zeros = torch.randint(0, 16, (k // group, n), generator=gen).float()
    x = (torch.randn(m, k, generator=gen) * 3).to(torch.bfloat16)
    norm_weight = (torch.rand(k, generator=gen) + 0.5).to(torch.bfloat16)
    perm = torch.randperm(k, generator=gen) if act_order else None
    residual = torch.randn(m, n, generator=gen).to(torch.bfloat16)
    args = _kernel_args(q, scales, zeros, group)
    rows, expected = _torch_steps(x, q, scales, zeros, group, norm_weight, eps, perm)
    _mostly_equal(cpu_q4.linear(x, *args, norm=(norm_weight, eps), perm=perm), expected)
    plain = cpu_q4.matmul(rows, *args).to(torch.bfloat16)
    assert torch.equal(cpu_q4.linear(rows, *args), plain)
    assert torch.equal(cpu_q4.linear(rows, *args, residual=residual), residual + plain)
    gate, up = plain.chunk(2, dim=-1)
    _mostly_equal(cpu_q4.linear(rows, *args, glu=True), torch.nn.functional.silu(gate) * up)  # exp: not Sleef's


@needs_kernel
def test_one_call_attention_step_matches_the_torch_steps():
    """cpu_q4.rope_store_attend against rotary in torch, index_copy_ into the cache and the decode kernel: three
    sequences' rows (a prompt chunk of four, two decoding tokens) in one step, the chunk's later rows seeing its
    earlier ones' keys."""
    from backends.model import apply_rotary

    gen = torch.Generator().manual_seed(5)
    hq, hkv, d, bs, blocks = 8, 2, 64, 16, 12
    shape = (hkv, blocks * bs, d)
    cache = [torch.randn(shape, generator=gen).bfloat16() for _ in range(2)]
    table = torch.tensor([[3, 7, 0], [3, 7, 0], [3, 7, 0], [3, 7, 0], [5, 0, 0], [9, 2, 11]], dtype=torch.int32)
    lens = torch.tensor([18, 19, 20, 21, 9, 40], dtype=torch.int32)
    slots = torch.tensor([int(table[t][(n - 1) // bs]) * bs + (n - 1) % bs for t, n in enumerate(lens.tolist())])
    positions = lens.long() - 1
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat([positions.float()[:, None] * inv_freq] * 2, dim=-1)
    cos, sin = emb.cos(), emb.sin()
    qkv = torch.randn(6, (hq + 2 * hkv) * d, generator=gen).bfloat16()
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
    ours = [c.clone() for c in cache]
    out = cpu_q4.rope_store_attend(q, k, v, cos, sin, ours[0], ours[1], slots, table, lens, bs, None)
    theirs = [c.clone() for c in cache]
    rotated_q = apply_rotary(q.view(6, hq, d).transpose(0, 1), cos, sin)
    theirs[0].index_copy_(1, slots, apply_rotary(k.view(6, hkv, d).transpose(0, 1), cos, sin))
    theirs[1].index_copy_(1, slots, v.view(6, hkv, d).transpose(0, 1))
    expected = cpu_q4.paged_decode_attention(rotated_q.transpose(0, 1), *theirs, table, lens, bs, None)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    _mostly_equal(out, expected.reshape(6, hq * d))


@needs_kernel
@pytest.mark.parametrize("m, k, n", [(1, 576, 49152), (3, 512, 1003), (70, 4096, 40)])
def test_the_head_matches_float64(m, k, n):
    """cpu_q4.norm_head: the final RMSNorm as the model's torch step (bf16 rounding included), then the dense bf16
    head in float64 as the reference; N not a multiple of the kernel's 8 rows, M across its 64-row panels."""
    from backends.model import TorchOps

    gen = torch.Generator().manual_seed(m)
    x = (torch.randn(m, k, generator=gen) * 3).bfloat16()
    norm_weight = (torch.rand(k, generator=gen) + 0.5).bfloat16()
    weight = (torch.randn(n, k, generator=gen) * 0.05).bfloat16()
    normed = TorchOps().rmsnorm(x, norm_weight, 1e-5)
    expected = normed.double() @ weight.double().t()
    ours = cpu_q4.norm_head(x, norm_weight, 1e-5, weight)
    assert ours.dtype == torch.float32 and ours.shape == (m, n)
    # fp32 sums of exact products, unrounded (torch's bf16 matmul rounds each logit to bf16, 2^-9 relative); the
    # norm's sum of squares runs in another order than torch's, which can move an element by one bf16 step
    torch.testing.assert_close(ours.double(), expected, rtol=1e-3, atol=1e-3 * float(expected.abs().mean()))
    # each row alone gives the same bits (prompt scoring and generation see the same logits)
    assert torch.equal(cpu_q4.norm_head(x[-1:], norm_weight, 1e-5, weight), ours[-1:])


@needs_kernel
def test_the_head_of_a_step_without_logit_rows():
    """A step that only prefills part of a prompt asks the head for no rows: an empty [1, 0, vocab], as torch's
    path gives (it raised in the engine's step before)."""
    from backends.base import DenseLinear
    from backends.cpu_backend import CpuOps
    from backends.model import RMSNorm

    norm = RMSNorm(64, 1e-5)
    norm.weight = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    head = DenseLinear(torch.randn(100, 64).bfloat16(), None)
    logits = CpuOps().head(torch.zeros(1, 0, 64, dtype=torch.bfloat16), head, norm)
    assert logits.shape == (1, 0, 100) and logits.dtype == torch.float32

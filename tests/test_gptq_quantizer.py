"""The GPTQ quantizer: exact integer storage and lower output error than rounding."""

import pytest
import torch

from backends.gptq_quantizer import find_params, gptq_quantize


def correlated_inputs(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=g) / dim**0.5
    scales = torch.logspace(-1, 1, dim)
    return (torch.randn(n, dim, generator=g) * scales) @ mixing


def rtn(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    out = torch.empty_like(weight)
    gs = weight.shape[1] if group_size == -1 else group_size
    for start in range(0, weight.shape[1], gs):
        block = weight[:, start : start + gs]
        scale, zero = find_params(block, bits, sym=True, min_zero=0)
        q = torch.clamp(torch.round(block / scale[:, None]) + zero[:, None], 0, 2**bits - 1)
        out[:, start : start + gs] = scale[:, None] * (q - zero[:, None])
    return out


@pytest.mark.parametrize("bits, group_size, act_order", [(4, 32, True), (4, 128, False), (8, 64, True), (4, -1, True)])
def test_gptq_beats_round_to_nearest_on_the_outputs(bits, group_size, act_order):
    torch.manual_seed(0)
    x = correlated_inputs(2048, 256, seed=1)
    w = torch.randn(64, 256) * 0.05
    hessian = 2 * x.double().t() @ x.double() / x.shape[0]
    qw = gptq_quantize(w, hessian, bits, group_size, sym=True, act_order=act_order)

    def output_error(wq):
        return float(((x @ w.t()) - (x @ wq.t())).pow(2).mean())

    assert output_error(qw.dequantize()) < 0.8 * output_error(rtn(w, bits, group_size))


def test_stored_integers_reproduce_the_weight():
    x = correlated_inputs(512, 128, seed=2)
    w = torch.randn(32, 128) * 0.1
    qw = gptq_quantize(w, 2 * x.double().t() @ x.double() / 512, 4, 32, sym=False, act_order=True, min_zero=1)
    assert qw.q.min() >= 0 and qw.q.max() <= 15
    assert qw.zeros.min() >= 1  # writable in the v1 format
    # act-order: every group still holds exactly group_size columns, in a non-contiguous pattern
    assert torch.bincount(qw.g_idx.long()).tolist() == [32] * 4
    assert not torch.equal(qw.g_idx, torch.arange(128, dtype=torch.int32) // 32)
    manual = torch.stack([
        (qw.q[:, c].float() - qw.zeros[qw.g_idx[c]].float()) * qw.scales[qw.g_idx[c]].float() for c in range(128)
    ], dim=1)
    torch.testing.assert_close(qw.dequantize(), manual)
    assert float((qw.dequantize() - w).abs().max()) < float(w.abs().max()) / 4

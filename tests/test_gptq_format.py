"""kernels/gptq_format.py against the independent numpy implementation."""

import numpy as np
import pytest
import torch

from kernels.gptq_format import dequantize, pack_cols, pack_rows, reference_matmul, unpack_cols, unpack_rows
from tests.gptq_testing import np_dequantize, np_pack, random_gptq_layer


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_matches_independent_packer_and_roundtrips(bits):
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 2**bits, size=(64, 48))
    rows = pack_rows(torch.from_numpy(values), bits)
    cols = pack_cols(torch.from_numpy(values), bits)
    assert torch.equal(rows, torch.from_numpy(np_pack(values, bits, axis=0)))
    assert torch.equal(cols, torch.from_numpy(np_pack(values, bits, axis=1)))
    assert torch.equal(unpack_rows(rows, bits), torch.from_numpy(values).int())
    assert torch.equal(unpack_cols(cols, bits), torch.from_numpy(values).int())


def test_top_bit_values_survive_as_negative_int32():
    values = torch.full((8, 1), 15)
    packed = pack_rows(values, 4)
    assert packed.dtype == torch.int32 and int(packed) == -1
    assert torch.equal(unpack_rows(packed, 4), values.int())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sym", [True, False])
def test_dequantize_matches_independent_reference(bits, group_size, act_order, sym):
    rng = np.random.default_rng(7)
    t = random_gptq_layer(256, 96, bits, group_size, act_order, sym, rng)
    ours = dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, zero_offset=1)
    expected = np_dequantize(t, bits, zero_offset=1).T
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-6, atol=1e-7)


def test_v2_format_has_no_zero_offset():
    rng = np.random.default_rng(3)
    t = random_gptq_layer(64, 32, 4, 32, False, False, rng)
    v2 = dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, zero_offset=0)
    np.testing.assert_allclose(v2.numpy(), np_dequantize(t, 4, zero_offset=0).T, rtol=1e-6, atol=1e-7)


def test_reference_matmul_adds_bias_and_keeps_dtype():
    rng = np.random.default_rng(5)
    t = random_gptq_layer(64, 32, 4, 32, True, True, rng)
    x = torch.randn(3, 64, dtype=torch.float16)
    bias = torch.randn(32, dtype=torch.float16)
    y = reference_matmul(x, t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 1, bias)
    w = torch.from_numpy(np_dequantize(t, 4, 1)).T
    expected = x.double() @ w + bias.double()
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.double(), expected, rtol=2e-3, atol=2e-3)

"""The exllama backend against the reference backend, under TRITON_INTERPRET=1 on the CPU (or on a GPU)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from backends.quant_config import QuantConfig  # noqa: E402
from tests.gptq_testing import random_gptq_layer, relative_error  # noqa: E402
from tests.test_triton_kernel import DEVICE  # noqa: E402

pytest.importorskip("triton")


@pytest.mark.parametrize("group_size, act_order, sym", [(32, True, True), (128, False, False), (-1, True, True),
                                                        (64, True, False)])
def test_model_matches_reference_backend(tmp_path, group_size, act_order, sym):
    from tests.gptq_testing import backend_logits, tiny_config, write_random_checkpoint

    path = write_random_checkpoint(tmp_path / "m", tiny_config(num_hidden_layers=1), 4, group_size, act_order, sym=sym)
    for length in (3, 9):  # GEMV per row, then dequantize + matmul
        tokens = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(length))
        logits = {backend: backend_logits(path, backend, tokens, DEVICE) for backend in ("reference", "exllama")}
        assert relative_error(logits["exllama"], logits["reference"]) < 1e-2, length


def test_act_order_permutation_round_trips():
    from backends.base import GPTQTensors
    from backends.exllama_linear import ExllamaLinear
    from kernels.gptq_format import dequantize

    rng = np.random.default_rng(3)
    t = random_gptq_layer(128, 64, 4, 32, True, False, rng)
    layer = ExllamaLinear(GPTQTensors("l", t["qweight"], t["qzeros"], t["scales"], t["g_idx"], None, 128, 64),
                          QuantConfig(bits=4, group_size=32, desc_act=True, sym=False), torch.float16,
                          torch.device(DEVICE))
    assert layer.q_perm is not None
    assert torch.equal(t["g_idx"].long()[layer.q_perm.cpu()], torch.arange(128) // 32), "groups are contiguous"
    assert torch.equal(layer.q_perm[layer.q_invperm].cpu(), torch.arange(128))
    expected = dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 1)
    assert relative_error(layer.dequantize().cpu(), expected) < 1e-3


def test_only_what_it_can_run():
    from backends.exllama_backend import ExllamaBackend

    backend = ExllamaBackend()
    cpu = torch.device("cpu")
    assert "4-bit" in backend.unavailable_reason(cpu, QuantConfig(bits=8, group_size=128))
    assert "multiple of 32" in backend.unavailable_reason(cpu, QuantConfig(bits=4, group_size=48))
    assert "not GPTQ" in backend.unavailable_reason(cpu, None)


def test_irregular_act_order_groups_are_refused():
    from backends.base import GPTQTensors
    from backends.exllama_linear import ExllamaLinear
    from backends.weights import WeightsError

    t = random_gptq_layer(128, 64, 4, 32, False, True, np.random.default_rng(5))
    g_idx = torch.arange(128, dtype=torch.int32) // 32
    g_idx[32:40] = 0  # group 0 has 40 rows, group 1 only 24: no contiguous runs of 32
    with pytest.raises(WeightsError, match="triton backend"):
        ExllamaLinear(GPTQTensors("l", t["qweight"], t["qzeros"], t["scales"], g_idx, None, 128, 64),
                      QuantConfig(bits=4, group_size=32, desc_act=True), torch.float16, torch.device(DEVICE))


def _layer(k: int, n: int, seed: int, sym: bool = True):
    from backends.base import GPTQTensors
    from backends.exllama_linear import ExllamaLinear

    t = random_gptq_layer(k, n, 4, 32, False, sym, np.random.default_rng(seed))
    return ExllamaLinear(GPTQTensors(f"l{seed}", t["qweight"], t["qzeros"], t["scales"], t["g_idx"], None, k, n),
                         QuantConfig(bits=4, group_size=32, sym=sym), torch.float16, torch.device(DEVICE))


@pytest.mark.parametrize("rows", [1, 3, 5])  # the GEMV, then the tensor-core matmul (or dequantize + matmul)
def test_fused_gate_up_computes_silu_gate_times_up(rows):
    from backends.exllama_linear import ExllamaLinear

    gate, up = _layer(64, 256, 1), _layer(64, 256, 2, sym=False)  # two 128-column tiles each
    fused = ExllamaLinear.fuse_glu(gate, up)
    assert fused is not None and fused.glu
    x = torch.randn(1, rows, 64, generator=torch.Generator().manual_seed(rows)).to(DEVICE, torch.float16)
    g, u = gate(x).float(), up(x).float()
    assert relative_error(fused.silu_mul(x).float(), torch.nn.functional.silu(g) * u) < 1e-2
    assert relative_error(fused(x).float(), torch.cat((g, u), dim=-1)) < 1e-2, "forward keeps [gate | up]"
    assert relative_error(fused.dequantize().float(), torch.cat((gate.dequantize(), up.dequantize()), 1).float()) < 1e-3


def test_gate_up_not_multiple_of_a_tile_fuse_plainly():
    from backends.exllama_linear import ExllamaLinear

    assert ExllamaLinear.fuse_glu(_layer(64, 96, 1), _layer(64, 96, 2)) is None


def test_forward_add_is_residual_plus_forward():
    layer = _layer(64, 128, 3)
    x = torch.randn(1, 2, 64).to(DEVICE, torch.float16)
    residual = torch.randn(1, 2, 128).to(DEVICE, torch.float16)
    expected = residual.float() + layer(x).float()
    assert relative_error(layer.forward_add(x, residual).float(), expected) < 1e-2


def test_without_nvcc_the_build_says_so_and_the_backend_falls_back(tmp_path, monkeypatch):
    from backends.exllama_backend import ExllamaBackend
    from kernels import cuda_lib

    monkeypatch.setenv("GPTQ_WB_CACHE", str(tmp_path))
    monkeypatch.setattr(cuda_lib, "find_nvcc", lambda: None)
    with pytest.raises(cuda_lib.BuildError, match="nvcc"):
        cuda_lib.library.__wrapped__("86")
    assert not list(tmp_path.rglob("*.so"))
    assert "Triton" in ExllamaBackend().note(torch.device("cpu"))


def test_a_failed_build_reports_the_compiler_error_and_leaves_no_library(tmp_path, monkeypatch):
    from kernels import cuda_lib

    if cuda_lib.find_nvcc() is None:
        pytest.skip("no nvcc here")
    broken = tmp_path / "broken.cu"
    broken.write_text("this is not CUDA\n")
    monkeypatch.setenv("GPTQ_WB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cuda_lib, "SOURCES", (*cuda_lib.SOURCES, broken))
    with pytest.raises(cuda_lib.BuildError, match="could not build"):
        cuda_lib.library.__wrapped__("90")
    assert not list((tmp_path / "cache").rglob("*.so"))


@pytest.mark.parametrize("rows", [1, 3, 5])
def test_a_passed_norm_is_applied_wherever_the_kernel_runs(rows):
    """forward(x, norm) and silu_mul(x, norm) equal the layer applied to norm(x): in the CUDA GEMV's staging
    on a GPU, else before the Triton GEMV or dequantize + matmul."""
    from backends.exllama_linear import ExllamaLinear
    from backends.model import RMSNorm

    norm = RMSNorm(64, 1e-5)
    norm.weight = torch.nn.Parameter((torch.rand(64, generator=torch.Generator().manual_seed(1)) + 0.5).half().to(DEVICE),
                                     requires_grad=False)
    x = (torch.randn(1, rows, 64, generator=torch.Generator().manual_seed(rows)) * 30).to(DEVICE, torch.float16)
    layer = _layer(64, 128, 3)
    assert relative_error(layer(x, norm).float(), layer(norm(x)).float()) < 1e-2
    fused = ExllamaLinear.fuse_glu(_layer(64, 256, 1), _layer(64, 256, 2))
    assert relative_error(fused.silu_mul(x, norm).float(), fused.silu_mul(norm(x)).float()) < 1e-2

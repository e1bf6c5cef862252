"""The cpu backend (GPTQ kept packed, torch's int4/int8 CPU kernels, bf16 activations) against the reference
backend and transformers, on the fixture branches and random checkpoints of every format."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from backends.loader import LoadOptions, build_model, load_model
from backends.perplexity import perplexity
from backends.registry import BackendError, resolve_backend
from backends.quant_config import QuantConfig
from backends.weights import WeightsError
from tests.fixture_models import BRANCHES, DATA
from tests.gptq_testing import hf_twin, relative_error, tiny_config, write_random_checkpoint

PROMPT = "The quick brown fox jumps over the lazy dog because"
EVAL = (DATA / "eval.txt").read_text()[:6000]


def logits(loaded, text: str) -> torch.Tensor:
    ids = loaded.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return loaded.model(ids, torch.arange(ids.shape[1]), cached=False).float()


def test_auto_picks_it_on_the_cpu():
    assert resolve_backend("auto", torch.device("cpu"), QuantConfig(bits=4, group_size=128)).name == "cpu"
    assert resolve_backend("auto", torch.device("cpu"), None).name == "reference"  # an unquantized model


@pytest.mark.parametrize("branch", BRANCHES)
def test_fixture_branch_within_bf16_of_the_reference(smollm2_branch, branch):
    """Logits within bf16's reach of the fp32 reference (two bf16 runs that round in different places each
    stray from fp32 by about the reference-in-bf16's error: at most twice that), and perplexity within 1%."""
    path = smollm2_branch(branch)
    packed = load_model(path, LoadOptions(device="cpu", backend="cpu"))
    assert packed.dtype == torch.bfloat16
    reference = load_model(path, LoadOptions(device="cpu", backend="reference"))
    reference_bf16 = load_model(path, LoadOptions(device="cpu", backend="reference", dtype="bfloat16"))
    expected = logits(reference, PROMPT)
    bf16_error = relative_error(logits(reference_bf16, PROMPT), expected)
    assert relative_error(logits(packed, PROMPT), expected) < 2 * bf16_error
    assert abs(perplexity(packed, EVAL) / perplexity(reference, EVAL) - 1) < 0.01


FORMATS = [(4, 32, True, False), (4, 64, False, True), (4, 128, True, True), (4, -1, True, False),
           (8, 128, True, False), (8, 64, False, True), (8, -1, False, False), (8, -1, True, True)]


@pytest.mark.parametrize("bits, group_size, act_order, sym", FORMATS)
def test_every_format_matches_transformers(tmp_path, bits, group_size, act_order, sym):
    config = tiny_config(hidden_size=128, intermediate_size=256, head_dim=32)
    path = write_random_checkpoint(tmp_path / "m", config, bits=bits, group_size=group_size, act_order=act_order,
                                   sym=sym, seed=bits + group_size)
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    theirs = hf_twin(path, bits)(tokens).logits
    errors = {}
    for backend, dtype in (("cpu", "auto"), ("reference", "bfloat16")):
        model, *_ = build_model(path, LoadOptions(device="cpu", backend=backend, dtype=dtype))
        model.setup_cache(batch=1, max_seq_len=16)
        with torch.no_grad():
            errors[backend] = relative_error(model(tokens, torch.arange(12)), theirs)
    assert errors["cpu"] < 2 * errors["reference"], errors  # bf16's reach, as on the fixture branches


def test_layouts_it_cannot_take_are_refused(tmp_path):
    with pytest.raises(BackendError, match="group size 48"):
        resolve_backend("cpu", torch.device("cpu"), QuantConfig(bits=4, group_size=48))
    narrow = write_random_checkpoint(tmp_path / "narrow", tiny_config(hidden_size=40, num_key_value_heads=4, head_dim=10),
                                     bits=4, group_size=-1, act_order=False)
    with pytest.raises(WeightsError, match="N a multiple of 16"):
        build_model(narrow, LoadOptions(device="cpu", backend="cpu"))
    irregular = write_random_checkpoint(tmp_path / "irregular", tiny_config(), bits=4, group_size=32, act_order=True)
    from safetensors.torch import load_file, save_file

    weights = irregular / "model.safetensors"
    tensors = load_file(str(weights))
    name = "model.layers.0.self_attn.q_proj.g_idx"
    tensors[name][:3] = 0  # group 0 gets more rows than its size
    save_file(tensors, str(weights))
    with pytest.raises(WeightsError, match="not runs of 32 rows"):
        build_model(irregular, LoadOptions(device="cpu", backend="cpu"))


MEASURE = textwrap.dedent("""
    import gc, json, sys, threading, time
    import torch
    from backends.loader import LoadOptions, build_model

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    build_model(sys.argv[2], LoadOptions(device="cpu", backend="cpu"))  # the libraries' own first-use memory
    gc.collect()
    before, peak, done = rss(), [0], []

    def watch():
        while not done:
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    model, *_ = build_model(sys.argv[1], LoadOptions(device="cpu", backend="cpu"))
    model.setup_cache(batch=1, max_seq_len=256)
    done.append(True)
    watcher.join()
    kv = {id(b) for layer in model.layers for b in layer.self_attn.kv_cache.buffers()}
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()] if t is not None}
    live = sum(t.numel() * t.element_size() for t in tensors.values())
    kv_bytes = sum(t.numel() * t.element_size() for t in tensors.values() if id(t) in kv)
    print(json.dumps({"live": live, "kv": kv_bytes, "peak": peak[0] - before, "resident": rss() - before}))
""")


def test_memory_follows_the_checkpoint(tmp_path):
    """A mid-sized model (24 layers of 512 x 1408, 4-bit g128 act-order): the process's resident memory after
    the load (the libraries' first-use memory set aside) is at most 1.25x the checkpoint plus the KV cache, and
    sampled through the load it never reaches the model dense in fp32. (A load's transient unpacked layers
    stay with the allocator: a few layers' worth, so a model of fewer, wider layers is over the bound.)"""
    config = tiny_config(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=24,
                         num_attention_heads=8, num_key_value_heads=8, head_dim=64)
    path = write_random_checkpoint(tmp_path / "m", config, bits=4, group_size=128, act_order=True,
                                   shared_g_idx=True, device="cpu")
    small = write_random_checkpoint(tmp_path / "s", tiny_config(hidden_size=128, intermediate_size=256, head_dim=32),
                                    bits=4, group_size=128, act_order=True, device="cpu")
    checkpoint = (path / "model.safetensors").stat().st_size
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(small)], capture_output=True, text=True,
                         check=True, cwd=str(DATA.parent.parent))
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    dense_fp32 = 4 * 24 * (4 * 512 * 512 + 3 * 512 * 1408)
    assert measured["live"] <= measured["resident"] <= 1.25 * checkpoint + measured["kv"], (measured, checkpoint)
    assert measured["peak"] < dense_fp32 / 2, (measured, dense_fp32)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_memory_need_is_told_before_loading(tmp_path, backend):
    """The Model tab's figure (backends.memory.memory_need) against what the load then holds."""
    from backends.memory import kv_bytes, memory_need
    from backends.model_config import load_model_args
    from backends.quant_config import load_quant_config
    from backends.weights import find_weight_files

    config = tiny_config(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=3, head_dim=32)
    path = write_random_checkpoint(tmp_path / "m", config, bits=4, group_size=64, act_order=True, shared_g_idx=True)
    model, args, qconfig, name, device, dtype = build_model(path, LoadOptions(device="cpu", backend=backend))
    model.setup_cache(batch=1, max_seq_len=100)
    held = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in [*model.parameters(),
                                                                                 *model.buffers()]}.values())
    files = find_weight_files(path, load_quant_config(path), False).files
    need = memory_need(files, load_model_args(path), qconfig, name, dtype, device, kv_bytes(args, 100, dtype))
    assert 0.85 * held <= need.total <= 1.15 * held, (need, held)


def test_a_load_that_would_not_fit_is_refused(tmp_path, monkeypatch):
    from webui import state as state_module
    from webui.settings import ModelSettings
    from webui.state import AppState

    models = tmp_path / "models"
    write_random_checkpoint(models / "tiny", tiny_config(), bits=4, group_size=32, act_order=False)
    app = AppState(models_dir=models, presets_dir=tmp_path)
    need = app.memory_need("tiny", ModelSettings(backend="cpu", context_length=64))
    monkeypatch.setattr(state_module, "available_bytes", lambda device: need.total // 2)
    with pytest.raises(MemoryError, match=r"would need about .* of RAM .* is free"):
        app.load("tiny", ModelSettings(backend="cpu", context_length=64))
    assert app.loaded is None


@pytest.mark.parametrize("sym, act_order", [(True, False), (False, True)])
def test_fused_projections_equal_the_parts(sym, act_order):
    """q/k/v (or gate/up) stacked into one int4 kernel call give the parts' outputs exactly."""
    import numpy as np

    from backends.base import GPTQTensors
    from backends.cpu_backend import CpuBackend, PackedCpuLinear
    from tests.gptq_testing import random_gptq_layer

    rng = np.random.default_rng(5)
    qconfig = QuantConfig(bits=4, group_size=64, desc_act=act_order, sym=sym)
    shared = random_gptq_layer(256, 64, 4, 64, act_order, sym, rng)["g_idx"]
    parts = []
    for i, n in enumerate((128, 64, 64)):
        t = random_gptq_layer(256, n, 4, 64, act_order, sym, rng)
        t["g_idx"] = shared
        parts.append(CpuBackend().make_linear(GPTQTensors(f"p{i}", t["qweight"], t["qzeros"], t["scales"], t["g_idx"],
                                                          None, 256, n), qconfig, torch.bfloat16, torch.device("cpu")))
    fused = PackedCpuLinear.fuse(parts)
    assert fused is not None and fused.out_features == 256
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        together, apart = fused(x).float(), torch.cat([p(x) for p in parts], dim=-1).float()
    if sym:  # the int4 kernel alone: column by column, the same sums
        assert torch.equal(together, apart)
    else:  # plus the zero terms' small matmul, whose blocking may differ with N
        torch.testing.assert_close(together, apart, rtol=1e-2, atol=1e-2 * float(apart.abs().mean()))

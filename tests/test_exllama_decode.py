"""The exllama backend's batch-1 decode chain (backends/exllama_decode.py) against the per-layer path it
replaces; GPU only (device)."""

import pytest
import torch

from backends.loader import LoadOptions, build_model
from tests.gptq_testing import relative_error, tiny_config, write_random_checkpoint
from tests.test_cuda_graph import decode_logits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels need a GPU (run on the device)")


def _model(tmp_path, act_order: bool, sym: bool = True, **overrides):
    config = tiny_config(**{"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 3,
                            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, **overrides})
    path = write_random_checkpoint(tmp_path / "m", config, 4, 32, act_order, sym, shared_g_idx=True)
    model, *_ = build_model(path, LoadOptions(backend="exllama", device="cuda", dtype="float16"))
    return model


def _decode(model, tokens: list[int], kv_len: int = 64) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits of each token decoded one at a time, and the layers' caches afterwards."""
    model.setup_cache(batch=1, max_seq_len=kv_len)
    logits = torch.stack(decode_logits(model, tokens, lambda position: kv_len))
    caches = [c for layer in model.layers for c in (layer.self_attn.kv_cache.k, layer.self_attn.kv_cache.v)]
    return logits, caches


class _Counting:
    def __init__(self, chain):
        self.chain, self.calls = chain, 0

    def takes(self, x: torch.Tensor) -> bool:
        return self.chain.takes(x)

    def __call__(self, *args) -> torch.Tensor:
        self.calls += 1
        return self.chain(*args)


def _workspaces(model) -> list[torch.Tensor]:
    return [m.workspace.sums for m in model.modules() if getattr(m, "workspace", None) is not None]


@pytest.mark.parametrize("act_order, sym, overrides", [
    (False, True, {}),
    (True, False, {}),
    (False, True, {"num_key_value_heads": 4, "head_dim": 128, "hidden_size": 512}),
    (True, True, {"model_type": "mistral", "sliding_window": 5}),
])
def test_chain_matches_the_per_layer_kernels(tmp_path, act_order, sym, overrides):
    model = _model(tmp_path, act_order, sym, **overrides)
    chain = model.decode_chain
    assert chain is not None, "every layer is made of fusable exllama GEMVs"
    tokens = [5, 17, 3, 99, 42, 7, 1, 64, 8, 11]
    model.decode_chain = None
    per_layer, per_layer_caches = _decode(model, tokens)
    model.decode_chain = counting = _Counting(chain)
    chained, chained_caches = _decode(model, tokens)
    assert counting.calls == len(tokens), "every step went through the chain"
    # The same roundings; only the order of the fp32 atomic adds differs.
    assert relative_error(chained, per_layer) < 2e-3
    for a, b in zip(chained_caches, per_layer_caches):
        assert relative_error(a, b) < 2e-3
    torch.cuda.synchronize()
    assert all(not ws.any() for ws in _workspaces(model)), "a step leaves every GEMV workspace zero"


def test_chain_under_graph_replay_matches_eager_per_layer(tmp_path):
    from backends.cuda_graph import GraphedDecoder

    model = _model(tmp_path, True)
    chain = model.decode_chain
    tokens = list(range(3, 3 + 40))
    model.decode_chain = None
    eager, _ = _decode(model, tokens, kv_len=256)
    model.decode_chain = chain
    model.setup_cache(batch=1, max_seq_len=256)
    decoder = GraphedDecoder(model)
    with torch.inference_mode():
        graphed = torch.stack([decoder.step(t, p).clone() for p, t in enumerate(tokens)])
    assert relative_error(graphed, eager) < 2e-3


def test_a_step_cut_short_leaves_no_sums_behind(tmp_path, monkeypatch):
    """An error in the middle of a step (here: the attention kernel of the second layer) zeroes the workspaces,
    so the next steps compute what they would have."""
    from kernels import decode_attention

    model = _model(tmp_path, False)
    tokens = [5, 17, 3, 99]
    expected, _ = _decode(model, tokens)
    real, calls = decode_attention.decode_attention, {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise torch.cuda.OutOfMemoryError("out of memory (test)")
        return real(*args, **kwargs)

    model.setup_cache(batch=1, max_seq_len=64)
    with torch.inference_mode():
        model(torch.tensor([[tokens[0]]], device="cuda"), torch.tensor([0], device="cuda"), kv_len=64)
        monkeypatch.setattr(decode_attention, "decode_attention", failing)
        with pytest.raises(torch.cuda.OutOfMemoryError):
            model(torch.tensor([[tokens[1]]], device="cuda"), torch.tensor([1], device="cuda"), kv_len=64)
        monkeypatch.setattr(decode_attention, "decode_attention", real)
    torch.cuda.synchronize()
    assert all(not ws.any() for ws in _workspaces(model))
    again, _ = _decode(model, tokens)
    assert relative_error(again, expected) < 2e-3


def test_no_chain_where_it_cannot_run(tmp_path):
    """Prompts (several tokens) and triton layers take the per-layer path; gate/up that cannot be interleaved
    for the SiLU*up epilogue leave the model without a chain."""
    model = _model(tmp_path, False)
    x = torch.zeros(1, 3, 256, dtype=torch.float16, device="cuda")
    model.setup_cache(batch=1, max_seq_len=16)
    assert not model.decode_chain.takes(x) and model.decode_chain.takes(x[:, :1])
    unfused = _model(tmp_path / "u", False, intermediate_size=320)  # not a multiple of 128
    assert unfused.decode_chain is None
    path = write_random_checkpoint(tmp_path / "t", tiny_config(), 4, 32, False)
    triton_model, *_ = build_model(path, LoadOptions(backend="triton", device="cuda", dtype="float16"))
    assert triton_model.decode_chain is None

"""Decoding with a fixed KV length (as the CUDA graphs do) equals decoding with the exact one;
fused projections equal separate ones."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

import pytest  # noqa: E402

from backends.loader import LoadOptions, build_model  # noqa: E402
from tests.gptq_testing import tiny_config, write_random_checkpoint  # noqa: E402


def decode_logits(model, tokens: list[int], kv_len_of) -> list[torch.Tensor]:
    out = []
    with torch.inference_mode():
        for position, token in enumerate(tokens):
            ids = torch.tensor([[token]], device=model.embed_tokens.weight.device)
            pos = torch.tensor([position], device=ids.device)
            out.append(model(ids, pos, kv_len=kv_len_of(position)).clone()[0, -1])
    return out


@pytest.mark.parametrize("sliding_window", [None, 3])
def test_fixed_kv_length_matches_exact(tmp_path, sliding_window):
    config = tiny_config("mistral", sliding_window=sliding_window) if sliding_window else tiny_config()
    path = write_random_checkpoint(tmp_path / "m", config, 4, 32, True)
    model, *_ = build_model(path, LoadOptions(backend="reference", device="cpu", dtype="float32"))
    model.setup_cache(batch=1, max_seq_len=32)
    tokens = [5, 17, 3, 99, 42, 7, 1, 64]
    exact = decode_logits(model, tokens, lambda p: None)
    model.setup_cache(batch=1, max_seq_len=32)
    fixed = decode_logits(model, tokens, lambda p: 16)
    for a, b in zip(exact, fixed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the device)")
@pytest.mark.parametrize("backend", ["reference", "triton", "exllama"])
def test_graph_replay_matches_eager_on_gpu(tmp_path, backend):
    from backends.cuda_graph import GraphedDecoder

    path = write_random_checkpoint(tmp_path / "m", tiny_config(num_hidden_layers=2), 4, 32, True)
    model, *_ = build_model(path, LoadOptions(backend=backend, device="cuda"))
    model.setup_cache(batch=1, max_seq_len=300)
    tokens = list(range(3, 3 + 140))  # crosses from the 128 bucket into the 256 one
    eager = decode_logits(model, tokens, lambda p: None)
    model.setup_cache(batch=1, max_seq_len=300)
    decoder = GraphedDecoder(model)
    with torch.inference_mode():
        graphed = [decoder.step(t, p).clone() for p, t in enumerate(tokens)]
    assert set(decoder.graphs) == {128, 256}
    for a, b in zip(eager, graphed):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", ["reference", "triton", "exllama"])
@pytest.mark.parametrize("act_order", [False, True])
def test_fused_projections_match_separate_ones(tmp_path, backend, act_order, monkeypatch):
    from backends.model import Transformer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    # The tiny checkpoint's act-order is random per projection, so q/k/v (and gate/up) cannot share one
    # permutation and the kernel backends must leave them separate; without act-order they fuse.
    path = write_random_checkpoint(tmp_path / "m", tiny_config(num_hidden_layers=1), 4, 32, act_order)
    tokens = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0)).to(device)
    options = LoadOptions(backend=backend, device=device, dtype="float32")

    def logits_of(model):
        model.setup_cache(batch=1, max_seq_len=16)
        with torch.inference_mode():
            return model(tokens, torch.arange(6, device=device))

    fused, *_ = build_model(path, options)
    fusable = backend == "reference" or not act_order
    assert (fused.layers[0].self_attn.qkv_proj is not None) == fusable
    assert (fused.layers[0].mlp.gate_up_proj is not None) == fusable
    with monkeypatch.context() as m:
        m.setattr(Transformer, "fuse_projections", lambda self: 0)
        separate, *_ = build_model(path, options)
    assert separate.layers[0].self_attn.qkv_proj is None
    torch.testing.assert_close(logits_of(fused), logits_of(separate), rtol=2e-2, atol=2e-2)


class _IdTokenizer:
    """Token ids as text, enough for Generation's streaming."""

    eos_token_id = None

    def decode(self, ids, **_) -> str:
        return "".join(f"<{i}>" for i in ids)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (run on the device)")
@pytest.mark.parametrize("backend", ["triton", "exllama"])
def test_generation_queues_the_next_step_before_reading_the_token(tmp_path, backend):
    """Generation samples on the GPU and queues the next graph replay before it reads the token; the
    tokens equal step-by-step greedy decoding, and the step queued after a stop token leaves a cache
    that the next generation reuses correctly."""
    from backends.cuda_graph import GraphedDecoder
    from backends.engine import Engine, EngineConfig
    from backends.generation import Generation
    from backends.loader import LoadedModel
    from backends.sampling import SamplingParams

    path = write_random_checkpoint(tmp_path / "m", tiny_config(num_hidden_layers=2), 4, 32, False)
    model, args, qconfig, name, device, dtype = build_model(path, LoadOptions(backend=backend, device="cuda"))
    prompt = [5, 17, 3, 99, 42]
    model.setup_cache(batch=1, max_seq_len=64)
    expected = []
    with torch.inference_mode():
        ids = torch.tensor([prompt], device="cuda")
        logits = model(ids, torch.arange(len(prompt), device="cuda"))[0, -1]
        for position in range(len(prompt), len(prompt) + 12):
            expected.append(int(logits.argmax()))
            logits = model(torch.tensor([[expected[-1]]], device="cuda"), torch.tensor([position], device="cuda"))[0, -1]
    model.setup_cache(batch=1, max_seq_len=64)
    engine = Engine(model, 64, EngineConfig(cache_tokens=256), GraphedDecoder(model))
    loaded = LoadedModel(path=path, model=model, tokenizer=_IdTokenizer(), args=args, qconfig=qconfig, backend=name,
                         device=device, dtype=dtype, context_length=64, engine=engine)

    whole = Generation(loaded, prompt, SamplingParams(temperature=0, max_new_tokens=12))
    assert "".join(whole) == "".join(f"<{t}>" for t in expected)
    assert whole.result.token_ids == expected and whole.result.finish_reason == "length"

    stop = expected[6]
    first = expected.index(stop)
    stopped = Generation(loaded, prompt, SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=(stop,)))
    list(stopped)
    assert stopped.result.token_ids == expected[:first] and stopped.result.finish_reason == "eos"
    assert engine.solo.cached == prompt + expected[:first]  # the stop token's queued step is not counted

    # The next turn reuses the cached prefix and decodes past the slot the wasted step wrote.
    reused = engine.reused_tokens
    follow = Generation(loaded, prompt + expected[:first], SamplingParams(temperature=0, max_new_tokens=12 - first))
    list(follow)
    assert follow.result.token_ids == expected[first:]
    assert engine.reused_tokens - reused == len(prompt) + first - 1
    engine.close()

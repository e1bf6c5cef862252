"""The engine on a GPU (run on the device): sequences decoding together through the paged attention kernel
and the batch-size graphs, a lone sequence on the batch-1 path moving into blocks when others join. Each
generated token is checked against the plain-torch model run over the whole text without a cache."""

import threading
from dataclasses import replace

import pytest
import torch

from torch.profiler import ProfilerActivity, profile

from backends import paged_attention
from backends.cuda_graph import GraphedDecoder
from backends.engine import Engine, EngineConfig
from backends.generation import Generation
from backends.loader import LoadedModel, LoadOptions, build_model
from backends.paged_attention import PagedStep, Segment
from backends.paged_cache import CacheShape, KVPool
from backends.sampling import SamplingParams
from tests.gptq_testing import tiny_config, write_random_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU engine path needs a GPU (device)")


class IdTokenizer:
    eos_token_id = None

    def decode(self, ids, **_) -> str:
        return "".join(f"<{i}>" for i in ids)


@pytest.fixture(scope="module", params=["triton", "exllama"])
def loaded(request, tmp_path_factory):
    config = tiny_config(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=64, vocab_size=512, max_position_embeddings=512)
    path = write_random_checkpoint(tmp_path_factory.mktemp("m") / "m", config, 4, 32, False)
    model, args, qconfig, name, device, dtype = build_model(path, LoadOptions(backend=request.param))
    model.setup_cache(batch=1, max_seq_len=512)
    engine = Engine(model, 512, EngineConfig(cache_tokens=4096, step_tokens=2048), GraphedDecoder(model))
    yield LoadedModel(path=path, model=model, tokenizer=IdTokenizer(), args=args, qconfig=qconfig, backend=name,
                      device=device, dtype=dtype, context_length=512, engine=engine)
    engine.close()


def greedy_gaps(loaded, prompt: list[int], generated: list[int]) -> list[float]:
    """How far below the uncached model's best logit each generated token's logit is."""
    if not generated:
        return []
    with torch.inference_mode():
        ids = torch.tensor([prompt + generated], device="cuda")
        logits = loaded.model(ids, torch.arange(ids.shape[1], device="cuda"), cached=False)[0].float()
    rows = logits[len(prompt) - 1 : len(prompt) - 1 + len(generated)]
    return (rows.max(-1).values - rows[torch.arange(len(generated)), torch.tensor(generated)]).tolist()


def assert_greedy(loaded, prompt: list[int], generated: list[int], tolerance: float = 0.05) -> None:
    """Each generated token is the argmax of the uncached model's logits, up to fp16 noise."""
    for i, gap in enumerate(greedy_gaps(loaded, prompt, generated)):
        assert gap <= tolerance, f"token {i}: {generated[i]} is {gap:.3f} below the argmax"


def lone_then_joined(loaded, first_tokens: int, others: int) -> list[Generation]:
    """One sequence decoding alone (on the batch-1 path) for 10 tokens, then ``others`` joining it; all run to
    their end."""
    first = Generation(loaded, prompts(1)[0], SamplingParams(temperature=0, max_new_tokens=first_tokens))
    stream = iter(first)
    for _ in range(10):
        next(stream)
    joined = [Generation(loaded, p, SamplingParams(temperature=0, max_new_tokens=30)) for p in prompts(others)]
    threads = [threading.Thread(target=run, args=(g,)) for g in joined]
    for t in threads:
        t.start()
    for _ in stream:
        pass
    for t in threads:
        t.join(300)
    return [first, *joined]


def prompts(n: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(n)
    return [torch.randint(3, 512, (int(torch.randint(5, 200, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def run(generation):
    for _ in generation:
        pass


def test_many_sequences_decode_together_correctly(loaded):
    engine = loaded.engine
    gens = [Generation(loaded, p, SamplingParams(temperature=0, max_new_tokens=40)) for p in prompts(12)]
    threads = [threading.Thread(target=run, args=(g,)) for g in gens]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert engine.most_running >= 8
    assert engine.batched is not None and engine.batched.graphs, "decode steps ran through the batch graphs"
    for g in gens:
        assert g.result.new_tokens == 40 or g.result.finish_reason == "eos"
        assert_greedy(loaded, g.prompt_ids, g.result.token_ids)
    assert engine.kv_tokens_held() == 0


def test_a_lone_sequence_moves_into_blocks_when_others_join(loaded):
    for g in lone_then_joined(loaded, 120, 3):
        assert_greedy(loaded, g.prompt_ids, g.result.token_ids)


def test_logprobs_and_sampler_state_ride_the_batched_step(loaded):
    """Sequences asking for logprobs (which turn off the queued-ahead step) and seeded mirostat/XTC decode beside
    plain greedy ones: greedy tokens stay the uncached model's argmax, logprobs are its log-softmax, and
    a seeded sampled run repeats itself."""
    plain = [Generation(loaded, p, SamplingParams(temperature=0, max_new_tokens=30)) for p in prompts(6)]
    scored = Generation(loaded, prompts(7)[0], SamplingParams(temperature=0, max_new_tokens=30), logprobs=2)
    fancy = SamplingParams(temperature=1.0, mirostat_tau=3.0, xtc_probability=0.5, max_new_tokens=30, seed=5)
    sampled = [Generation(loaded, prompts(8)[0], fancy) for _ in range(2)]
    gens = [*plain, scored, *sampled]
    threads = [threading.Thread(target=run, args=(g,)) for g in gens]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for g in [*plain, scored]:
        assert_greedy(loaded, g.prompt_ids, g.result.token_ids)
    with torch.inference_mode():
        ids = torch.tensor([scored.prompt_ids + scored.result.token_ids], device="cuda")
        lp = torch.log_softmax(loaded.model(ids, torch.arange(ids.shape[1], device="cuda"), cached=False)[0].float(), -1)
    for i, entry in enumerate(scored.result.logprobs):
        assert abs(entry.logprob - float(lp[len(scored.prompt_ids) - 1 + i, entry.token])) < 0.05
    assert sampled[0].result.token_ids == sampled[1].result.token_ids


def test_prompt_chunks_attend_without_cudnn(loaded, monkeypatch):
    """cuDNN's SDPA builds an execution plan for each new shape of its inputs (a 64-stream run's prefill steps
    took 4.2 s with it, 1.0 s without); a step's prompt chunks, of ever new lengths, take the other kernels."""
    args = loaded.args
    pool = KVPool(CacheShape(args.n_layers, args.n_kv_heads, args.head_dim, 8, 16), loaded.dtype, loaded.device)
    segments = [Segment(0, 37, 0, (0, 1, 2)), Segment(37, 21, 11, (3, 4))]  # the second from position 11
    step = PagedStep(pool, segments, args.sliding_window, loaded.dtype, args.n_heads)
    g = torch.Generator(device=loaded.device).manual_seed(0)

    def rows(width: int) -> torch.Tensor:
        return torch.randn(58, width, generator=g, device=loaded.device, dtype=loaded.dtype)

    kv_width = args.n_kv_heads * args.head_dim
    q, k, v = rows(args.n_heads * args.head_dim), rows(kv_width), rows(kv_width)
    cos, sin = loaded.model.rotary(step.positions)

    def attend_kernels() -> tuple[torch.Tensor, list[str]]:
        with torch.inference_mode(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            out = step.attend(0, q, k, v, cos, sin)
            torch.cuda.synchronize()
        names = [e.name.lower() for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        return out, names

    monkeypatch.setattr(paged_attention, "PROMPT_SDPA_BACKENDS", None)
    anyone, names = attend_kernels()
    if not any("cudnn" in name for name in names):
        pytest.skip("torch does not pick cuDNN's SDPA for these inputs on this GPU")
    monkeypatch.undo()
    out, names = attend_kernels()
    assert names and not any("cudnn" in name for name in names)
    torch.testing.assert_close(out, anyone, atol=2e-3, rtol=0)


def test_an_fp8_cache_decodes_close_to_the_model(loaded):
    """The engine with an fp8 cache on the GPU: the rotary kernel narrows keys and values into it, the paged
    kernel and the prompt chunks' SDPA widen them, and a lone sequence's batch-1 cache moves into it when
    others join. On the CPU, the same model with an fp8 cache chose the full model's argmax at 82% of 96
    positions, every logit within 0.86 of the full model's."""
    engine = Engine(loaded.model, 512, EngineConfig(cache_tokens=4096, step_tokens=2048, kv_dtype=torch.float8_e4m3fn),
                    GraphedDecoder(loaded.model))
    fp8 = replace(loaded, engine=engine)
    try:
        generations = lone_then_joined(fp8, 60, 6)
        assert engine.pool.k.dtype == torch.float8_e4m3fn and engine.most_running >= 4
        gaps = [gap for g in generations for gap in greedy_gaps(loaded, g.prompt_ids, g.result.token_ids)]
        exact = sum(gap == 0 for gap in gaps) / len(gaps)
        assert exact >= 0.6 and max(gaps) < 1.5 and sum(gaps) / len(gaps) < 0.2, (exact, max(gaps))
        assert engine.kv_tokens_held() == 0
    finally:
        engine.close()

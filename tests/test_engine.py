"""The batched engine on the real SmolLM2 GPTQ checkpoint: requests run side by side exactly as they run
alone, cancel alone, reuse cached prefixes exactly, and wait or are refused when the cache is short."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from backends.engine import Engine, EngineConfig, kv_cache_bytes
from backends.generation import Generation
from backends.loader import LoadOptions, load_model
from backends.memory import kv_bytes
from backends.paged_attention import PagedStep, Segment
from backends.paged_cache import BlockManager, CacheShape, CacheTooSmall, KVPool, block_hashes
from backends.sampling import SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Name three colors.",
    "Write a haiku about the sea.",
    "Why is the sky blue? Explain it to a child in two sentences.",
    "List the planets of the solar system in order from the sun.",
]


def chat(loaded, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    return loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]


def long_prompt(loaded) -> list[int]:
    """Past one step's token budget (512 on the CPU): prefilled in chunks between the others' decode steps."""
    text = " ".join(f"Item {i} is a {['red', 'green', 'blue'][i % 3]} box." for i in range(90))
    return chat(loaded, f"{text}\nWhich colour is item 7?")


@pytest.fixture(scope="module", params=["cpu", "reference"])
def loaded(request, smollm2_branch):
    model = load_model(smollm2_branch("main"), LoadOptions(backend=request.param, device="cpu",
                                                            context_length=1024, cache_tokens=4096))
    yield model
    model.engine.close()


def run(generation: Generation) -> Generation:
    for _ in generation:
        pass
    return generation


def run_together(generations: list[Generation]) -> None:
    threads = [threading.Thread(target=run, args=(g,)) for g in generations]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads)


def mixed_requests(loaded) -> list[tuple[list[int], SamplingParams]]:
    greedy = [(chat(loaded, q), SamplingParams(temperature=0, max_new_tokens=8 + 5 * i)) for i, q in enumerate(QUESTIONS)]
    sampled = (chat(loaded, "Tell me something about cats."),
               SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=20, seed=7))
    penalised = (chat(loaded, "Count from one to ten in words."),
                 SamplingParams(temperature=0, repetition_penalty=1.3, max_new_tokens=16))
    more = (chat(loaded, "Describe the sea in a few words."),
            SamplingParams(temperature=1.0, mirostat_tau=4.0, xtc_probability=0.5, dry_multiplier=0.8,
                           dynatemp_range=0.3, max_new_tokens=20, seed=3))
    return greedy + [sampled, penalised, more, (long_prompt(loaded), SamplingParams(temperature=0, max_new_tokens=10))]


def test_concurrent_requests_equal_each_run_alone(loaded):
    requests = mixed_requests(loaded)
    assert len(requests[-1][0]) > 512
    loaded.engine.forget_prefixes()
    alone = [run(Generation(loaded, ids, params)).result for ids, params in requests]
    loaded.engine.forget_prefixes()
    steps_before = loaded.engine.steps
    together = [Generation(loaded, ids, params) for ids, params in requests]
    run_together(together)
    assert loaded.engine.most_running >= 4
    for a, t in zip(alone, together):
        assert t.result.token_ids == a.token_ids
        assert t.result.finish_reason == a.finish_reason
    solo_steps = sum(r.new_tokens + 2 for r in alone)
    assert loaded.engine.steps - steps_before < solo_steps / 2, "the requests were batched, not taken in turns"
    assert loaded.engine.kv_tokens_held() == 0, "every block was given back"


def test_cancelling_one_leaves_the_others_running_and_correct(loaded):
    requests = [(chat(loaded, q), SamplingParams(temperature=0, max_new_tokens=30)) for q in QUESTIONS[:3]]
    alone = [run(Generation(loaded, ids, params)).result.token_ids for ids, params in requests]
    generations = [Generation(loaded, ids, params) for ids, params in requests]
    victim = generations[1]
    got_one = threading.Event()

    def cancel_after_first():
        for _ in victim:
            got_one.set()
            victim.cancel.set()

    threads = [threading.Thread(target=run, args=(g,)) for g in (generations[0], generations[2])]
    threads.append(threading.Thread(target=cancel_after_first))
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert got_one.is_set() and victim.result.finish_reason == "cancelled"
    assert victim.result.new_tokens < 30
    assert generations[0].result.token_ids == alone[0]
    assert generations[2].result.token_ids == alone[2]


def test_a_reused_prefix_gives_the_logits_of_a_fresh_prefill(loaded):
    """Blocks computed for one prompt, taken by the next through their names, give the same logits as the
    whole prompt computed from nothing, with no cache and with fresh blocks."""
    model, args = loaded.model, loaded.args
    shape = CacheShape(args.n_layers, args.n_kv_heads, args.head_dim, num_blocks=32)
    pool, blocks = KVPool(shape, loaded.dtype, torch.device("cpu")), BlockManager(32)
    first = chat(loaded, "Tell me about the history of Rome in one paragraph.")
    second = first[:40] + chat(loaded, "And of Athens?")[1:]

    def prefill(tokens: list[int], held: list[int], start: int) -> torch.Tensor:
        assert blocks.reserve(blocks.blocks_for(len(tokens)) - len(held))
        while len(held) * shape.block_size < len(tokens):
            held.append(blocks.take())
        step = PagedStep(pool, [Segment(0, len(tokens) - start, start, tuple(held))], args.sliding_window,
                         loaded.dtype, args.n_heads)
        with torch.inference_mode():
            ids = torch.tensor(tokens[start:])
            return model.forward_paged(ids, step.positions, step, torch.tensor([len(tokens) - start - 1]))[0]

    held_first: list[int] = []
    prefill(first, held_first, 0)
    for block, name in zip(held_first, block_hashes(first, shape.block_size)):
        blocks.name(block, name)
    blocks.release(held_first)

    reused = blocks.lookup(block_hashes(second[:-1], shape.block_size))
    assert len(reused) == 2  # the 40 shared tokens hold two full blocks of 16
    from_cache = prefill(second, reused, 32)
    fresh = prefill(second, [], 0)
    with torch.inference_mode():
        uncached = model(torch.tensor([second]), torch.arange(len(second)), cached=False)[0, -1]
    tolerance = 1e-4 if loaded.dtype == torch.float32 else 0.05
    torch.testing.assert_close(from_cache, fresh, atol=tolerance, rtol=0)
    torch.testing.assert_close(from_cache, uncached, atol=tolerance * 20, rtol=0)
    assert int(from_cache.argmax()) == int(uncached.argmax())


def test_the_engine_reuses_a_shared_prefix(loaded):
    system = "You are a careful assistant who answers in one short sentence. " * 3
    params = SamplingParams(temperature=0, max_new_tokens=6)

    def ask(question: str) -> list[int]:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        return loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=True)["input_ids"]

    loaded.engine.forget_prefixes()
    run(Generation(loaded, ask(QUESTIONS[0]), params))
    before = loaded.engine.reused_tokens
    reused = run(Generation(loaded, ask(QUESTIONS[1]), params))
    assert loaded.engine.reused_tokens - before >= 32
    loaded.engine.forget_prefixes()
    fresh = run(Generation(loaded, ask(QUESTIONS[1]), params))
    assert reused.result.token_ids == fresh.result.token_ids


@pytest.fixture(scope="module")
def small_cache(smollm2_branch):
    model = load_model(smollm2_branch("main"), LoadOptions(device="cpu", context_length=256, cache_tokens=96))
    yield model
    model.engine.close()


def test_a_request_larger_than_the_cache_is_refused(small_cache):
    with pytest.raises(CacheTooSmall, match="cache holds 96"):
        Generation(small_cache, chat(small_cache, QUESTIONS[0]), SamplingParams(max_new_tokens=200))


def test_a_request_that_does_not_fit_yet_waits_for_room(small_cache):
    """Each needs 4 of the 6 blocks: sent together, they run one after the other (never side by side, which
    a larger cache allows: see the concurrency test), and each answers as it does alone."""
    engine = small_cache.engine
    # Raw prompts with nothing in common: no block of one can serve the other (a shared prefix would).
    prompts = [small_cache.tokenizer.encode(text) for text in ("Once upon a time", "The rain in Spain")]
    requests = [(ids, SamplingParams(temperature=0, max_new_tokens=60 - len(ids))) for ids in prompts]
    alone = [run(Generation(small_cache, ids, params)).result.token_ids for ids, params in requests]
    engine.forget_prefixes()
    engine.most_running = 0
    together = [Generation(small_cache, ids, params) for ids, params in requests]
    seen, done = set(), threading.Event()

    def watch() -> None:  # what the Model tab and the API's model info read while the two run
        while not done.is_set():
            stats = engine.stats()
            seen.add((stats.running, stats.waiting, stats.kv_tokens_held > 0, stats.kv_tokens_held <= stats.kv_tokens))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    run_together(together)
    done.set()
    watcher.join()
    assert engine.most_running == 1
    assert (1, 1, True, True) in seen, "one generated while the other waited, and held cache"
    assert all(within for *_, within in seen) and engine.stats().kv_tokens == 96
    assert [g.result.token_ids for g in together] == alone
    stats = engine.stats()
    assert (stats.running, stats.waiting, stats.kv_tokens_held) == (0, 0, 0)


def test_an_fp8_cache_stays_close_to_the_full_one(loaded):
    """Keys and values stored as fp8 (e4m3) through the engine's paged step: the next-token distributions over
    a real prompt stay close to those of a cache in the model's dtype (measured: top-1 the same at 96-97% of
    positions, mean KL 0.008-0.009 nats)."""
    model, args = loaded.model, loaded.args
    text = " ".join(f"Item {i} is a {['red', 'green', 'blue'][i % 3]} box." for i in range(40))
    ids = chat(loaded, f"{text} Which colour is item 7? {QUESTIONS[3]}")
    blocks = tuple(range(-(-len(ids) // 16)))
    logits = {}
    for kv_dtype in (loaded.dtype, torch.float8_e4m3fn):
        pool = KVPool(CacheShape(args.n_layers, args.n_kv_heads, args.head_dim, len(blocks)), kv_dtype,
                      torch.device("cpu"))
        step = PagedStep(pool, [Segment(0, len(ids), 0, blocks)], args.sliding_window, loaded.dtype, args.n_heads)
        with torch.inference_mode():
            logits[kv_dtype] = model.forward_paged(torch.tensor(ids), step.positions, step,
                                                   torch.arange(len(ids))).float()
        assert pool.k.dtype == kv_dtype and pool.k.float().abs().sum() > 0
    full, narrow = logits[loaded.dtype].log_softmax(-1), logits[torch.float8_e4m3fn].log_softmax(-1)
    agree = (full.argmax(-1) == narrow.argmax(-1)).float().mean()
    kl = (full.exp() * (full - narrow)).sum(-1).mean()
    assert agree >= 0.9 and kl < 0.03, (float(agree), float(kl))
    assert kl > 1e-5, "the fp8 cache was read, not a full one"


def test_an_fp8_engine_runs_requests_to_their_end(smollm2_branch):
    """The engine with an fp8 cache (as on a GPU; the loader offers it there only): prompts prefilled in
    chunks, prefixes reused, every request to its end, every block given back."""
    loaded = load_model(smollm2_branch("main"), LoadOptions(backend="reference", device="cpu", context_length=1024,
                                                            cache_tokens=4096))
    loaded.engine.close()
    loaded.engine = Engine(loaded.model, 1024, EngineConfig(cache_tokens=4096, kv_dtype=torch.float8_e4m3fn))
    try:
        requests = [(chat(loaded, q), SamplingParams(temperature=0, max_new_tokens=12)) for q in QUESTIONS[:3]]
        requests.append((long_prompt(loaded), SamplingParams(temperature=0, max_new_tokens=6)))
        together = [Generation(loaded, ids, params) for ids, params in requests]
        run_together(together)
        again = run(Generation(loaded, *requests[0]))
        assert loaded.engine.pool.k.dtype == torch.float8_e4m3fn
        assert all(g.result.finish_reason in ("eos", "length") and g.result.new_tokens > 0 for g in together)
        assert again.result.token_ids == together[0].result.token_ids
        assert loaded.engine.reused_tokens > 0 and loaded.engine.kv_tokens_held() == 0
        assert "Paris" in together[0].result.text
    finally:
        loaded.engine.close()


def test_an_fp8_cache_is_offered_on_a_gpu_only(smollm2_branch):
    with pytest.raises(ValueError, match="choose one of auto, fp8"):
        load_model(smollm2_branch("main"), LoadOptions(backend="cpu", device="cpu", kv_cache="int8"))
    with pytest.raises(ValueError, match="an fp8 KV cache needs a GPU"):
        load_model(smollm2_branch("main"), LoadOptions(backend="cpu", device="cpu", kv_cache="fp8"))


def test_the_memory_figure_counts_an_fp8_cache_at_a_byte_a_value(loaded):
    args, gpu = loaded.args, torch.device("cuda")  # the figure only asks the device's type
    full = kv_cache_bytes(args, 1024, gpu, torch.float16, 4096)
    narrow = kv_cache_bytes(args, 1024, gpu, torch.float16, 4096, torch.float8_e4m3fn)
    lone = kv_bytes(args, 1024, torch.float16)  # the batch-1 path's own cache stays 16-bit
    assert full - lone == 2 * (narrow - lone) == 2 * 2 * args.n_layers * 4096 * args.n_kv_heads * args.head_dim
    assert kv_cache_bytes(args, 1024, torch.device("cpu"), torch.bfloat16) == kv_bytes(args, 1024, torch.bfloat16)

"""Streaming generation on the real SmolLM2 tokenizer and a real GPTQ checkpoint."""

import threading

import pytest

from backends.generation import ContextOverflowError, Generation, IncrementalDecoder, StopStringFilter, text_decoder
from backends.loader import LoadOptions, load_model
from backends.sampling import SamplingParams


@pytest.fixture(scope="module")
def loaded(smollm2_branch):
    return load_model(smollm2_branch("main"), LoadOptions(device="cpu", context_length=256))


def prompt(loaded, question="What is the capital of France?"):
    messages = [{"role": "user", "content": question}]
    return loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


def test_incremental_decoder_never_splits_characters(loaded):
    text = "Grüße aus Köln 👋🏽 — 東京は日本の首都です。 ∑x² ≠ 0"
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(loaded.tokenizer)
    pieces = [decoder.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text
    assert sum(1 for p in pieces if p) > 10


def test_text_decoder_equals_the_tokenizers_decode(loaded, monkeypatch):
    tokenizer = loaded.tokenizer
    text = "Grüße aus Köln 👋🏽 —  two  spaces , and a comma ."
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    special = tokenizer.all_special_ids
    chunks = [ids, [special[0], *ids[:5], special[-1], *ids[5:]], ids[3:4], []]
    expected = [tokenizer.decode(c, skip_special_tokens=True, clean_up_tokenization_spaces=False) for c in chunks]
    # A fast tokenizer is decoded by its Rust tokenizer directly, not through transformers' wrapper.
    monkeypatch.setattr(tokenizer, "decode", lambda *a, **k: pytest.fail("decoded through the wrapper"))
    decode = text_decoder(tokenizer)
    assert [decode(c) for c in chunks] == expected


def test_stop_string_filter_holds_back_partial_matches():
    f = StopStringFilter(("User:",))
    assert f.push("Hello Us") == "Hello "
    assert f.push("e") == ""
    assert f.push("d to it") == "Used to it"
    assert f.push(" User") == " "
    assert f.push(": hi") == "" and f.stopped
    g = StopStringFilter(("ab",))
    assert g.push("xa") == "x" and g.flush() == "a"


def test_stop_string_ends_generation_before_it(loaded):
    gen = Generation(loaded, prompt(loaded), SamplingParams(temperature=0, stop_strings=(" Paris",)))
    text = "".join(gen)
    assert text == "The capital of France is"
    assert gen.result.finish_reason == "stop"


def test_extra_stop_token(loaded):
    paris = loaded.tokenizer(" Paris", add_special_tokens=False)["input_ids"]
    gen = Generation(loaded, prompt(loaded), SamplingParams(temperature=0, stop_token_ids=(paris[0],)))
    assert "".join(gen) == "The capital of France is"
    assert gen.result.finish_reason == "eos"


def test_max_new_tokens_gives_length(loaded):
    gen = Generation(loaded, prompt(loaded, "Write a long story about a dragon."), SamplingParams(temperature=0, max_new_tokens=5))
    list(gen)
    assert gen.result.new_tokens == 5 and gen.result.finish_reason == "length"


def test_seed_makes_sampling_reproducible(loaded):
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=24, seed=1234)
    ids = prompt(loaded, "Tell me something about cats.")
    first, second = Generation(loaded, ids, params), Generation(loaded, ids, params)
    assert "".join(first) == "".join(second)
    assert first.result.token_ids == second.result.token_ids
    other = Generation(loaded, ids, SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=24, seed=99))
    list(other)
    assert other.result.token_ids != first.result.token_ids


def test_cancel_stops_the_stream(loaded):
    cancel = threading.Event()
    gen = Generation(loaded, prompt(loaded, "Write a long story about a dragon."), SamplingParams(temperature=0, max_new_tokens=200), cancel)
    pieces = []
    for piece in gen:
        pieces.append(piece)
        cancel.set()
    assert len(pieces) == 1 and gen.result.finish_reason == "cancelled"


def test_kv_prefix_reuse_gives_the_same_tokens_as_a_fresh_cache(loaded):
    params = SamplingParams(temperature=0, max_new_tokens=12)
    first = prompt(loaded, "Name three colors.")
    list(Generation(loaded, first, params))
    follow = first + loaded.tokenizer(" and three animals", add_special_tokens=False)["input_ids"]
    reused = Generation(loaded, follow, params)
    list(reused)
    loaded.engine.forget_prefixes()
    fresh = Generation(loaded, follow, params)
    list(fresh)
    assert reused.result.token_ids == fresh.result.token_ids


def test_prompt_longer_than_context_is_refused(loaded):
    with pytest.raises(ContextOverflowError, match="context length is 256"):
        Generation(loaded, [1] * 300, SamplingParams())


def test_generation_is_capped_by_the_context(loaded):
    ids = prompt(loaded, "Write a long story about a dragon.")
    gen = Generation(loaded, ids, SamplingParams(temperature=0, max_new_tokens=10_000))
    assert gen.max_new == 256 - len(ids)

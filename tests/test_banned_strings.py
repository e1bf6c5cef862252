"""Banned strings on the real SmolLM2 checkpoint: the engine's output equals a plain backtracking search over
uncached forwards, nothing banned is ever streamed, and the sequences beside a rewound one are untouched."""

from __future__ import annotations

import threading

import pytest
import torch

from backends.banned import BannedStrings
from backends.constraints import Grammar
from backends.generation import Generation
from backends.loader import LoadOptions, load_model
from backends.sampling import SamplingParams
from tests.test_engine import chat, run

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def loaded(smollm2_branch):
    model = load_model(smollm2_branch("main"), LoadOptions(backend="reference", device="cpu", context_length=512,
                                                            cache_tokens=2048))
    yield model
    model.engine.close()


def reference_greedy(loaded, prompt: list[int], banned: list[str], new_tokens: int) -> list[int]:
    """Greedy decoding that, whenever the text so far contains a banned string (any case), goes back to the
    token where it starts and forbids that token there; every step is a fresh forward of the whole text."""
    out: list[int] = []
    bans: dict[int, set[int]] = {}
    decode = lambda ids: loaded.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    while len(out) < new_tokens:
        ids = prompt + out
        with torch.no_grad():
            logits = loaded.model(torch.tensor([ids]), torch.arange(len(ids)), cached=False)[0, -1]
        for token in bans.get(len(out), ()):
            logits[token] = float("-inf")
        token = int(logits.argmax())
        out.append(token)
        if token in loaded.args.eos_token_ids or token == loaded.tokenizer.eos_token_id:
            break
        text = decode(out).lower()
        hits = [text.find(b.lower()) for b in banned if b.lower() in text]
        if hits:
            start = min(hits)
            first = next(i for i in range(len(out)) if len(decode(out[: i + 1])) > start)
            bans = {at: s for at, s in bans.items() if at <= first}
            bans.setdefault(first, set()).add(out[first])
            out = out[:first]
    return out


def streamed(generation: Generation) -> tuple[str, list[str]]:
    pieces = list(generation)
    return "".join(pieces), pieces


def test_the_plain_answer_says_paris(loaded):
    result = run(Generation(loaded, chat(loaded, QUESTION), SamplingParams(temperature=0, max_new_tokens=24))).result
    assert "Paris" in result.text


@pytest.mark.parametrize("banned", [["Paris"], ["capital of France is", "PARIS"]])
def test_banned_strings_match_a_backtracking_reference(loaded, banned):
    prompt = chat(loaded, QUESTION)
    params = SamplingParams(temperature=0, max_new_tokens=24, banned_strings=tuple(banned))
    generation = Generation(loaded, prompt, params)
    text, pieces = streamed(generation)
    expected = reference_greedy(loaded, prompt, banned, 24)
    eos = {*loaded.args.eos_token_ids, loaded.tokenizer.eos_token_id}
    assert generation.result.token_ids == [t for t in expected if t not in eos]
    assert all(b.lower() not in text.lower() for b in banned), text
    assert text == generation.result.text and all(pieces)  # streamed text is only ever appended to
    assert generation.result.new_tokens == len(generation.result.token_ids)


def test_a_rewound_sequence_leaves_its_neighbours_untouched(loaded):
    plain = [(chat(loaded, q), SamplingParams(temperature=0, max_new_tokens=20))
             for q in ("Name three colors.", "Write a haiku about the sea.")]
    banned = (chat(loaded, QUESTION), SamplingParams(temperature=0, max_new_tokens=24, banned_strings=("Paris",)))
    requests = plain + [banned]
    loaded.engine.forget_prefixes()
    alone = [run(Generation(loaded, ids, p)).result.token_ids for ids, p in requests]
    together = [Generation(loaded, ids, p) for ids, p in requests]
    threads = [threading.Thread(target=run, args=(g,)) for g in together]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert loaded.engine.most_running >= 2
    assert [g.result.token_ids for g in together] == alone
    assert "paris" not in together[-1].result.text.lower()


def test_a_banned_string_inside_a_grammar_rolls_the_grammar_back(loaded):
    prompt = chat(loaded, QUESTION)
    grammar = Grammar("regex", "(Paris|Lyon|Nice) is the answer\\.")
    params = SamplingParams(temperature=0, max_new_tokens=20)
    free = run(Generation(loaded, prompt, params, grammar=grammar)).result.text
    city = free.split()[0]
    assert free == f"{city} is the answer."
    rewinds = loaded.engine.rewinds
    banned = run(Generation(loaded, prompt, SamplingParams(temperature=0, max_new_tokens=20, banned_strings=(city,)),
                            grammar=grammar)).result.text
    assert loaded.engine.rewinds > rewinds  # the city was written, taken back from the grammar too, and replaced
    assert banned in {f"{c} is the answer." for c in ("Paris", "Lyon", "Nice") if c != city}


def test_tokens_are_held_while_they_could_begin_a_banned_string(loaded):
    tok = loaded.tokenizer
    watch = BannedStrings(tok, ("Paris",), tok.encode("The capital is", add_special_tokens=False))
    pieces = tok.encode(" Par", add_special_tokens=False)
    out = [t for p in pieces for t, _ in watch.push(p).release]
    assert watch.held, "' Par' could still become ' Paris'"
    ade = tok.encode("ade", add_special_tokens=False)[0]
    out += [t for t, _ in watch.push(ade).release]
    assert out == [*pieces, ade] and not watch.held  # ' Parade' is no banned word
    verdicts = [watch.push(t) for t in tok.encode(" paris", add_special_tokens=False)]
    assert not any(v.release for v in verdicts)
    assert verdicts[-1].rewind == len(out) and not watch.held  # back to where ' paris' began

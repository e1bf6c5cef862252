"""Structured output: a grammar that every generated token must keep the text inside, by llguidance.

Why llguidance (over xgrammar): one dependency-free wheel (Rust, abi3) that takes JSON Schema, regular
expressions and Lark grammars alike, computes a token mask in tens of microseconds on the CPU while the
GPU computes the step, and is what llama.cpp, vLLM and SGLang use for the same job.

Each step, before sampling, the sequence's matcher gives the set of tokens that keep the output a prefix
of something the grammar accepts; every other logit becomes -inf. The sampled token is then consumed.
Once the grammar is complete the only token left is the end token.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import torch


class GrammarError(ValueError):
    """The schema, regex or grammar cannot be used; the message says why."""


@dataclass(frozen=True)
class Grammar:
    """What the output must match. ``kind``: "json_schema" (``source`` a JSON Schema as text), "json_object"
    (any JSON object), "regex" or "lark"."""

    kind: str
    source: str = ""

    def spec(self) -> str:
        import llguidance

        # Whitespace between JSON tokens fixed: free whitespace lets a hot sampler wander in it until the
        # token limit (seen at temperature 1.5 on a nested schema).
        compact = {"whitespace_flexible": False}
        if self.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema(json.dumps({"type": "object"}), defaults=compact)
        if self.kind == "json_schema":
            try:
                schema = json.loads(self.source)
            except json.JSONDecodeError as exc:
                raise GrammarError(f"the JSON schema is not valid JSON: {exc}") from exc
            return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=compact)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.source)
        if self.kind == "lark":
            return llguidance.LLMatcher.grammar_from_lark(self.source)
        raise GrammarError(f"unknown grammar kind {self.kind!r}: json_schema, json_object, regex or lark")

    def check(self) -> str:
        """The grammar spec, after llguidance has checked it; GrammarError with its message if it is bad."""
        import llguidance

        spec = self.spec()
        problem = llguidance.LLMatcher.validate_grammar(spec)
        if problem:
            raise GrammarError(f"the {self.kind.replace('_', ' ')} cannot be used: {problem.strip()}")
        return spec


class SentencePieceVocabulary:
    """A ``tokenizer.model``-only tokenizer (backends/tokenizer.py) as llguidance's TokenizerWrapper takes it:
    each id's bytes, the special ids, and a tokenize callback."""

    def __init__(self, tokenizer, vocab_size: int):
        sp = tokenizer.sp_model
        self.sp, self.eos_token_id, self.bos_token_id = sp, tokenizer.eos_token_id, tokenizer.bos_token_id
        added = tokenizer.added_tokens_decoder
        self.tokens, self.special_token_ids = [], []
        for i in range(vocab_size):
            if i in added:  # OpenChat's <|end_of_turn|> and the like
                self.tokens.append(added[i].content.encode())
                self.special_token_ids.append(i)
            elif i >= sp.get_piece_size() or sp.is_control(i) or sp.is_unknown(i):
                self.tokens.append(f"<[{i}]>".encode())
                self.special_token_ids.append(i)
            elif sp.is_byte(i):
                self.tokens.append(bytes([int(sp.id_to_piece(i)[3:5], 16)]))
            else:
                self.tokens.append(sp.id_to_piece(i).replace("\u2581", " ").encode())
        self._newline = len(sp.encode("\n"))

    def __call__(self, text: str | bytes) -> list[int]:
        # Text in the middle of an output: sentencepiece would add its dummy prefix (a space) at the start,
        # so the text is encoded after a newline and the newline's tokens dropped.
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self.sp.encode("\n" + text)[self._newline:]


@functools.lru_cache(maxsize=4)
def tokenizer_info(tokenizer, vocab_size: int):
    """llguidance's view of the tokenizer (about a second to build; cached per tokenizer)."""
    import llguidance
    import llguidance.hf

    if getattr(tokenizer, "is_fast", False):
        return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
    if hasattr(tokenizer, "sp_model"):
        wrapper = llguidance.TokenizerWrapper(SentencePieceVocabulary(tokenizer, vocab_size))
        return llguidance.LLTokenizer(wrapper, n_vocab=vocab_size)
    raise GrammarError(f"structured output cannot read this model's tokenizer ({type(tokenizer).__name__})")


class Constraint:
    """One sequence's matcher: masks logits before each sample, consumes each sampled token."""

    def __init__(self, grammar: Grammar, tokenizer, vocab_size: int):
        import llguidance
        import llguidance.torch

        self._torch = llguidance.torch
        self.matcher = llguidance.LLMatcher(tokenizer_info(tokenizer, vocab_size), grammar.check())
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())
        self.vocab_size = vocab_size
        self.bitmask = self._torch.allocate_token_bitmask(1, vocab_size)

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` ``[vocab]`` with every token the grammar does not allow now at -inf (a copy)."""
        self._torch.fill_next_token_bitmask(self.matcher, self.bitmask, 0)
        masked = logits.clone().view(1, -1)
        self._torch.apply_token_bitmask_inplace(masked, self.bitmask.to(logits.device, non_blocking=True))
        return masked.view(-1)

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise GrammarError(f"token {token} broke the grammar: {self.matcher.get_error()}")

    def rollback(self, count: int) -> None:
        """Forgets the last ``count`` tokens consumed."""
        if not self.matcher.rollback(count):
            raise GrammarError(f"could not take back {count} tokens: {self.matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """The grammar is complete: nothing but the end may follow."""
        return self.matcher.is_stopped()

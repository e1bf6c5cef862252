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


@functools.lru_cache(maxsize=4)
def _tokenizer_info(tokenizer, vocab_size: int):
    import llguidance.hf

    return llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)


def tokenizer_info(tokenizer, vocab_size: int):
    """llguidance's view of the tokenizer (about a second to build; cached per tokenizer)."""
    if not getattr(tokenizer, "is_fast", False):
        raise GrammarError("structured output needs the model's tokenizer.json (a fast tokenizer); this model has "
                           "only tokenizer.model")
    return _tokenizer_info(tokenizer, vocab_size)


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

    @property
    def finished(self) -> bool:
        """The grammar is complete: nothing but the end may follow."""
        return self.matcher.is_stopped()

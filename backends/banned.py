"""Banned strings: text a sequence must never write, however the tokenizer would spell it.

A banned word can come out as one token or as several, so a logit bias cannot ban it. Instead each new
token's text is watched: tokens that could still be the start of a banned string are held back (not yet
streamed); when a banned string appears, the sequence is rewound to the token where it began, that token
is banned at that position, and sampling goes on from there (exllamav2's dynamic generator works this
way). Matching ignores case, as there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CONTEXT_TOKENS = 4  # tokens decoded before the held ones, so a SentencePiece "▁word" keeps its space


@dataclass
class Verdict:
    release: list[tuple[int, object]] = field(default_factory=list)  # (token, logprob) safe to stream now
    rewind: int | None = None  # a banned string began in the token at this index of the generated tokens
    banned: int | None = None  # that token, which may not be sampled there again


def fold(text: str) -> str:
    """Lower case, one character for one, so offsets in the folded text are offsets in the text."""
    return "".join(c if len(low := c.lower()) != 1 else low for c in text)


class BannedStrings:
    """One sequence's watch. ``push`` each new token (never an end token); ``flush`` when it ends."""

    def __init__(self, tokenizer, strings: tuple[str, ...], context: list[int]):
        self.strings = tuple(fold(s) for s in strings if s)
        if not self.strings:
            raise ValueError("no banned strings given")
        self.tokenizer = tokenizer
        self.context = list(context[-CONTEXT_TOKENS:])
        self.held: list[tuple[int, object]] = []
        self.start = 0  # the index, among the generated tokens, of the first held one

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _held_text(self) -> tuple[str, list[int]]:
        """The held tokens' text and where each token's text ends in it."""
        base = self._decode(self.context)
        ends, text = [], ""
        ids = list(self.context)
        for token, _ in self.held:
            ids.append(token)
            full = self._decode(ids)
            text = full[len(base):] if full.startswith(base) else full
            ends.append(len(text))
        return text, ends

    def push(self, token: int, logprob: object = None) -> Verdict:
        self.held.append((token, logprob))
        text, ends = self._held_text()
        folded = fold(text)
        found = [at for at in (folded.find(s) for s in self.strings) if at != -1]
        if found:
            at = min(found)
            first = next(i for i, end in enumerate(ends) if end > at)
            banned = self.held[first][0]
            del self.held[first:]
            return Verdict(rewind=self.start + first, banned=banned)
        safe = len(text) - self._partial_length(folded)
        if text.endswith("\ufffd"):  # a character still incomplete: its bytes could begin a banned string
            safe = min(safe, len(text) - 1)
        count = 0
        while count < len(self.held) and ends[count] <= safe:
            count += 1
        return Verdict(release=self._release(count))

    def flush(self) -> list[tuple[int, object]]:
        return self._release(len(self.held))

    def _release(self, count: int) -> list[tuple[int, object]]:
        out, self.held = self.held[:count], self.held[count:]
        self.context = (self.context + [token for token, _ in out])[-CONTEXT_TOKENS:]
        self.start += count
        return out

    def _partial_length(self, folded: str) -> int:
        """The longest end of ``folded`` that a banned string starts with."""
        best = 0
        for s in self.strings:
            for n in range(min(len(s) - 1, len(folded)), best, -1):
                if folded.endswith(s[:n]):
                    best = n
                    break
        return best

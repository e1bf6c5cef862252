"""Sampling settings and the logits transformations they describe.

Each transformation matches its Hugging Face transformers counterpart, so a
preset means the same here as in any other tool.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 512
    temperature: float = 0.7  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 disables
    min_p: float = 0.0
    typical_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from each token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per time a token was generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit); -100 bans it
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        checks = (
            ("max_new_tokens", self.max_new_tokens >= 1, "must be at least 1"),
            ("temperature", self.temperature >= 0, "must be 0 (greedy) or more"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be 0 (off) or more"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("typical_p", 0 < self.typical_p <= 1, "must be in (0, 1]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be above 0"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("logit_bias", all(-100 <= b <= 100 for _, b in self.logit_bias), "biases must be in [-100, 100]"),
        )
        for name, ok, message in checks:
            if not ok:
                raise ValueError(f"sampling parameter '{name}' {message} (got {getattr(self, name)!r})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_history(self) -> bool:
        """Whether sampling looks at the tokens so far (penalties), beyond the logits."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def plain_greedy(self) -> bool:
        """The argmax of the logits as they are."""
        return self.greedy and not self.needs_history and not self.logit_bias

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "preset") -> "SamplingParams":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ValueError(f"{source}: unknown sampling parameter(s): {', '.join(unknown)}")
        values = dict(raw)
        for key in ("stop_strings", "stop_token_ids"):
            if key in values and values[key] is not None:
                values[key] = tuple(values[key])
        if isinstance(values.get("logit_bias"), dict):
            values["logit_bias"] = tuple((int(k), float(v)) for k, v in values["logit_bias"].items())
        elif values.get("logit_bias") is not None:
            values["logit_bias"] = tuple((int(k), float(v)) for k, v in values["logit_bias"])
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{source}: {exc}") from exc


def apply_repetition_penalty(logits: torch.Tensor, previous: torch.Tensor, penalty: float) -> torch.Tensor:
    if penalty == 1.0 or previous.numel() == 0:
        return logits
    score = logits.gather(-1, previous)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(-1, previous, score)


def apply_presence_frequency(logits: torch.Tensor, generated: torch.Tensor, presence: float,
                             frequency: float) -> torch.Tensor:
    """OpenAI's penalties: ``logits[j] - frequency * count[j] - presence * (count[j] > 0)`` over the tokens
    generated so far (not the prompt)."""
    if (presence == 0 and frequency == 0) or generated.numel() == 0:
        return logits
    counts = torch.bincount(generated.view(-1), minlength=logits.shape[-1])[: logits.shape[-1]].to(logits.dtype)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def apply_logit_bias(logits: torch.Tensor, bias: tuple[tuple[int, float], ...]) -> torch.Tensor:
    if not bias:
        return logits
    ids = torch.tensor([i for i, _ in bias], device=logits.device)
    values = torch.tensor([b for _, b in bias], dtype=logits.dtype, device=logits.device)
    return logits.index_add(-1, ids, values.expand(*logits.shape[:-1], -1))


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    threshold = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < threshold, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, descending=False, dim=-1)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1:] = False  # keep at least one token
    return logits.masked_fill(remove.scatter(-1, sorted_idx, remove), float("-inf"))


def apply_typical_p(logits: torch.Tensor, mass: float) -> torch.Tensor:
    if mass >= 1.0:
        return logits
    log_probs = torch.log_softmax(logits, dim=-1)
    probs = log_probs.exp()
    entropy = -(log_probs * probs).nansum(-1, keepdim=True)
    shifted = (-log_probs - entropy).abs()
    sorted_scores, sorted_idx = torch.sort(shifted, descending=False)
    cumulative = logits.gather(-1, sorted_idx).softmax(dim=-1).cumsum(dim=-1)
    last = (cumulative < mass).sum(dim=-1).clamp(max=logits.shape[-1] - 1)
    remove = sorted_scores > sorted_scores.gather(-1, last.view(-1, 1))
    remove[..., :1] = False
    return logits.masked_fill(remove.scatter(-1, sorted_idx, remove), float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    if min_p <= 0:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def sample_token(
    logits: torch.Tensor, previous: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
    prompt_length: int = 0,
) -> torch.Tensor:
    """The next token ``[1]`` (on the logits' device, nothing waits for it) from fp32 ``logits`` ``[vocab]``
    given the ids so far (``previous``, of which the first ``prompt_length`` are the prompt)."""
    logits = apply_logit_bias(logits.view(1, -1), params.logit_bias)
    logits = apply_repetition_penalty(logits, previous.view(1, -1), params.repetition_penalty)
    logits = apply_presence_frequency(logits, previous[prompt_length:], params.presence_penalty,
                                      params.frequency_penalty)
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    logits = logits / params.temperature
    logits = apply_top_k(logits, params.top_k)
    logits = apply_top_p(logits, params.top_p)
    logits = apply_typical_p(logits, params.typical_p)
    logits = apply_min_p(logits, params.min_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).view(1)

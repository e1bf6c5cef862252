"""Sampling settings and the logits transformations they describe.

Each transformation matches its Hugging Face transformers counterpart, so a
preset means the same here as in any other tool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch


SAMPLERS = ("temperature", "top_k", "top_p", "typical_p", "min_p", "xtc")


@dataclass
class SamplerState:
    """What one sequence's sampling carries from token to token: mirostat's mu (None until the first
    token), and DRY's sequence breakers as token ids (resolved by whoever holds the tokenizer)."""

    mu: float | None = None
    breakers: frozenset[int] = frozenset()


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
    # DRY (p-e-w): a token that would extend a repeat of at least allowed_length tokens loses
    # multiplier * base ** (length - allowed_length); a sequence breaker ends the repeat.
    dry_multiplier: float = 0.0  # 0 disables
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_sequence_breakers: tuple[str, ...] = ("\n", ":", "\"", "*")
    # XTC (exclude top choices): with probability xtc_probability, every token at or above xtc_threshold but
    # the least likely of them is removed.
    xtc_threshold: float = 0.1
    xtc_probability: float = 0.0  # 0 disables
    # Mirostat v2: truncates to the tokens whose surprise is under mu, steering the surprise towards tau.
    mirostat_tau: float = 0.0  # 0 disables; it then replaces top_k/top_p/typical_p/min_p
    mirostat_eta: float = 0.1
    # Dynamic temperature: temperature ± range, by the distribution's normalised entropy ** exponent.
    dynatemp_range: float = 0.0  # 0 disables
    dynatemp_exponent: float = 1.0
    sampler_order: tuple[str, ...] = ("temperature", "top_k", "top_p", "typical_p", "min_p", "xtc")
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    # Text the reply may never contain (case ignored), however it is spelt in tokens: backends/banned.py.
    banned_strings: tuple[str, ...] = ()
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
            ("dry_multiplier", self.dry_multiplier >= 0, "must be 0 (off) or more"),
            ("dry_base", self.dry_base >= 1, "must be at least 1"),
            ("dry_allowed_length", self.dry_allowed_length >= 1, "must be at least 1"),
            ("xtc_threshold", 0 <= self.xtc_threshold <= 0.5, "must be in [0, 0.5]"),
            ("xtc_probability", 0 <= self.xtc_probability <= 1, "must be in [0, 1]"),
            ("mirostat_tau", self.mirostat_tau >= 0, "must be 0 (off) or more"),
            ("mirostat_eta", 0 < self.mirostat_eta <= 1, "must be in (0, 1]"),
            ("dynatemp_range", self.dynatemp_range >= 0, "must be 0 (off) or more"),
            ("dynatemp_exponent", self.dynatemp_exponent > 0, "must be above 0"),
            ("sampler_order", sorted(self.sampler_order) == sorted(SAMPLERS),
             f"must name each of {', '.join(SAMPLERS)} once"),
        )
        for name, ok, message in checks:
            if not ok:
                raise ValueError(f"sampling parameter '{name}' {message} (got {getattr(self, name)!r})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_history(self) -> bool:
        """Whether sampling looks at the tokens so far (penalties, DRY), beyond the logits."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.dry_multiplier > 0)

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
        for key in ("stop_strings", "stop_token_ids", "dry_sequence_breakers", "sampler_order", "banned_strings"):
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


def dry_penalties(previous: list[int], multiplier: float, base: float, allowed_length: int,
                  breakers: frozenset[int]) -> dict[int, float]:
    """DRY: for each token that would continue a repeat of the text's end, the penalty to subtract."""
    n = len(previous)
    if multiplier <= 0 or n < 2 or previous[-1] in breakers:
        return {}
    last = previous[-1]
    longest: dict[int, int] = {}
    for j in range(n - 2, -1, -1):
        if previous[j] != last:
            continue
        follower = previous[j + 1]
        if follower in breakers:
            continue
        length = 1  # previous[j] == previous[n - 1]; extend backwards while the two runs agree
        while (j - length >= 0 and previous[j - length] == previous[n - 1 - length]
               and previous[n - 1 - length] not in breakers):
            length += 1
        longest[follower] = max(longest.get(follower, 0), length)
    return {t: multiplier * base ** (length - allowed_length) for t, length in longest.items()
            if length >= allowed_length}


def apply_dry(logits: torch.Tensor, previous: torch.Tensor, params: "SamplingParams",
              breakers: frozenset[int]) -> torch.Tensor:
    penalties = dry_penalties(previous.view(-1).tolist(), params.dry_multiplier, params.dry_base,
                              params.dry_allowed_length, breakers)
    if not penalties:
        return logits
    ids = torch.tensor(list(penalties), device=logits.device)
    values = torch.tensor(list(penalties.values()), dtype=logits.dtype, device=logits.device)
    return logits.index_add(-1, ids, -values.expand(*logits.shape[:-1], -1))


def apply_xtc(logits: torch.Tensor, threshold: float, probability: float,
              generator: torch.Generator | None) -> torch.Tensor:
    """XTC: with ``probability``, the tokens at or above ``threshold`` go, but for the least likely of them."""
    if probability <= 0:
        return logits
    draw = torch.rand(1, generator=generator, device=logits.device if generator is None else generator.device)
    if float(draw) >= probability:
        return logits
    probs = logits.softmax(dim=-1)
    above = probs >= threshold
    if int(above.sum()) < 2:
        return logits
    keep = probs.masked_fill(~above, float("inf")).argmin(dim=-1, keepdim=True)  # the least likely above
    remove = above.scatter(-1, keep, False)
    return logits.masked_fill(remove, float("-inf"))


def dynamic_temperature(logits: torch.Tensor, temperature: float, spread: float, exponent: float) -> float:
    """llama.cpp's entropy-based temperature: from temperature - spread (a sure distribution) to
    temperature + spread (a flat one)."""
    probs = logits.softmax(dim=-1)
    entropy = float(-(probs * torch.log(probs.clamp_min(1e-30))).sum())
    candidates = int((probs > 0).sum())
    if candidates <= 1:
        return max(temperature - spread, 0.0) or 1e-6
    normalised = entropy / math.log(candidates)
    low, high = max(temperature - spread, 0.0), temperature + spread
    return max(low + (high - low) * normalised ** exponent, 1e-6)


def mirostat_v2(logits: torch.Tensor, tau: float, eta: float, state: SamplerState,
                generator: torch.Generator | None) -> torch.Tensor:
    """Mirostat 2.0: sample among the tokens whose surprise (-log2 p) is under mu, then move mu by
    eta * (tau - observed surprise)."""
    if state.mu is None:
        state.mu = 2 * tau
    log2p = torch.log2(logits.softmax(dim=-1).clamp_min(1e-30)).view(-1)
    allowed = -log2p <= state.mu
    if not bool(allowed.any()):
        allowed = log2p == log2p.max()
    truncated = logits.view(-1).masked_fill(~allowed, float("-inf"))
    token = torch.multinomial(truncated.softmax(dim=-1), 1, generator=generator)
    state.mu -= eta * (float(-log2p[token]) - tau)
    return token.view(1)


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
    prompt_length: int = 0, state: SamplerState | None = None,
) -> torch.Tensor:
    """The next token ``[1]`` (on the logits' device) from fp32 ``logits`` ``[vocab]`` given the ids so far
    (``previous``, of which the first ``prompt_length`` are the prompt). Penalties come first; then the
    samplers in ``params.sampler_order``, or mirostat in place of the truncating ones. A sampler that draws
    (XTC, mirostat) reads its sequence's generator, so a seed repeats the whole run."""
    state = state if state is not None else SamplerState()
    logits = apply_logit_bias(logits.view(1, -1), params.logit_bias)
    logits = apply_repetition_penalty(logits, previous.view(1, -1), params.repetition_penalty)
    logits = apply_presence_frequency(logits, previous[prompt_length:], params.presence_penalty,
                                      params.frequency_penalty)
    logits = apply_dry(logits, previous, params, state.breakers)
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    mirostat = params.mirostat_tau > 0
    for name in params.sampler_order:
        if name == "temperature":
            temperature = params.temperature
            if params.dynatemp_range > 0:
                temperature = dynamic_temperature(logits, temperature, params.dynatemp_range,
                                                  params.dynatemp_exponent)
            logits = logits / temperature
        elif name == "xtc":
            logits = apply_xtc(logits, params.xtc_threshold, params.xtc_probability, generator)
        elif not mirostat:
            logits = TRUNCATIONS[name](logits, getattr(params, name))
    if mirostat:
        return mirostat_v2(logits, params.mirostat_tau, params.mirostat_eta, state, generator)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).view(1)


TRUNCATIONS = {"top_k": apply_top_k, "top_p": apply_top_p, "typical_p": apply_typical_p, "min_p": apply_min_p}

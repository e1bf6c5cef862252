"""Sampling transformations against transformers' logits processors and reference functions."""

import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from backends.sampling import (
    SamplerState,
    SamplingParams,
    apply_xtc,
    dry_penalties,
    dynamic_temperature,
    apply_min_p,
    apply_presence_frequency,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    apply_typical_p,
    sample_token,
)


def logits(seed: int) -> torch.Tensor:
    return torch.randn(1, 500, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("seed", range(5))
def test_warpers_match_transformers(seed):
    x = logits(seed)
    ids = torch.randint(0, 500, (1, 40), generator=torch.Generator().manual_seed(seed))
    pairs = [
        (apply_repetition_penalty(x, ids, 1.3), RepetitionPenaltyLogitsProcessor(1.3)(ids, x.clone())),
        (apply_top_k(x, 20), TopKLogitsWarper(20)(ids, x.clone())),
        (apply_top_p(x, 0.8), TopPLogitsWarper(0.8)(ids, x.clone())),
        (apply_typical_p(x, 0.7), TypicalLogitsWarper(0.7)(ids, x.clone())),
        (apply_min_p(x, 0.1), MinPLogitsWarper(0.1)(ids, x.clone())),
    ]
    for ours, theirs in pairs:
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
        torch.testing.assert_close(ours[~torch.isinf(ours)], theirs[~torch.isinf(theirs)])


def test_filters_actually_remove_tokens():
    x = logits(9)
    assert torch.isinf(apply_top_p(x, 0.5)).sum() > 400
    assert int((~torch.isinf(apply_top_k(x, 7))).sum()) == 7


def test_greedy_takes_the_argmax_after_the_penalty():
    x = torch.tensor([1.0, 5.0, 4.9, -2.0])
    assert int(sample_token(x, torch.tensor([], dtype=torch.long), SamplingParams(temperature=0), None)) == 1
    assert int(sample_token(x, torch.tensor([1]), SamplingParams(temperature=0, repetition_penalty=1.5), None)) == 2


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    x = torch.log(torch.tensor([0.7, 0.2, 0.1]))
    params = SamplingParams(temperature=1.0)
    draws = [int(sample_token(x, torch.tensor([], dtype=torch.long), params, torch.Generator().manual_seed(s))) for s in range(600)]
    again = [int(sample_token(x, torch.tensor([], dtype=torch.long), params, torch.Generator().manual_seed(s))) for s in range(600)]
    assert draws == again
    share = draws.count(0) / len(draws)
    assert 0.6 < share < 0.8


@pytest.mark.parametrize(
    "kwargs, field",
    [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_new_tokens": 0}, "max_new_tokens"),
     ({"min_p": 2}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty")],
)
def test_invalid_parameters_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"'{field}'"):
        SamplingParams(**kwargs)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="my.yaml: unknown sampling parameter\\(s\\): tempreature"):
        SamplingParams.from_dict({"tempreature": 0.5}, "my.yaml")
    assert SamplingParams.from_dict({"stop_strings": ["a"]}).stop_strings == ("a",)


def openai_penalties(logits: list[float], generated: list[int], presence: float, frequency: float) -> list[float]:
    """The formula of OpenAI's API reference, written out per token."""
    return [x - frequency * generated.count(j) - presence * (generated.count(j) > 0) for j, x in enumerate(logits)]


@pytest.mark.parametrize("presence, frequency", [(0.5, 0.0), (0.0, 0.7), (1.2, -0.4)])
def test_presence_and_frequency_penalties_follow_the_openai_formula(presence, frequency):
    x = logits(3)[0]
    generated = [4, 9, 4, 4, 17, 9]
    ours = apply_presence_frequency(x.view(1, -1), torch.tensor(generated), presence, frequency)[0]
    torch.testing.assert_close(ours, torch.tensor(openai_penalties(x.tolist(), generated, presence, frequency)))


def test_penalties_look_at_generated_tokens_only():
    x = torch.tensor([3.0, 2.9, 0.0])
    params = SamplingParams(temperature=0, presence_penalty=1.0)
    assert int(sample_token(x, torch.tensor([0]), params, None, prompt_length=1)) == 0  # token 0 is in the prompt
    assert int(sample_token(x, torch.tensor([0]), params, None, prompt_length=0)) == 1  # generated: penalised


def test_logit_bias_bans_and_forces_tokens():
    x = torch.tensor([5.0, 4.0, 1.0])
    assert int(sample_token(x, torch.tensor([], dtype=torch.long), SamplingParams(temperature=0, logit_bias=((0, -100.0),)), None)) == 1
    assert int(sample_token(x, torch.tensor([], dtype=torch.long), SamplingParams(temperature=0, logit_bias=((2, 10.0),)), None)) == 2
    draws = {int(sample_token(x, torch.tensor([], dtype=torch.long), SamplingParams(temperature=1.0, logit_bias=((0, -100.0), (1, -100.0))), torch.Generator().manual_seed(s))) for s in range(50)}
    assert draws == {2}


def test_penalty_ranges_are_checked():
    with pytest.raises(ValueError, match="presence_penalty"):
        SamplingParams(presence_penalty=3)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias=((1, -200.0),))
    assert SamplingParams.from_dict({"logit_bias": {"5": -100}}).logit_bias == ((5, -100.0),)


# ---- DRY, XTC, mirostat v2, dynamic temperature, sampler order: each against a plain function written from
# the description its authors give (p-e-w's DRY pull request to text-generation-webui, XTC's, the Mirostat
# paper's Algorithm 2 and llama.cpp's dynatemp).

def reference_dry(context: list[int], multiplier: float, base: float, allowed: int, breakers: set[int]) -> dict:
    """For each candidate next token: the longest n such that context[-n:] + [token] already occurred."""
    if not context or context[-1] in breakers:
        return {}
    penalties = {}
    for token in set(context):
        if token in breakers:
            continue
        best = 0
        for n in range(1, len(context)):
            tail = context[-n:]
            if any(t in breakers for t in tail):
                break
            window = tail + [token]
            if any(context[i:i + n + 1] == window for i in range(len(context) - n)):
                best = n
        if best >= allowed:
            penalties[token] = multiplier * base ** (best - allowed)
    return penalties


@pytest.mark.parametrize("seed", range(6))
def test_dry_matches_the_reference(seed):
    g = torch.Generator().manual_seed(seed)
    context = torch.randint(0, 6, (60,), generator=g).tolist() + [1, 2, 3, 4, 5, 1, 2, 3]
    breakers = {0} if seed % 2 else set()
    ours = dry_penalties(context, 0.8, 1.75, 2, frozenset(breakers))
    expected = reference_dry(context, 0.8, 1.75, 2, breakers)
    assert ours.keys() == expected.keys() and all(abs(ours[t] - expected[t]) < 1e-9 for t in ours)
    if not breakers:
        assert ours.get(4, 0) >= 0.8 * 1.75 ** (3 - 2), "'1 2 3' was followed by 4 before"


def test_dry_steers_greedy_off_a_repeat():
    x = torch.zeros(10)
    x[4] = 1.0
    previous = torch.tensor([1, 2, 3, 4, 1, 2, 3])
    params = SamplingParams(temperature=0, dry_multiplier=2.0, dry_sequence_breakers=())
    assert int(sample_token(x, previous, params, None)) != 4
    assert int(sample_token(x, previous, SamplingParams(temperature=0), None)) == 4


def reference_xtc(probs: list[float], threshold: float) -> list[bool]:
    """Which tokens XTC removes once it fires: all at or above the threshold but the least likely of them."""
    above = [i for i, p in enumerate(probs) if p >= threshold]
    if len(above) < 2:
        return [False] * len(probs)
    keep = min(above, key=lambda i: probs[i])
    return [i in above and i != keep for i in range(len(probs))]


@pytest.mark.parametrize("seed", range(4))
def test_xtc_matches_the_reference(seed):
    x = logits(seed)
    out = apply_xtc(x, 0.02, 1.0, torch.Generator().manual_seed(seed))
    expected = reference_xtc(x.softmax(-1)[0].tolist(), 0.02)
    assert torch.isinf(out[0]).tolist() == expected and any(expected)
    assert torch.equal(apply_xtc(x, 0.02, 0.0, None), x), "probability 0 never fires"


def test_mirostat_v2_follows_the_paper():
    """Algorithm 2 of the Mirostat paper, step by step on the same draws."""
    x = logits(7)[0]
    params = SamplingParams(temperature=1.0, mirostat_tau=3.0, mirostat_eta=0.2)
    state, mu = SamplerState(), 6.0
    ours_g, ref_g = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(20):
        token = int(sample_token(x, torch.tensor([], dtype=torch.long), params, ours_g, state=state))
        probs = x.softmax(-1)
        surprise = -torch.log2(probs)
        allowed = surprise <= mu
        truncated = torch.where(allowed, probs, torch.zeros_like(probs))
        expected = int(torch.multinomial(truncated / truncated.sum(), 1, generator=ref_g))
        assert token == expected
        mu -= 0.2 * (float(surprise[expected]) - 3.0)
        assert abs(state.mu - mu) < 1e-4


def test_dynamic_temperature_follows_entropy():
    flat, sharp = torch.zeros(1, 100), torch.tensor([[10.0] + [0.0] * 99])
    assert dynamic_temperature(flat, 1.0, 0.5, 1.0) == pytest.approx(1.5)
    h = float(-(sharp.softmax(-1) * sharp.log_softmax(-1)).sum()) / math.log(100)
    assert dynamic_temperature(sharp, 1.0, 0.5, 2.0) == pytest.approx(0.5 + 1.0 * h ** 2)


def test_sampler_order_changes_what_is_kept():
    """min_p after a high temperature keeps more than before it."""
    x = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    kept = {}
    for order in (("temperature", "min_p", "top_k", "top_p", "typical_p", "xtc"),
                  ("min_p", "temperature", "top_k", "top_p", "typical_p", "xtc")):
        params = SamplingParams(temperature=3.0, min_p=0.3, sampler_order=order)
        kept[order[0]] = {int(sample_token(x, torch.tensor([], dtype=torch.long), params,
                                           torch.Generator().manual_seed(s))) for s in range(300)}
    assert kept["min_p"] < kept["temperature"]
    with pytest.raises(ValueError, match="sampler_order"):
        SamplingParams(sampler_order=("temperature",))

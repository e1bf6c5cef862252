"""Sampling transformations against transformers' logits processors."""

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
    SamplingParams,
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

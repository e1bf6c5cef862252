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

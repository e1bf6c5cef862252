"""End to end on real GPTQ checkpoints of SmolLM2-135M-Instruct, on the CPU."""

import pytest
import torch

from backends.generation import Generation
from backends.loader import LoadOptions, load_model
from backends.perplexity import perplexity
from tests.fixture_models import BRANCHES, DATA
from tests.gptq_testing import hf_twin


@pytest.fixture(scope="module")
def main_model(smollm2_branch):
    return load_model(smollm2_branch("main"), LoadOptions(device="cpu"))


@pytest.fixture(scope="module")
def base_perplexity(smollm2_base):
    return perplexity(load_model(smollm2_base, LoadOptions(device="cpu")), (DATA / "eval.txt").read_text())


def chat_ids(loaded, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    return loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]


def test_greedy_chat_answers_paris(main_model):
    from backends.sampling import SamplingParams

    assert main_model.backend == "cpu"  # what a CPU-only machine loads by default
    gen = Generation(main_model, chat_ids(main_model, "What is the capital of France?"), SamplingParams(temperature=0, max_new_tokens=40))
    pieces = list(gen)
    assert "Paris" in "".join(pieces)
    assert len(pieces) > 3  # streamed, not one block
    assert gen.result.finish_reason == "eos"


# Measured on tests/data/eval.txt (benchmarks/perplexity.py): 8-bit is lossless; 4-bit loses more on
# this 135M model than the 10% (RTN at g128 loses as much as GPTQ), so these bounds guard
# against regressions. 4-bit g32 asym act-order swings with rounding-level differences in the
# quantizer's arithmetic: +5.9% (fp32 GPTQ on the machine of 2026-11-22), +13.6% (fp32 GPTQ on an
# AMD EPYC), +18.6% (float64 GPTQ, as now, the same on every CPU).
MAX_PERPLEXITY_RATIO = {
    "main": 1.60,
    "gptq-4bit-32g-actorder_True": 1.25,
    "gptq-8bit-128g-actorder_False": 1.01,
    "gptq-4bit--1g-actorder_True": 1.50,
}


@pytest.mark.parametrize("branch", BRANCHES)
def test_branch_perplexity_stays_close_to_fp32(smollm2_branch, base_perplexity, branch):
    loaded = load_model(smollm2_branch(branch), LoadOptions(device="cpu"))
    expected = BRANCHES[branch].qconfig
    assert (loaded.qconfig.bits, loaded.qconfig.group_size, loaded.qconfig.desc_act) == (
        expected.bits, expected.group_size, expected.desc_act)
    ppl = perplexity(loaded, (DATA / "eval.txt").read_text())
    assert ppl < MAX_PERPLEXITY_RATIO[branch] * base_perplexity, (branch, ppl, base_perplexity)


@pytest.mark.parametrize("branch", ["main", "gptq-4bit-32g-actorder_True"])
def test_real_checkpoint_logits_match_transformers(smollm2_branch, branch):
    path = smollm2_branch(branch)
    loaded = load_model(path, LoadOptions(device="cpu", backend="reference"))  # the fp32 oracle
    ids = loaded.tokenizer("The quick brown fox jumps over the lazy dog because", return_tensors="pt")["input_ids"]
    qc = loaded.qconfig
    with torch.no_grad():
        ours = loaded.model(ids, torch.arange(ids.shape[1]), cached=False)
        theirs = hf_twin(path, qc.bits, qc.zero_offset)(ids).logits
    assert float((ours - theirs).abs().max() / theirs.abs().max()) < 1e-3

"""The own model against Hugging Face transformers on the same dequantized weights."""

import pytest
import torch

from backends.loader import LoadOptions, build_model
from backends.model_config import ModelArgs, RopeScaling
from tests.gptq_testing import hf_twin, tiny_config, write_random_checkpoint


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def own_logits(path, tokens: torch.Tensor) -> torch.Tensor:
    model, *_ = build_model(path, LoadOptions(backend="reference", device="cpu", dtype="float32"))
    model.setup_cache(batch=tokens.shape[0], max_seq_len=128)
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1]))


CASES = {
    "llama-gqa-4bit-g32-actorder": (tiny_config("llama"), dict(bits=4, group_size=32, act_order=True)),
    "llama-8bit-g64": (tiny_config("llama"), dict(bits=8, group_size=64, act_order=False)),
    "llama-4bit-nogroup-asym": (tiny_config("llama"), dict(bits=4, group_size=-1, act_order=True, sym=False)),
    "llama-rope-linear": (
        tiny_config("llama", rope_scaling={"type": "linear", "factor": 2.0}),
        dict(bits=4, group_size=128, act_order=False),
    ),
    "llama-rope-dynamic": (
        tiny_config("llama", max_position_embeddings=16, rope_scaling={"type": "dynamic", "factor": 2.0}),
        dict(bits=4, group_size=32, act_order=False),
    ),
    "llama3-rope": (
        tiny_config(
            "llama",
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
            },
        ),
        dict(bits=4, group_size=32, act_order=True),
    ),
    "mistral-sliding-window": (
        tiny_config("mistral", sliding_window=8, num_key_value_heads=1),
        dict(bits=4, group_size=32, act_order=True),
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_prefill_logits_match_transformers(tmp_path, case):
    config, quant = CASES[case]
    path = write_random_checkpoint(tmp_path / case, config, **quant)
    tokens = torch.randint(0, config["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_twin(path, quant["bits"])(tokens).logits
    assert relative_error(own_logits(path, tokens), expected) < 1e-3


def test_incremental_decode_matches_full_forward(tmp_path):
    config = tiny_config("mistral", sliding_window=8)
    path = write_random_checkpoint(tmp_path / "m", config)
    model, *_ = build_model(path, LoadOptions(backend="reference", device="cpu"))
    model.setup_cache(batch=1, max_seq_len=64)
    tokens = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens, torch.arange(30))
        model(tokens[:, :17], torch.arange(17))
        steps = [model(tokens[:, p : p + 1], torch.tensor([p])) for p in range(17, 30)]
    assert relative_error(torch.cat(steps, dim=1), full[:, 17:]) < 1e-4


def test_quantization_config_in_config_json(tmp_path):
    config = tiny_config("llama")
    path = write_random_checkpoint(tmp_path / "c", config, bits=8, group_size=32, quantize_config=False)
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf_twin(path, 8)(tokens).logits
    assert relative_error(own_logits(path, tokens), expected) < 1e-3


def test_position_past_context_is_refused(tmp_path):
    path = write_random_checkpoint(tmp_path / "m", tiny_config("llama"))
    model, *_ = build_model(path, LoadOptions(backend="reference", device="cpu"))
    model.setup_cache(batch=1, max_seq_len=8)
    with pytest.raises(ValueError, match="context length 8"):
        model(torch.zeros(1, 9, dtype=torch.long), torch.arange(9))


@pytest.mark.parametrize("scaling", [None, RopeScaling("linear", 2.0),
                                     RopeScaling("llama3", 8.0, original_max_position=64),
                                     RopeScaling("dynamic", 2.0)])
def test_rotary_table_rows_are_the_per_position_values(scaling):
    """Rotary.table (made once per cache, read by the decode attention kernel): row p is exactly forward(p);
    none where the frequencies depend on the sequence length (dynamic scaling)."""
    from backends.model import Rotary

    args = ModelArgs("LlamaForCausalLM", 256, 64, 128, 2, 4, 2, 16, rope_scaling=scaling,
                     max_position_embeddings=128)
    rotary = Rotary(args)
    table = rotary.table(300, torch.device("cpu"))
    if scaling is not None and scaling.kind == "dynamic":
        assert table is None
        return
    cos, sin = table
    assert cos.shape == sin.shape == (300, 16)
    for p in (0, 1, 77, 299):
        c, s = rotary(torch.tensor([p]))
        torch.testing.assert_close(cos[p : p + 1], c, rtol=0, atol=0)
        torch.testing.assert_close(sin[p : p + 1], s, rtol=0, atol=0)

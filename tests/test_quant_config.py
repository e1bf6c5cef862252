import json

import pytest

from backends.quant_config import QuantConfig, QuantConfigError, load_quant_config, parse_quant_config


def write(tmp_path, name, data):
    (tmp_path / name).write_text(data if isinstance(data, str) else json.dumps(data))


def test_quantize_config_json_is_read(tmp_path):
    write(tmp_path, "quantize_config.json", {
        "bits": 4, "group_size": 32, "damp_percent": 0.1, "desc_act": True, "sym": True,
        "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model",
    })
    q = load_quant_config(tmp_path)
    assert q == QuantConfig(bits=4, group_size=32, desc_act=True, sym=True, model_file_base_name="model",
                            damp_percent=0.1, source="quantize_config.json")
    assert q.zero_offset == 1 and q.pack_factor == 8


def test_config_json_quantization_config_is_read(tmp_path):
    write(tmp_path, "config.json", {"model_type": "llama", "quantization_config": {
        "quant_method": "gptq", "bits": 8, "group_size": -1, "desc_act": False, "sym": False,
        "checkpoint_format": "gptq_v2"}})
    q = load_quant_config(tmp_path)
    assert (q.bits, q.group_size, q.sym, q.zero_offset) == (8, -1, False, 0)
    assert q.group_count(4096) == 1 and q.effective_group_size(4096) == 4096


def test_quantize_config_wins_over_config_json(tmp_path):
    write(tmp_path, "config.json", {"quantization_config": {"quant_method": "gptq", "bits": 8}})
    write(tmp_path, "quantize_config.json", {"bits": 4, "group_size": 128})
    assert load_quant_config(tmp_path).bits == 4


def test_unquantized_model_has_no_config(tmp_path):
    write(tmp_path, "config.json", {"model_type": "llama"})
    assert load_quant_config(tmp_path) is None


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"bits": 3, "group_size": 128}, "quantize_config.json: field 'bits' is 3; supported: 4, 8"),
        ({"bits": 4, "group_size": 100}, "field 'group_size' is 100"),
        ({"group_size": 128}, "field 'bits' is missing"),
        ({"bits": "4"}, "field 'bits' must be an integer"),
        ({"bits": 4, "desc_act": "yes"}, "field 'desc_act' must be true or false"),
        ({"bits": 4, "quant_method": "awq"}, "only GPTQ checkpoints are supported"),
        ({"bits": 4, "checkpoint_format": "marlin"}, "field 'checkpoint_format'"),
        ({"bits": 4, "model_file_base_name": "../evil"}, "must be a plain file name"),
        ([4, 128], "expected a JSON object"),
    ],
)
def test_bad_configs_name_file_and_field(tmp_path, raw, message):
    write(tmp_path, "quantize_config.json", raw)
    with pytest.raises(QuantConfigError) as err:
        load_quant_config(tmp_path)
    assert message in str(err.value)
    assert str(err.value).startswith("quantize_config.json")


def test_broken_json_is_reported_with_the_file_name(tmp_path):
    write(tmp_path, "quantize_config.json", '{"bits": 4,,}')
    with pytest.raises(QuantConfigError, match=r"quantize_config.json: not valid JSON"):
        load_quant_config(tmp_path)


def test_error_in_config_block_names_it():
    with pytest.raises(QuantConfigError, match=r"config.json: quantization_config: field 'bits' is 2"):
        parse_quant_config({"bits": 2}, "config.json: quantization_config")

"""Weight-file discovery and the refusals a user sees."""

import json

import pytest
import torch
from safetensors.torch import save_file

from backends.loader import LoadOptions, build_model
from backends.quant_config import QuantConfig
from backends.weights import WeightsError, WeightStore, find_weight_files
from tests.gptq_testing import tiny_config, write_random_checkpoint

Q = QuantConfig(bits=4, group_size=128)


def touch_safetensors(path, name="x"):
    save_file({name: torch.zeros(2)}, str(path))


@pytest.mark.parametrize(
    "files, qconfig, expected",
    [
        (["model.safetensors"], Q, "model.safetensors"),
        (["gptq_model-4bit-128g.safetensors"], Q, "gptq_model-4bit-128g.safetensors"),
        (["vicuna-7b-v1.3-GPTQ-4bit-128g.no-act.order.safetensors"], Q,
         "vicuna-7b-v1.3-GPTQ-4bit-128g.no-act.order.safetensors"),
        (["a.safetensors", "custom.safetensors"], QuantConfig(model_file_base_name="custom"), "custom.safetensors"),
    ],
)
def test_single_file_discovery(tmp_path, files, qconfig, expected):
    for name in files:
        touch_safetensors(tmp_path / name)
    found = find_weight_files(tmp_path, qconfig)
    assert [f.name for f in found.files] == [expected] and not found.pickled


def test_sharded_safetensors_use_the_index(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.full((3,), 2.0)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    store = WeightStore(find_weight_files(tmp_path, None))
    assert store.keys() == ["a", "b"]
    assert torch.equal(store.get("b"), torch.full((3,), 2.0))


def test_index_naming_a_missing_shard_is_reported(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="missing: model-00002-of-00002.safetensors"):
        find_weight_files(tmp_path, None)


def test_ambiguous_files_ask_for_model_file_base_name(tmp_path):
    touch_safetensors(tmp_path / "a.safetensors")
    touch_safetensors(tmp_path / "b.safetensors")
    with pytest.raises(WeightsError, match="model_file_base_name"):
        find_weight_files(tmp_path, Q)


def test_no_weights_is_reported(tmp_path):
    with pytest.raises(WeightsError, match="no weight files found"):
        find_weight_files(tmp_path, Q)


def test_pickles_are_refused_unless_allowed(tmp_path):
    torch.save({"w": torch.arange(4.0)}, tmp_path / "model.pt")
    with pytest.raises(WeightsError, match="pickled weights.*allow pickled weights"):
        find_weight_files(tmp_path, Q)
    found = find_weight_files(tmp_path, Q, allow_pickle=True)
    assert found.pickled
    assert torch.equal(WeightStore(found).get("w"), torch.arange(4.0))


def test_allowed_pickles_still_refuse_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": Exploit()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="weights-only"):
        WeightStore(find_weight_files(tmp_path, Q, allow_pickle=True))


def test_corrupt_safetensors_is_reported(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(WeightsError, match="model.safetensors: not a readable safetensors file"):
        WeightStore(find_weight_files(tmp_path, Q))


def test_config_that_does_not_match_the_weights_says_so(tmp_path):
    path = write_random_checkpoint(tmp_path / "m", tiny_config(), bits=4, group_size=32)
    (path / "quantize_config.json").write_text(json.dumps({"bits": 8, "group_size": 32}))
    with pytest.raises(WeightsError, match=r"qweight' has shape .*bits=8, group_size=32 match the weights"):
        build_model(path, LoadOptions(device="cpu"))


def test_missing_tensor_is_named(tmp_path):
    path = write_random_checkpoint(tmp_path / "m", tiny_config(), bits=4, group_size=32)
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "model.layers.1.input_layernorm.weight"}
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(WeightsError, match="'model.layers.1.input_layernorm.weight' is missing"):
        build_model(path, LoadOptions(device="cpu"))

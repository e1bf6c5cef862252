"""Sampling presets in presets/*.yaml and per-model settings in models/config-user.yaml."""

from pathlib import Path

import pytest
import yaml

from backends.sampling import SamplingParams
from webui import presets
from webui.presets import PresetError
from webui.settings import ModelSettings, SettingsError, SettingsStore

SHIPPED = Path(__file__).resolve().parent.parent / "presets"


def test_shipped_presets_are_valid():
    names = presets.list_presets(SHIPPED)
    assert {"Default", "Deterministic", "Creative", "Precise"} <= set(names)
    for name in names:
        values = presets.load_preset(SHIPPED, name)
        assert set(values) == set(presets.PRESET_FIELDS)
        SamplingParams(**values)
    assert presets.load_preset(SHIPPED, "Deterministic")["temperature"] == 0


def test_save_load_delete_roundtrip(tmp_path):
    values = {"temperature": 0.5, "top_p": 0.8, "top_k": 7, "min_p": 0.1, "typical_p": 1.0,
              "repetition_penalty": 1.2, "max_new_tokens": 64, "dry_multiplier": 0.8, "xtc_probability": 0.3,
              "mirostat_tau": 5.0, "dynatemp_range": 0.4, "presence_penalty": 0.5,
              "sampler_order": ["min_p", "temperature", "top_k", "top_p", "typical_p", "xtc"]}
    assert presets.save_preset(tmp_path, " Mine 2 ", values) == "Mine 2"
    assert presets.list_presets(tmp_path) == ["Mine 2"]
    loaded = presets.load_preset(tmp_path, "Mine 2")
    assert {k: loaded[k] for k in values} == values, "every sampler is saved in the preset"
    assert loaded["dry_base"] == 1.75 and loaded["dry_sequence_breakers"] == ["\n", ":", '"', "*"]
    presets.delete_preset(tmp_path, "Mine 2")
    assert presets.list_presets(tmp_path) == []
    with pytest.raises(PresetError, match="does not exist"):
        presets.delete_preset(tmp_path, "Mine 2")


@pytest.mark.parametrize("name", ["../evil", "", "a/b", ".hidden"])
def test_unsafe_names_are_refused(tmp_path, name):
    with pytest.raises(PresetError, match="not allowed"):
        presets.save_preset(tmp_path, name, {"temperature": 1.0})


def test_bad_presets_are_explained(tmp_path):
    with pytest.raises(PresetError, match="top_p"):
        presets.save_preset(tmp_path, "bad", {"top_p": 2.0})
    assert not (tmp_path / "bad.yaml").exists()
    (tmp_path / "typo.yaml").write_text("temprature: 0.5\n")
    with pytest.raises(PresetError, match="unknown setting.*temprature"):
        presets.load_preset(tmp_path, "typo")
    (tmp_path / "broken.yaml").write_text("temperature: [\n")
    with pytest.raises(PresetError, match="not valid YAML"):
        presets.load_preset(tmp_path, "broken")


def test_settings_roundtrip_keeps_other_models(tmp_path):
    store = SettingsStore(tmp_path)
    assert store.get("a") is None
    store.save("a", ModelSettings(backend="reference", context_length=2048, template="ChatML", preset="Precise"))
    store.save("b", ModelSettings(backend="auto"))
    assert store.get("a") == ModelSettings("reference", 2048, "ChatML", "Precise")
    assert store.get("b") == ModelSettings()
    assert yaml.safe_load(store.path.read_text())["b"] == {"backend": "auto"}
    assert [p.name for p in tmp_path.iterdir()] == ["config-user.yaml"], "no temporary files are left"


def test_broken_settings_file_is_reported_and_set_aside(tmp_path):
    store = SettingsStore(tmp_path)
    store.path.write_text("a: {backend: [\n")
    with pytest.raises(SettingsError, match="not valid YAML"):
        store.get("a")
    store.save("a", ModelSettings(backend="reference"))
    assert store.get("a").backend == "reference"
    broken = list(tmp_path.glob("config-user.yaml.broken-*"))
    assert len(broken) == 1 and broken[0].read_text() == "a: {backend: [\n"


def test_invalid_entries_are_explained(tmp_path):
    store = SettingsStore(tmp_path)
    store.path.write_text("a: {context_length: lots}\nb: {template: 3}\nc: {backend: auto, from_the_future: 1}\n")
    with pytest.raises(SettingsError, match="context_length"):
        store.get("a")
    with pytest.raises(SettingsError, match="template"):
        store.get("b")
    assert store.get("c") == ModelSettings()
    store.path.write_text("d: {kv_cache: int4}\ne: {kv_cache: auto}\nf: {kv_cache: fp8, cache_tokens: 8192}\n")
    with pytest.raises(SettingsError, match="kv_cache must be one of auto, fp8, not 'int4'"):
        store.get("d")
    assert store.get("e") == ModelSettings()
    assert store.get("f") == ModelSettings(cache_tokens=8192, kv_cache="fp8")

"""Sampling presets: one YAML file per preset in presets/."""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path

import yaml

from backends.sampling import SamplingParams
from webui.files import atomic_write_text, checked_name, read_yaml_mapping

# What a preset holds: the sampling knobs, not per-request stops or seeds.
PRESET_FIELDS = ("temperature", "top_p", "top_k", "min_p", "typical_p", "repetition_penalty", "max_new_tokens",
                 "presence_penalty", "frequency_penalty", "dry_multiplier", "dry_base", "dry_allowed_length",
                 "dry_sequence_breakers", "xtc_threshold", "xtc_probability", "mirostat_tau", "mirostat_eta",
                 "dynatemp_range", "dynatemp_exponent", "sampler_order", "banned_strings")


class PresetError(ValueError):
    """A preset that cannot be read, saved or deleted; the message is for the user."""


def check_name(name: str) -> str:
    return checked_name(name, "preset", PresetError)


def list_presets(folder: Path) -> list[str]:
    return sorted((p.stem for p in folder.glob("*.yaml") if not p.name.startswith(".")), key=str.lower)


def load_preset(folder: Path, name: str) -> dict:
    """The preset's values, all fields filled in, validated as SamplingParams."""
    path = folder / f"{check_name(name)}.yaml"
    if not path.is_file():
        raise PresetError(f"preset {name!r} does not exist in {folder}")
    raw = read_yaml_mapping(path, PRESET_FIELDS, PresetError, "of sampling parameters", key_kind="setting")
    try:
        params = SamplingParams.from_dict(raw, source=path.name)
    except ValueError as exc:
        raise PresetError(str(exc)) from exc
    values = asdict(params)
    return {k: list(values[k]) if isinstance(values[k], tuple) else values[k] for k in PRESET_FIELDS}


def save_preset(folder: Path, name: str, values: dict) -> str:
    name = check_name(name)
    known = {f.name for f in fields(SamplingParams)}
    kept = {k: list(values[k]) if isinstance(values[k], tuple) else values[k]
            for k in PRESET_FIELDS if k in values and k in known}
    try:
        SamplingParams.from_dict(kept, source=f"preset {name!r}")
    except ValueError as exc:
        raise PresetError(str(exc)) from exc
    atomic_write_text(folder / f"{name}.yaml", yaml.safe_dump(kept, sort_keys=False))
    return name


def delete_preset(folder: Path, name: str) -> None:
    path = folder / f"{check_name(name)}.yaml"
    if not path.is_file():
        raise PresetError(f"preset {name!r} does not exist")
    path.unlink()

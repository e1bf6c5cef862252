"""Per-model settings saved in models/config-user.yaml and applied when the model loads again."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from backends.loader import KV_CACHE_CHOICES
from webui.files import atomic_write_text

FILE_NAME = "config-user.yaml"


class SettingsError(ValueError):
    """config-user.yaml cannot be read; the message is for the user."""


@dataclass(frozen=True)
class ModelSettings:
    backend: str = "auto"
    context_length: int | None = None  # None: the model's own, capped (backends.loader.DEFAULT_CONTEXT)
    template: str | None = None  # None: guessed at load (webui.templates.guess_template)
    preset: str | None = None
    cache_tokens: int | None = None  # the engine's KV cache; None: backends.engine.default_cache_tokens
    kv_cache: str | None = None  # its type: None (auto, the model's dtype) or "fp8" (backends.loader.kv_cache_dtype)

    @classmethod
    def from_dict(cls, raw: dict, source: str) -> "ModelSettings":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in raw.items() if k in known}  # unknown keys: written by a newer version
        context = values.get("context_length")
        if context is not None and (not isinstance(context, int) or context < 16):
            raise SettingsError(f"{source}: context_length must be a whole number of at least 16, not {context!r}")
        cache = values.get("cache_tokens")
        if cache is not None and (not isinstance(cache, int) or cache < 16):
            raise SettingsError(f"{source}: cache_tokens must be a whole number of at least 16, not {cache!r}")
        for key in ("backend", "template", "preset"):
            if values.get(key) is not None and not isinstance(values[key], str):
                raise SettingsError(f"{source}: {key} must be text, not {values[key]!r}")
        if values.get("kv_cache") == "auto":
            values["kv_cache"] = None
        if values.get("kv_cache") not in (None, *KV_CACHE_CHOICES):
            raise SettingsError(f"{source}: kv_cache must be one of {', '.join(KV_CACHE_CHOICES)}, "
                                f"not {values['kv_cache']!r}")
        return cls(**values)


class SettingsStore:
    def __init__(self, models_dir: Path):
        self.path = Path(models_dir) / FILE_NAME

    def _read_all(self) -> dict:
        if not self.path.is_file():
            return {}
        try:
            raw = yaml.safe_load(self.path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise SettingsError(f"{self.path} is not valid YAML ({exc}); fix or remove it") from exc
        if not isinstance(raw, dict):
            raise SettingsError(f"{self.path} must map model names to settings; fix or remove it")
        return raw

    def get(self, model_name: str) -> ModelSettings | None:
        entry = self._read_all().get(model_name)
        if entry is None:
            return None
        if not isinstance(entry, dict):
            raise SettingsError(f"{self.path}: the entry for {model_name} must be a mapping")
        return ModelSettings.from_dict(entry, f"{self.path.name} ({model_name})")

    def save(self, model_name: str, settings: ModelSettings) -> None:
        """Keeps every other model's entry; a broken file is set aside, never overwritten."""
        try:
            everything = self._read_all()
        except SettingsError:
            self.path.rename(self.path.with_name(f"{FILE_NAME}.broken-{time.strftime('%Y%m%d-%H%M%S')}"))
            everything = {}
        everything[model_name] = {k: v for k, v in asdict(settings).items() if v is not None}
        atomic_write_text(self.path, yaml.safe_dump(everything, sort_keys=True))

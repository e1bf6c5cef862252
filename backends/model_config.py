"""The architecture of a Llama or Mistral checkpoint, read from config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "mistral")


class ModelConfigError(ValueError):
    """A config.json that is missing, malformed or describes an unsupported model."""


@dataclass(frozen=True)
class RopeScaling:
    kind: str  # "linear" | "dynamic" | "llama3"
    factor: float
    original_max_position: int | None = None
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0


@dataclass(frozen=True)
class ModelArgs:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()


def _require(raw: dict[str, Any], name: str, source: str) -> Any:
    if name not in raw or raw[name] is None:
        raise ModelConfigError(f"{source}: field '{name}' is missing")
    return raw[name]


def _int_field(raw: dict[str, Any], name: str, source: str) -> int:
    value = _require(raw, name, source)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelConfigError(f"{source}: field '{name}' must be a positive integer, got {value!r}")
    return value


def _parse_rope_scaling(raw: Any, source: str) -> RopeScaling | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ModelConfigError(f"{source}: field 'rope_scaling' must be an object")
    kind = raw.get("rope_type", raw.get("type"))
    if kind in (None, "default"):
        return None
    if kind not in ("linear", "dynamic", "llama3"):
        raise ModelConfigError(
            f"{source}: rope_scaling type {kind!r} is not supported (linear, dynamic, llama3)"
        )
    factor = raw.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or factor < 1:
        raise ModelConfigError(f"{source}: rope_scaling 'factor' must be a number >= 1, got {factor!r}")
    return RopeScaling(
        kind=kind,
        factor=float(factor),
        original_max_position=raw.get("original_max_position_embeddings"),
        low_freq_factor=float(raw.get("low_freq_factor", 1.0)),
        high_freq_factor=float(raw.get("high_freq_factor", 4.0)),
    )


def _eos_ids(raw: Any) -> tuple[int, ...]:
    if raw is None:
        return ()
    if isinstance(raw, int):
        return (raw,)
    return tuple(int(x) for x in raw)


def parse_model_args(raw: Any, source: str = "config.json") -> ModelArgs:
    if not isinstance(raw, dict):
        raise ModelConfigError(f"{source}: expected a JSON object")
    arch = raw.get("model_type")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelConfigError(
            f"{source}: model_type {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    hidden = _int_field(raw, "hidden_size", source)
    n_heads = _int_field(raw, "num_attention_heads", source)
    n_kv = raw.get("num_key_value_heads") or n_heads
    if n_heads % n_kv:
        raise ModelConfigError(
            f"{source}: num_attention_heads ({n_heads}) is not a multiple of num_key_value_heads ({n_kv})"
        )
    head_dim = raw.get("head_dim") or hidden // n_heads
    # transformers >= 5 writes rope settings into one "rope_parameters" block.
    rope_params = raw.get("rope_parameters") if isinstance(raw.get("rope_parameters"), dict) else {}
    rope_theta = raw.get("rope_theta", rope_params.get("rope_theta", 10000.0))
    rope_scaling = raw.get("rope_scaling") or (rope_params or None)
    window = raw.get("sliding_window") if arch == "mistral" else None
    if raw.get("use_sliding_window") is False:
        window = None
    return ModelArgs(
        architecture=arch,
        vocab_size=_int_field(raw, "vocab_size", source),
        hidden_size=hidden,
        intermediate_size=_int_field(raw, "intermediate_size", source),
        n_layers=_int_field(raw, "num_hidden_layers", source),
        n_heads=n_heads,
        n_kv_heads=int(n_kv),
        head_dim=int(head_dim),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        rope_theta=float(rope_theta),
        rope_scaling=_parse_rope_scaling(rope_scaling, source),
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        sliding_window=int(window) if window else None,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=bool(raw.get("attention_bias", False)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=_eos_ids(raw.get("eos_token_id")),
    )


def _json_file(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelConfigError(f"{path.name}: not valid JSON ({exc})") from exc


def load_model_args(model_dir: str | Path) -> ModelArgs:
    """config.json's model, with generation_config.json's end tokens (an id or a list) added to config.json's:
    generation stops at any of them, as transformers' generate() does with that file."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelConfigError(f"{Path(model_dir).name}: config.json is missing")
    args = parse_model_args(_json_file(path))
    generation = Path(model_dir) / "generation_config.json"
    raw = _json_file(generation) if generation.is_file() else {}
    try:
        extra = _eos_ids(raw.get("eos_token_id") if isinstance(raw, dict) else None)
    except (TypeError, ValueError) as exc:
        raise ModelConfigError(f"generation_config.json: eos_token_id must be an id or a list of ids ({exc})") from exc
    eos = args.eos_token_ids + tuple(i for i in extra if i not in args.eos_token_ids)
    return replace(args, eos_token_ids=eos)

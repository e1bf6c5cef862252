"""GPTQ quantization settings, parsed and validated in one place.

A checkpoint describes its quantization either in ``quantize_config.json``
(AutoGPTQ) or in the ``quantization_config`` block of ``config.json``
(transformers / optimum). Both are read into one frozen :class:`QuantConfig`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_BITS = (4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


class QuantConfigError(ValueError):
    """A quantization config that is missing, malformed or unsupported."""


@dataclass(frozen=True)
class QuantConfig:
    bits: int = 4
    group_size: int = 128
    desc_act: bool = False
    sym: bool = True
    model_file_base_name: str | None = None
    # "gptq" (v1) stores every zero point minus one, the way AutoGPTQ always
    # has; "gptq_v2" stores the zero points as they are.
    checkpoint_format: str = "gptq"
    damp_percent: float = 0.01
    source: str = ""

    @property
    def pack_factor(self) -> int:
        return 32 // self.bits

    @property
    def zero_offset(self) -> int:
        """What to add to a stored zero point to get the real one."""
        return 1 if self.checkpoint_format == "gptq" else 0

    def group_count(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else -(-in_features // self.group_size)

    def effective_group_size(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def to_json(self) -> dict[str, Any]:
        data = {
            "bits": self.bits,
            "group_size": self.group_size,
            "desc_act": self.desc_act,
            "sym": self.sym,
            "damp_percent": self.damp_percent,
            "true_sequential": True,
            "checkpoint_format": self.checkpoint_format,
            "quant_method": "gptq",
        }
        if self.model_file_base_name:
            data["model_file_base_name"] = self.model_file_base_name
        return data


def _field(raw: dict[str, Any], name: str, kind: type, default: Any, source: str) -> Any:
    value = raw.get(name, default)
    if value is None:
        return default
    if kind is bool:
        if not isinstance(value, bool):
            raise QuantConfigError(f"{source}: field '{name}' must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise QuantConfigError(f"{source}: field '{name}' must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise QuantConfigError(f"{source}: field '{name}' must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise QuantConfigError(f"{source}: field '{name}' must be a string, got {value!r}")
    return value


def parse_quant_config(raw: Any, source: str) -> QuantConfig:
    """Validate a decoded JSON object; ``source`` names it in every error."""
    if not isinstance(raw, dict):
        raise QuantConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    method = raw.get("quant_method", "gptq")
    if method != "gptq":
        raise QuantConfigError(
            f"{source}: field 'quant_method' is {method!r}; only GPTQ checkpoints are supported"
        )
    if "bits" not in raw:
        raise QuantConfigError(f"{source}: field 'bits' is missing")
    bits = _field(raw, "bits", int, 4, source)
    if bits not in SUPPORTED_BITS:
        raise QuantConfigError(
            f"{source}: field 'bits' is {bits}; supported: {', '.join(map(str, SUPPORTED_BITS))}"
        )
    group_size = _field(raw, "group_size", int, 128, source)
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise QuantConfigError(
            f"{source}: field 'group_size' is {group_size}; supported: "
            f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))}"
        )
    fmt = _field(raw, "checkpoint_format", str, "gptq", source)
    if fmt not in CHECKPOINT_FORMATS:
        raise QuantConfigError(
            f"{source}: field 'checkpoint_format' is {fmt!r}; supported: {', '.join(CHECKPOINT_FORMATS)}"
        )
    base_name = _field(raw, "model_file_base_name", str, None, source)
    if base_name is not None and ("/" in base_name or "\\" in base_name or base_name.startswith(".")):
        raise QuantConfigError(f"{source}: field 'model_file_base_name' must be a plain file name")
    return QuantConfig(
        bits=bits,
        group_size=group_size,
        desc_act=_field(raw, "desc_act", bool, False, source),
        sym=_field(raw, "sym", bool, True, source),
        model_file_base_name=base_name,
        checkpoint_format=fmt,
        damp_percent=_field(raw, "damp_percent", float, 0.01, source),
        source=source,
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise QuantConfigError(f"{path.name}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    except UnicodeDecodeError as exc:
        raise QuantConfigError(f"{path.name}: not UTF-8 text") from exc


def load_quant_config(model_dir: str | Path) -> QuantConfig | None:
    """The model's GPTQ settings, or None for an unquantized checkpoint.

    ``quantize_config.json`` wins over config.json's ``quantization_config``,
    as in AutoGPTQ.
    """
    model_dir = Path(model_dir)
    for name in ("quantize_config.json", "quant_config.json"):
        path = model_dir / name
        if path.is_file():
            return parse_quant_config(_read_json(path), name)
    config_path = model_dir / "config.json"
    if config_path.is_file():
        config = _read_json(config_path)
        if isinstance(config, dict) and config.get("quantization_config") is not None:
            return parse_quant_config(config["quantization_config"], "config.json: quantization_config")
    return None

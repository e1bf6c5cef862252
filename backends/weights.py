"""Finding and opening a checkpoint's weight files.

Safetensors are preferred. Pickled ``.pt``/``.bin`` files can run code when
unpickled, so they are refused unless the caller opts in, and even then they
are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from backends.quant_config import QuantConfig

PICKLE_SUFFIXES = (".pt", ".bin", ".pth")


class WeightsError(ValueError):
    """Weight files that are missing, ambiguous, unsafe or unreadable."""


@dataclass(frozen=True)
class WeightFiles:
    files: tuple[Path, ...]
    pickled: bool

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def _from_index(index_path: Path) -> tuple[Path, ...]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        shards = sorted(set(index["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise WeightsError(f"{index_path.name}: not a valid shard index ({exc})") from exc
    files = tuple(index_path.parent / name for name in shards)
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise WeightsError(f"{index_path.name} names shards that are missing: {', '.join(missing)}")
    return files


def _pickle_refusal(found: list[Path]) -> WeightsError:
    names = ", ".join(sorted(f.name for f in found))
    return WeightsError(
        f"only pickled weights were found ({names}). Pickle files can run arbitrary code when "
        "loaded; convert them to safetensors, or enable 'allow pickled weights' to load them "
        "with torch.load(weights_only=True)."
    )


def find_weight_files(
    model_dir: str | Path, qconfig: QuantConfig | None, allow_pickle: bool = False
) -> WeightFiles:
    model_dir = Path(model_dir)
    base = qconfig.model_file_base_name if qconfig else None
    if base:
        path = model_dir / f"{base}.safetensors"
        if path.is_file():
            return WeightFiles((path,), pickled=False)
        pickled = [model_dir / f"{base}{s}" for s in PICKLE_SUFFIXES if (model_dir / f"{base}{s}").is_file()]
        if pickled:
            if not allow_pickle:
                raise _pickle_refusal(pickled)
            return WeightFiles((pickled[0],), pickled=True)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return WeightFiles(_from_index(index), pickled=False)
    candidates = ["model.safetensors"]
    if qconfig:
        candidates.append(f"gptq_model-{qconfig.bits}bit-{qconfig.group_size}g.safetensors")
    for name in candidates:
        if (model_dir / name).is_file():
            return WeightFiles((model_dir / name,), pickled=False)
    found = sorted(model_dir.glob("*.safetensors"))
    if len(found) == 1:
        return WeightFiles((found[0],), pickled=False)
    if len(found) > 1:
        names = ", ".join(f.name for f in found)
        raise WeightsError(
            f"several weight files and no index ({names}); set model_file_base_name in quantize_config.json"
        )
    pickled = sorted(f for f in model_dir.iterdir() if f.suffix in PICKLE_SUFFIXES and f.is_file())
    if pickled:
        if not allow_pickle:
            raise _pickle_refusal(pickled)
        pickle_index = model_dir / "pytorch_model.bin.index.json"
        if pickle_index.is_file():
            return WeightFiles(_from_index(pickle_index), pickled=True)
        if len(pickled) > 1:
            raise WeightsError(f"several pickled weight files and no index: {', '.join(f.name for f in pickled)}")
        return WeightFiles((pickled[0],), pickled=True)
    expected = f"{base}.safetensors" if base else "model.safetensors"
    raise WeightsError(f"no weight files found in {model_dir.name} (expected {expected})")


class WeightStore:
    """Name -> tensor access over one or several weight files, read lazily."""

    def __init__(self, weight_files: WeightFiles):
        self._where: dict[str, Path] = {}
        self._pickled: dict[str, torch.Tensor] = {}
        for path in weight_files.files:
            if weight_files.pickled:
                self._load_pickle(path)
            else:
                self._index_safetensors(path)
        self._handles: dict[Path, object] = {}

    def _index_safetensors(self, path: Path) -> None:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    self._where[key] = path
        except Exception as exc:  # safetensors raises its own error types
            raise WeightsError(f"{path.name}: not a readable safetensors file ({exc})") from exc

    def _load_pickle(self, path: Path) -> None:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise WeightsError(f"{path.name}: could not be read as weights-only torch file ({exc})") from exc
        if not isinstance(state, dict):
            raise WeightsError(f"{path.name}: expected a dict of tensors")
        self._pickled.update(state)

    def keys(self) -> list[str]:
        return sorted(set(self._where) | set(self._pickled))

    def __contains__(self, name: str) -> bool:
        return name in self._where or name in self._pickled

    def get(self, name: str) -> torch.Tensor:
        if name in self._pickled:
            return self._pickled[name]
        path = self._where.get(name)
        if path is None:
            raise WeightsError(f"tensor '{name}' is missing from the weight files")
        handle = self._handles.get(path)
        if handle is None:
            handle = safe_open(str(path), framework="pt")
            self._handles[path] = handle
        return handle.get_tensor(name)  # type: ignore[attr-defined]

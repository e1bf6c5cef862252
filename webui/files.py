"""Writing small files so that a crash or a full disk never leaves half of one."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import yaml

# A name the user gives that becomes a file in one of our folders: no separators, no leading dot.
NAME_PATTERN = re.compile(r"^[\w][\w .+-]{0,63}$")


def checked_name(name: str | None, what: str, error: type[ValueError]) -> str:
    """``name`` stripped, or ``error`` saying what a ``what`` name may hold."""
    name = (name or "").strip()
    if not NAME_PATTERN.match(name):
        raise error(f"{what} name {name!r} is not allowed: use letters, digits, spaces, '.', '-', '+' or '_' "
                    "(up to 64)")
    return name


def read_yaml_mapping(path: Path, allowed: tuple[str, ...], error: type[ValueError], holds: str,
                      key_kind: str = "field") -> dict:
    """A YAML file that must be a mapping of ``allowed`` keys; ``error`` with a message for the user if not
    (``holds``: what the mapping should hold, for that message)."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise error(f"{path.name} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise error(f"{path.name} must be a mapping {holds}")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise error(f"{path.name}: unknown {key_kind}(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    return raw


def atomic_write_text(path: Path, text: str) -> None:
    """Write next to `path`, flush to disk, then rename over it; on any error the old file stays."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

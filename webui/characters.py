"""Characters and system prompts: named YAML files, each a system message and an optional greeting.

The library reads two folders: the ones shipped in ``characters/`` and the user's own under the user-data
folder (``user_data/characters/``), where *Save as* writes. A user's file of the same name takes the
shipped one's place; shipped ones cannot be deleted from the UI.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from webui.files import atomic_write_text, checked_name, read_yaml_mapping

FIELDS = ("system", "greeting", "description")


class CharacterError(ValueError):
    """A character that cannot be read, saved or deleted; the message is for the user."""


@dataclass(frozen=True)
class Character:
    name: str
    system: str
    greeting: str = ""
    description: str = ""
    shipped: bool = False


def check_name(name: str) -> str:
    return checked_name(name, "character", CharacterError)


class CharacterLibrary:
    def __init__(self, shipped: Path, user: Path):
        self.shipped, self.user = shipped, user

    def names(self) -> list[str]:
        found = {p.stem for folder in (self.shipped, self.user) if folder.is_dir()
                 for p in folder.glob("*.yaml") if not p.name.startswith(".")}
        return sorted(found, key=str.lower)

    def _path(self, name: str) -> tuple[Path, bool]:
        name = check_name(name)
        own = self.user / f"{name}.yaml"
        if own.is_file():
            return own, False
        shipped = self.shipped / f"{name}.yaml"
        if shipped.is_file():
            return shipped, True
        raise CharacterError(f"character {name!r} does not exist")

    def load(self, name: str) -> Character:
        path, shipped = self._path(name)
        raw = read_yaml_mapping(path, FIELDS, CharacterError, "with a 'system' text")
        values = {k: raw.get(k) or "" for k in FIELDS}
        if not all(isinstance(v, str) for v in values.values()):
            raise CharacterError(f"{path.name}: {', '.join(FIELDS)} must be text")
        if not values["system"].strip():
            raise CharacterError(f"{path.name} has no 'system' text")
        return Character(path.stem, shipped=shipped, **values)

    def save(self, name: str, system: str, greeting: str = "", description: str = "") -> Character:
        name = check_name(name)
        if not (system or "").strip():
            raise CharacterError("write the system message to save first")
        values = {"system": system, "greeting": greeting or "", "description": description or ""}
        atomic_write_text(self.user / f"{name}.yaml",
                          yaml.safe_dump({k: v for k, v in values.items() if v}, sort_keys=False, allow_unicode=True))
        return Character(name, **values)

    def delete(self, name: str) -> None:
        path, shipped = self._path(name)
        if shipped:
            raise CharacterError(f"{name!r} ships with the app and cannot be deleted; save your own under another "
                                 "name, or under this one to replace it")
        path.unlink()

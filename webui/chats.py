"""Saved chats: every conversation is a JSON file under the user-data folder, written atomically.

A file that cannot be read is moved to ``damaged/`` beside the chats, with a note for the user, and never
overwritten. Chats are listed newest first and can be searched, renamed, deleted, exported, imported and
branched from any message.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from webui.files import atomic_write_text

FORMAT = "gptq-workbench-chat/1"
ROLES = {"system", "user", "assistant"}


class ChatError(ValueError):
    """A chat that cannot be read, found or imported; the message is for the user."""


@dataclass
class Chat:
    id: str
    title: str
    messages: list[dict] = field(default_factory=list)
    system: str = ""
    template: str = ""
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **asdict(self)}, ensure_ascii=False, indent=1)

    @classmethod
    def from_json(cls, text: str, source: str) -> "Chat":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ChatError(f"{source} is not JSON ({exc})") from exc
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ChatError(f"{source} is not a saved chat of this app (format {FORMAT})")
        messages = raw.get("messages")
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in messages):
            raise ChatError(f"{source}: messages must be a list of {{role, content}} with roles {sorted(ROLES)}")
        try:
            return cls(id=str(raw["id"]), title=str(raw.get("title") or "Chat"),
                       messages=[{"role": m["role"], "content": m["content"]} for m in messages],
                       system=str(raw.get("system", "")), template=str(raw.get("template", "")),
                       created=float(raw.get("created", 0)), updated=float(raw.get("updated", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ChatError(f"{source}: {exc}") from exc


def title_of(messages: list[dict]) -> str:
    first = next((m["content"] for m in messages if m["role"] == "user"), "")
    words = " ".join(first.split())
    return (words[:48] + "…") if len(words) > 48 else (words or "New chat")


class ChatStore:
    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def _path(self, chat_id: str) -> Path:
        if not chat_id or not all(c.isalnum() or c == "-" for c in chat_id):
            raise ChatError(f"no chat {chat_id!r}")
        return self.folder / f"{chat_id}.json"

    def new(self, messages: list[dict] | None = None, system: str = "", template: str = "", title: str = "") -> Chat:
        messages = list(messages or [])
        return Chat(id=uuid.uuid4().hex[:16], title=title or title_of(messages), messages=messages, system=system,
                    template=template)

    def save(self, chat: Chat) -> Chat:
        chat.updated = time.time()
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self._path(chat.id), chat.to_json())
        return chat

    def load(self, chat_id: str) -> Chat:
        path = self._path(chat_id)
        if not path.is_file():
            raise ChatError(f"no chat {chat_id!r}")
        try:
            return Chat.from_json(path.read_text(encoding="utf-8"), path.name)
        except (ChatError, OSError, UnicodeDecodeError) as exc:
            moved = self._set_aside(path)
            raise ChatError(f"{exc}; the file was moved to {moved}") from exc

    def list(self, query: str = "") -> tuple[list[Chat], list[str]]:
        """Chats newest first whose title or text holds ``query``; and a note per damaged file set aside."""
        chats, notes = [], []
        if not self.folder.is_dir():
            return chats, notes
        needle = query.strip().lower()
        for path in self.folder.glob("*.json"):
            try:
                chat = Chat.from_json(path.read_text(encoding="utf-8"), path.name)
            except (ChatError, OSError, UnicodeDecodeError) as exc:
                notes.append(f"{exc}; it was moved to {self._set_aside(path)}")
                continue
            text = (chat.title + "\n" + "\n".join(m["content"] for m in chat.messages)).lower()
            if needle in text:
                chats.append(chat)
        chats.sort(key=lambda c: c.updated, reverse=True)
        return chats, notes

    def rename(self, chat_id: str, title: str) -> Chat:
        if not title.strip():
            raise ChatError("a chat's name cannot be empty")
        chat = self.load(chat_id)
        chat.title = title.strip()
        return self.save(chat)

    def delete(self, chat_id: str) -> None:
        path = self._path(chat_id)
        if not path.is_file():
            raise ChatError(f"no chat {chat_id!r}")
        path.unlink()

    def branch(self, chat_id: str, upto: int) -> Chat:
        """A new chat with the messages up to and including message ``upto`` (0-based)."""
        chat = self.load(chat_id)
        if not 0 <= upto < len(chat.messages):
            raise ChatError(f"the chat has messages 0 to {len(chat.messages) - 1}, not {upto}")
        return self.save(self.new(chat.messages[: upto + 1], chat.system, chat.template,
                                  title=f"{chat.title} (branch)"))

    def import_file(self, path: Path) -> Chat:
        """A chat exported from this app, saved under a new id (an import never replaces a chat)."""
        text = Path(path).read_text(encoding="utf-8")
        chat = Chat.from_json(text, Path(path).name)
        return self.save(self.new(chat.messages, chat.system, chat.template, title=chat.title))

    def _set_aside(self, path: Path) -> Path:
        damaged = self.folder / "damaged"
        damaged.mkdir(parents=True, exist_ok=True)
        target = damaged / f"{path.stem}-{time.strftime('%Y%m%d-%H%M%S')}{path.suffix}"
        path.rename(target)
        return target

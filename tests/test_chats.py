"""Saved chats on disk: atomic JSON files, newest first, search, rename, delete, branch, import/export,
and a damaged file set aside with a note instead of breaking the list."""

from __future__ import annotations

import json
import time

import pytest

from webui.chats import Chat, ChatError, ChatStore, title_of

TALK = [{"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."}]


def test_save_list_newest_first_and_search(tmp_path):
    store = ChatStore(tmp_path)
    first = store.save(store.new(TALK[:2], system="Be brief.", template="ChatML"))
    time.sleep(0.01)
    second = store.save(store.new([{"role": "user", "content": "Tell me about cats"}]))
    chats, notes = store.list()
    assert [c.id for c in chats] == [second.id, first.id] and notes == []
    assert first.title == "What is the capital of France?" and second.title == "Tell me about cats"
    assert [c.id for c in store.list("paris")[0]] == [first.id], "search reads the messages too"
    loaded = store.load(first.id)
    assert loaded.messages == TALK[:2] and loaded.system == "Be brief." and loaded.template == "ChatML"
    assert not list(tmp_path.glob(".*")), "no temporary file is left behind"


def test_rename_delete_branch(tmp_path):
    store = ChatStore(tmp_path)
    chat = store.save(store.new(TALK))
    assert store.rename(chat.id, "  Capitals ").title == "Capitals"
    branch = store.branch(chat.id, 1)
    assert branch.id != chat.id and branch.messages == TALK[:2] and branch.title == "Capitals (branch)"
    with pytest.raises(ChatError, match="messages 0 to 3"):
        store.branch(chat.id, 9)
    with pytest.raises(ChatError, match="cannot be empty"):
        store.rename(chat.id, " ")
    store.delete(chat.id)
    assert [c.id for c in store.list()[0]] == [branch.id]
    with pytest.raises(ChatError, match="no chat"):
        store.load(chat.id)
    with pytest.raises(ChatError, match="no chat"):
        store.load("../../etc/passwd")


def test_a_damaged_file_is_set_aside_with_a_note(tmp_path):
    store = ChatStore(tmp_path)
    good = store.save(store.new(TALK))
    (tmp_path / "broken.json").write_text('{"format": "gptq-workbench-chat/1", "id": "b", "messages": [')
    (tmp_path / "alien.json").write_text(json.dumps({"hello": 1}))
    chats, notes = store.list()
    assert [c.id for c in chats] == [good.id]
    assert len(notes) == 2 and all("moved to" in n for n in notes)
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "damaged").iterdir()) == ["alien", "broken"]
    assert store.list() == ([store.load(good.id)], []), "once set aside, the list is clean"


def test_export_then_import_makes_a_new_chat(tmp_path):
    store = ChatStore(tmp_path / "a")
    chat = store.save(store.new(TALK, title="Capitals"))
    exported = tmp_path / "capitals.json"
    exported.write_text(store.load(chat.id).to_json())
    other = ChatStore(tmp_path / "b")
    imported = other.import_file(exported)
    assert imported.messages == TALK and imported.title == "Capitals"
    again = store.import_file(exported)
    assert again.id != chat.id, "an import never replaces a chat"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "gptq-workbench-chat/1", "id": "x", "messages": [{"role": "wizard",
                                                                                          "content": "hi"}]}))
    with pytest.raises(ChatError, match="roles"):
        other.import_file(bad)


def test_titles():
    assert title_of([]) == "New chat"
    assert title_of([{"role": "user", "content": "word " * 30}]).endswith("…")
    assert Chat.from_json(Chat("a1", "t").to_json(), "x").title == "t"

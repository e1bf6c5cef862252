"""The characters library (YAML files, shipped and the user's own) and the Characters panel's handlers."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from webui.characters import CharacterError, CharacterLibrary
from webui.session import Session
from webui.state import SHIPPED_CHARACTERS, AppState
from webui.ui import WorkbenchUI


@pytest.fixture
def library(tmp_path) -> CharacterLibrary:
    return CharacterLibrary(SHIPPED_CHARACTERS, tmp_path / "user" / "characters")


def test_the_shipped_characters_load(library):
    names = library.names()
    assert {"Assistant", "Math tutor", "Code reviewer", "Storyteller"} <= set(names)
    for name in names:
        character = library.load(name)
        assert character.system.strip() and character.shipped
    assert library.load("Storyteller").greeting


def test_save_as_then_load_then_delete(library):
    saved = library.save("Pirate", "You talk like a pirate.", "Ahoy!")
    path = library.user / "Pirate.yaml"
    assert yaml.safe_load(path.read_text()) == {"system": "You talk like a pirate.", "greeting": "Ahoy!"}
    loaded = library.load("Pirate")
    assert (loaded.system, loaded.greeting, loaded.shipped) == ("You talk like a pirate.", "Ahoy!", False)
    assert "Pirate" in library.names() and saved.name == "Pirate"
    library.delete("Pirate")
    assert not path.exists() and "Pirate" not in library.names()


def test_a_users_file_replaces_a_shipped_one_until_deleted(library):
    shipped = library.load("Assistant").system
    library.save("Assistant", "Only answer in French.")
    assert library.load("Assistant").system == "Only answer in French." and library.names().count("Assistant") == 1
    library.delete("Assistant")
    assert library.load("Assistant").system == shipped
    with pytest.raises(CharacterError, match="ships with the app"):
        library.delete("Assistant")


@pytest.mark.parametrize("text, message", [
    ("system: [unclosed", "not valid YAML"),
    ("- a list", "must be a mapping"),
    ("system: hi\nvoice: deep", "unknown field"),
    ("greeting: hello", "no 'system' text"),
    ("system: 3", "must be text"),
])
def test_bad_files_are_explained(library, text, message):
    library.user.mkdir(parents=True)
    (library.user / "Bad.yaml").write_text(text)
    with pytest.raises(CharacterError, match=message):
        library.load("Bad")


@pytest.mark.parametrize("name", ["", "../escape", "a/b", "x" * 80])
def test_bad_names_are_refused(library, name):
    with pytest.raises(CharacterError, match="not allowed"):
        library.save(name, "text")


def test_the_panel_fills_the_system_message_and_greets_an_empty_chat(tmp_path):
    state = AppState(models_dir=tmp_path / "models", presets_dir=Path(__file__).parent.parent / "presets",
                     user_data=tmp_path / "user-data")
    ui = WorkbenchUI(state)
    ui.build()
    panel, gen = ui.characters, ui.gen
    chosen = panel.choose("Storyteller", [])
    story = state.characters.load("Storyteller")
    assert chosen[gen.system] == story.system and chosen[panel.c.greeting] == story.greeting
    assert chosen[gen.chatbot] == [{"role": "assistant", "content": story.greeting}]
    ongoing = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert gen.chatbot not in panel.choose("Storyteller", ongoing), "a chat under way is left as it is"
    assert "does not exist" in panel.choose("Nobody", [])[panel.c.note]

    saved = panel.save("Poet", "You answer in verse.", "")
    assert saved[panel.c.character]["value"] == "Poet" and "Poet" in saved[panel.c.character]["choices"]
    assert (tmp_path / "user-data" / "characters" / "Poet.yaml").is_file()
    assert "write the system message" in panel.save("Empty", "  ", "")[panel.c.note]
    assert "ships with the app" in panel.delete("Assistant")[panel.c.note]
    deleted = panel.delete("Poet")
    assert "Poet" not in deleted[panel.c.character]["choices"] and deleted[panel.c.character]["value"] is None
    session = Session()
    assert ui.new_chat(session, story.greeting)[gen.chatbot] == [{"role": "assistant", "content": story.greeting}]
    assert session.chat_id is None

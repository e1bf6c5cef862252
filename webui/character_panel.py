"""The Text generation tab's Characters panel: choose a named system prompt (and greeting), save the current
one under a name, delete one of the user's own. Its handlers answer with dicts keyed by component."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from webui.chat import clean_history
from webui.characters import CharacterError
from webui.state import AppState


def greeting_history(greeting: str) -> list[dict]:
    """A new chat's history: the character's greeting as the first reply, if it has one."""
    return [{"role": "assistant", "content": greeting}] if (greeting or "").strip() else []


class CharacterPanel:
    def __init__(self, state: AppState):
        self.state = state
        self.c = SimpleNamespace()

    def build(self) -> SimpleNamespace:
        c = self.c
        with gr.Accordion("Characters and system prompts", open=False, elem_id="characters-panel"):
            c.character = gr.Dropdown(self.state.characters.names(), value=None, label="Character",
                                      elem_id="character")
            c.greeting = gr.Textbox(label="Greeting (opens each new chat)", lines=2, elem_id="greeting")
            with gr.Row():
                c.name = gr.Textbox(placeholder="name", show_label=False, elem_id="character-name", scale=2)
                c.save = gr.Button("Save as", elem_id="character-save", min_width=60)
                c.delete = gr.Button("Delete", elem_id="character-delete", min_width=60)
            c.note = gr.Markdown("", elem_id="character-note")
        return c

    def wire(self, system: gr.Textbox, chatbot: gr.Chatbot) -> None:
        c = self.c
        c.system, c.chatbot = system, chatbot
        c.character.input(self.choose, [c.character, chatbot], [system, c.greeting, c.name, c.note, chatbot],
                          queue=False)
        c.save.click(self.save, [c.name, system, c.greeting], [c.character, c.note], queue=False)
        c.delete.click(self.delete, c.character, [c.character, c.note, c.name], queue=False)

    def choose(self, name: str | None, history) -> dict:
        c = self.c
        try:
            character = self.state.characters.load(name or "")
        except CharacterError as exc:
            return {c.note: f"**Error:** {exc}"}
        update = {c.system: character.system, c.greeting: character.greeting, c.name: character.name,
                  c.note: f"**{character.name}**: {character.description or 'system message filled in.'}"}
        if not clean_history(history):  # an empty chat opens with the greeting
            update[c.chatbot] = greeting_history(character.greeting)
        return update

    def save(self, name: str, system: str, greeting: str) -> dict:
        c = self.c
        try:
            saved = self.state.characters.save(name, system, greeting)
        except (CharacterError, OSError) as exc:
            return {c.note: f"**Error:** {exc}"}
        return {c.character: gr.update(choices=self.state.characters.names(), value=saved.name),
                c.note: f"Saved **{saved.name}** to {self.state.characters.user}."}

    def delete(self, name: str | None) -> dict:
        c = self.c
        try:
            self.state.characters.delete(name or "")
        except (CharacterError, OSError) as exc:
            return {c.note: f"**Error:** {exc}"}
        return {c.character: gr.update(choices=self.state.characters.names(), value=None), c.name: "",
                c.note: f"Deleted **{name}**."}

"""The Gradio app: Text generation, Model and Download tabs on one AppState.

Every handler returns a message for the user instead of raising, so a bad
input or a failed load never leaves a dead page.
"""

from __future__ import annotations

import html
import tempfile
import threading
import time
from dataclasses import replace
from types import SimpleNamespace
from pathlib import Path

import gradio as gr

from backends.constraints import Grammar, GrammarError
from backends.generation import ContextOverflowError
from backends.sampling import SAMPLERS, SamplingParams
from webui import presets, templates
from webui.character_panel import CharacterPanel, greeting_history
from webui.chat import chat_turn, clean_history, context_bar_html, context_used, notebook_turn, prompt_tokens
from webui.chats import ChatError, title_of
from webui.download import DownloadCancelled, DownloadError, DownloadProgress, DownloadRequest, Hub, format_bytes, download
from webui.repo_spec import RepoSpecError, parse_repo_spec
from webui.session import Session
from webui.settings import ModelSettings
from backends.loader import KV_CACHE_CHOICES, resolve_device
from backends.memory import gigabytes, memory_use
from webui.state import AppState, ModelNotLoaded, describe_engine
from webui.templates import TemplateError

SAMPLING = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p", "typical_p", "repetition_penalty",
            "presence_penalty", "frequency_penalty", "dry_multiplier", "dry_base", "dry_allowed_length",
            "xtc_threshold", "xtc_probability", "mirostat_tau", "mirostat_eta", "dynatemp_range", "dynatemp_exponent",
            "banned_strings", "sampler_order")
DEFAULT_PRESET = "Default"
# Math as models write it (OpenChat's Math Correct mode, most instruction models): $$…$$ and \[…\] on their own
# line, $…$ and \(…\) inline.
LATEX = [{"left": "$$", "right": "$$", "display": True}, {"left": "\\[", "right": "\\]", "display": True},
         {"left": "$", "right": "$", "display": False}, {"left": "\\(", "right": "\\)", "display": False}]
CSS = """
#gen-stats, #model-status, #download-status, #model-download-status { min-height: 1.5em; }
.dl-progress progress { width: 100%; height: 1.2em; }
.context-bar { display: flex; align-items: center; gap: 0.6em; font-size: 0.85em; }
.context-track { flex: 1; height: 0.5em; border-radius: 0.25em; background: var(--neutral-200); overflow: hidden; }
.context-fill { height: 100%; background: var(--color-accent); }
.context-bar.high .context-fill { background: #d97706; }
.context-bar.full .context-fill { background: #dc2626; }
@media (max-width: 640px) {  /* a phone: buttons wrap instead of squeezing, the chat keeps the height it needs */
  #chatbot { height: 60vh !important; }
  .gradio-container { padding: 0.25em !important; }
}
"""
# Gradio's dark theme is the "dark" class on the body; the choice is kept in the browser across reloads.
TOGGLE_DARK = """() => {
  const dark = document.body.classList.toggle('dark');
  localStorage.setItem('gptq-workbench-theme', dark ? 'dark' : 'light');
}"""
RESTORE_THEME = """() => {
  if (localStorage.getItem('gptq-workbench-theme') === 'dark') document.body.classList.add('dark');
}"""
# Streams show their own progress (the growing reply, the stats line, the download bar), not Gradio's overlay.
QUIET = {"show_progress": "hidden"}
ENGINE_REFRESH_S = 2.0  # how often the Model tab's engine line is read again
CACHE_DEFAULT = "two contexts on a GPU, one on the CPU"  # backends.engine.default_cache_tokens
# Expected failures of user actions; anything else is a bug and is shown with its type.
USER_ERRORS = (ValueError, RuntimeError, OSError, MemoryError)


def error_text(exc: BaseException) -> str:
    if isinstance(exc, USER_ERRORS) and not type(exc).__module__.startswith("torch"):
        return f"**Error:** {exc}"
    return f"**Error:** {type(exc).__name__}: {exc}"


GRAMMAR_KINDS = {"none": None, "JSON Schema": "json_schema", "any JSON object": "json_object",
                 "regular expression": "regex", "Lark grammar": "lark"}


def grammar_of(kind: str | None, source: str | None) -> Grammar | None:
    """The Structured output fields as a grammar (checked when the generation starts)."""
    name = GRAMMAR_KINDS.get(kind or "none")
    if name is None:
        return None
    if name != "json_object" and not (source or "").strip():
        raise ValueError(f"structured output: write the {kind} in its box, or choose 'none'")
    return Grammar(name, source or "")


def model_settings(backend: str | None, context: float | None, template: str | None, preset: str | None,
                   cache: float | None, kv_cache: str | None = None) -> ModelSettings:
    """The Model tab's fields as settings, checked as a saved entry is (a bad value is refused by name)."""
    settings = ModelSettings(backend=backend or "auto", context_length=int(context) if context else None,
                             template=template or None, preset=preset or None,
                             cache_tokens=int(cache) if cache else None, kv_cache=kv_cache or None)
    return ModelSettings.from_dict(settings.__dict__, "the Model tab")


def sampling_params(values: list, seed: float | None) -> SamplingParams:
    raw = dict(zip(SAMPLING, values))
    raw["max_new_tokens"] = int(raw["max_new_tokens"])
    raw["top_k"] = int(raw["top_k"])
    raw["dry_allowed_length"] = int(raw.get("dry_allowed_length", 2))
    raw["banned_strings"] = tuple(line for line in str(raw.get("banned_strings") or "").splitlines() if line.strip())
    order = [name.strip() for name in str(raw.get("sampler_order") or "").split(",") if name.strip()]
    if order:
        raw["sampler_order"] = tuple(order)
    else:
        raw.pop("sampler_order", None)
    raw["seed"] = None if seed is None or seed < 0 else int(seed)
    return SamplingParams.from_dict(raw, source="sampling settings")


class WorkbenchUI:
    """Builds the Blocks and holds the handlers, which all act on one AppState."""

    def __init__(self, state: AppState):
        self.state = state
        self.characters = CharacterPanel(state)

    # ---- presets -------------------------------------------------------------------------------------------------

    def preset_choices(self) -> list[str]:
        return presets.list_presets(self.state.presets_dir)

    def preset_values(self, name: str | None) -> list:
        values = presets.load_preset(self.state.presets_dir, name) if name else vars(SamplingParams())
        joined = {"banned_strings": "\n", "sampler_order": ", "}
        return [joined[k].join(values[k]) if k in joined else values[k] for k in SAMPLING]

    def apply_preset(self, name: str) -> dict:
        try:
            return {**dict(zip(self.gen.sliders, self.preset_values(name))), self.gen.stats: f"Preset **{name}** applied."}
        except presets.PresetError as exc:
            return {self.gen.stats: error_text(exc)}

    def save_preset(self, name: str, *values) -> dict:
        try:
            params = sampling_params(list(values), None)
            saved = presets.save_preset(self.state.presets_dir, name, {k: getattr(params, k) for k in SAMPLING})
        except (ValueError, OSError) as exc:
            return {self.gen.stats: error_text(exc)}
        choices = self.preset_choices()
        return {self.gen.preset: gr.update(choices=choices, value=saved), self.mdl.preset: gr.update(choices=choices),
                self.gen.stats: f"Preset **{saved}** saved."}

    def delete_preset(self, name: str) -> dict:
        try:
            presets.delete_preset(self.state.presets_dir, name)
        except (ValueError, OSError) as exc:
            return {self.gen.stats: error_text(exc)}
        choices = self.preset_choices()
        return {self.gen.preset: gr.update(choices=choices, value=None), self.mdl.preset: gr.update(choices=choices),
                self.gen.stats: f"Preset **{name}** deleted."}

    # ---- text generation -----------------------------------------------------------------------------------------

    def _said(self, history, stats: str, text: str | None = None) -> dict:
        """A chat update: the history and the stats line, and the input box when ``text`` is given."""
        update = {self.gen.chatbot: history, self.gen.stats: stats}
        if text is not None:
            update[self.gen.user_text] = text
        return update

    def send(self, session: Session, text: str, history, system: str, template: str, grammar_kind: str,
             grammar_source: str, seed, *values):
        history = clean_history(history)
        if not text.strip():
            yield self._said(history, "**Error:** type a message first", text)
            return
        try:
            params = sampling_params(list(values), seed)
            grammar = grammar_of(grammar_kind, grammar_source)
            self.state.require_model()
        except (ValueError, ModelNotLoaded) as exc:
            yield self._said(history, error_text(exc), text)
            return
        asked = history + [{"role": "user", "content": text}]
        yield self._said(asked, "generating…", "")
        yield from self._stream(session, asked, system, template, params, restore_on_overflow=text, grammar=grammar)

    def regenerate(self, session: Session, history, system: str, template: str, grammar_kind: str,
                   grammar_source: str, seed, *values):
        history = clean_history(history)
        while history and history[-1]["role"] == "assistant":
            history = history[:-1]
        if not history:
            yield self._said(history, "**Error:** nothing to regenerate")
            return
        yield from self._guarded(session, history, system, template, (grammar_kind, grammar_source), seed, values)

    def continue_reply(self, session: Session, history, system: str, template: str, grammar_kind: str,
                       grammar_source: str, seed, *values):
        history = clean_history(history)
        if not history or history[-1]["role"] != "assistant":
            yield self._said(history, "**Error:** there is no reply to continue")
            return
        yield from self._guarded(session, history, system, template, (grammar_kind, grammar_source), seed, values,
                                 continue_last=True)

    def send_with_reply_start(self, session: Session, text: str, start: str, history, system: str, template: str,
                              grammar_kind: str, grammar_source: str, seed, *values):
        """Send, with the reply made to begin with ``start`` (the model continues it)."""
        history = clean_history(history)
        if not text.strip() or not start:
            yield self._said(history, "**Error:** type a message and the words the reply starts with", text)
            return
        asked = history + [{"role": "user", "content": text}, {"role": "assistant", "content": start}]
        yield self._said(asked, "generating…", "")
        yield from self._guarded(session, asked, system, template, (grammar_kind, grammar_source), seed, values,
                                 continue_last=True)

    def edit_message(self, session: Session, number: float | None, new_text: str, history, system: str,
                     template: str, grammar_kind: str, grammar_source: str, seed, *values):
        """Replace user message ``number`` (counted from 1 over all messages) and regenerate from there;
        what came after it is dropped."""
        history = clean_history(history)
        index = int(number or 0) - 1
        if not 0 <= index < len(history) or history[index]["role"] != "user":
            users = [str(i + 1) for i, m in enumerate(history) if m["role"] == "user"]
            yield self._said(history, f"**Error:** message {index + 1} is not one of yours; yours are "
                                      f"{', '.join(users) or 'none yet'}")
            return
        if not (new_text or "").strip():
            yield self._said(history, "**Error:** type the message's new text")
            return
        edited = history[:index] + [{"role": "user", "content": new_text}]
        yield self._said(edited, "generating…")
        yield from self._guarded(session, edited, system, template, (grammar_kind, grammar_source), seed, values)

    def delete_last_turn(self, session: Session, history, system: str, template: str):
        """Drops the last user message and everything after it."""
        history = clean_history(history)
        users = [i for i, m in enumerate(history) if m["role"] == "user"]
        if not users:
            return self._said(history, "**Error:** there is no turn to delete")
        kept = history[: users[-1]]
        self.autosave(session, kept, system, template)
        return self._said(kept, "Last turn deleted.")

    def impersonate(self, session: Session, text: str, history, system: str, template: str, grammar_kind: str,
                    grammar_source: str, seed, *values):
        """The model writes (or continues) the user's next message into the input box."""
        history = clean_history(history)
        try:
            params = sampling_params(list(values), seed)
            grammar = grammar_of(grammar_kind, grammar_source)
            open_turn = history + [{"role": "user", "content": text or ""}]
            for turn in chat_turn(self.state, open_turn, system or "", template, params, True,
                                  session.new_generation(), grammar):
                yield {self.gen.user_text: turn.history[-1]["content"], self.gen.stats: turn.stats}
        except Exception as exc:  # noqa: BLE001 - shown; the typed text stays
            yield {self.gen.stats: error_text(exc)}

    def _guarded(self, session, history, system, template, grammar_fields, seed, values, continue_last=False):
        try:
            params = sampling_params(list(values), seed)
            grammar = grammar_of(*grammar_fields)
        except ValueError as exc:
            yield self._said(history, error_text(exc))
            return
        yield from self._stream(session, history, system, template, params, continue_last=continue_last,
                                grammar=grammar)

    def _stream(self, session, history, system, template, params, continue_last=False, restore_on_overflow=None,
                grammar=None):
        last = history
        try:
            for turn in chat_turn(self.state, history, system or "", template, params, continue_last,
                                  session.new_generation(), grammar):
                last = turn.history
                if turn.done:  # saved before the browser sees the end, so a finished reply is on disk
                    self.autosave(session, last, system, template)
                yield self._said(turn.history, turn.stats)
        except (ContextOverflowError, TemplateError, GrammarError) as exc:
            if restore_on_overflow is not None:  # give the message back rather than lose it
                yield self._said(history[:-1], error_text(exc), restore_on_overflow)
            else:
                yield self._said(history, error_text(exc))
        except Exception as exc:  # noqa: BLE001 - shown to the user, the chat so far is kept
            yield self._said(last, error_text(exc))
            self.autosave(session, last, system, template)

    # ---- saved chats ---------------------------------------------------------------------------------------------

    def autosave(self, session: Session, history, system: str, template: str) -> None:
        """Every finished turn is saved: the session's chat, or a new one for a new conversation."""
        if not history:
            return
        store = self.state.chats
        try:
            chat = store.load(session.chat_id) if session.chat_id else store.new()
        except ChatError:
            chat = store.new()
        chat.messages, chat.system, chat.template = clean_history(history), system or "", template or ""
        if not chat.title or chat.title == "New chat":
            chat.title = title_of(chat.messages)
        session.chat_id = store.save(chat).id

    def chat_choices(self, session: Session, query: str = "") -> dict:
        chats, notes = self.state.chats.list(query or "")
        choices = [(f"{c.title} · {time.strftime('%Y-%m-%d %H:%M', time.localtime(c.updated))}", c.id) for c in chats]
        current = session.chat_id if any(c.id == session.chat_id for c in chats) else None
        note = "\n\n".join(f"**Set aside:** {n}" for n in notes)
        return {self.gen.chat_list: gr.update(choices=choices, value=current), self.gen.chat_note: note}

    def open_chat(self, session: Session, chat_id: str | None) -> dict:
        if not chat_id or chat_id == session.chat_id:
            return {self.gen.chat_note: gr.update()}  # an empty dict would read as one output value
        try:
            chat = self.state.chats.load(chat_id)
        except ChatError as exc:
            return {self.gen.chat_note: error_text(exc), **self.chat_choices(session)}
        session.chat_id = chat.id
        update = {self.gen.chatbot: chat.messages, self.gen.system: chat.system, self.gen.stats: "",
                  self.gen.chat_note: f"Opened **{chat.title}**.", self.gen.chat_title: chat.title}
        if chat.template in templates.template_names():
            update[self.gen.template] = chat.template
        return update

    def new_chat(self, session: Session, greeting: str = "") -> dict:
        session.chat_id = None
        return {self.gen.chatbot: greeting_history(greeting), self.gen.stats: "", self.gen.chat_title: "",
                **self.chat_choices(session)}

    def rename_chat(self, session: Session, title: str) -> dict:
        try:
            if not session.chat_id:
                raise ChatError("send a message first: a new chat is saved with its first turn")
            chat = self.state.chats.rename(session.chat_id, title or "")
        except ChatError as exc:
            return {self.gen.chat_note: error_text(exc)}
        return {**self.chat_choices(session), self.gen.chat_note: f"Renamed to **{chat.title}**."}

    def delete_chat(self, session: Session) -> dict:
        if not session.chat_id:
            return {self.gen.chat_note: "**Error:** no saved chat is open"}
        try:
            self.state.chats.delete(session.chat_id)
        except ChatError as exc:
            return {self.gen.chat_note: error_text(exc)}
        return {**self.new_chat(session), self.gen.chat_note: "Chat deleted."}

    def branch_chat(self, session: Session, message: float | None) -> dict:
        """A new chat with the messages up to message number ``message`` (counted from 1)."""
        try:
            if not session.chat_id:
                raise ChatError("no saved chat is open")
            chat = self.state.chats.branch(session.chat_id, int(message or 0) - 1)
        except (ChatError, ValueError) as exc:
            return {self.gen.chat_note: error_text(exc)}
        session.chat_id = None
        return {**self.open_chat(session, chat.id), **self.chat_choices(session)}

    def export_chat(self, session: Session):
        if not session.chat_id:
            return None
        chat = self.state.chats.load(session.chat_id)
        folder = Path(tempfile.mkdtemp(prefix="chat-export-"))
        name = "".join(c if c.isalnum() else "-" for c in chat.title)[:40].strip("-") or "chat"
        path = folder / f"{name}.json"
        path.write_text(chat.to_json(), encoding="utf-8")
        return str(path)

    def import_chat(self, session: Session, upload) -> dict:
        try:
            chat = self.state.chats.import_file(Path(upload if isinstance(upload, str) else upload.name))
        except (ChatError, OSError, UnicodeDecodeError) as exc:
            return {self.gen.chat_note: error_text(exc)}
        session.chat_id = None
        return {**self.open_chat(session, chat.id), **self.chat_choices(session)}

    def notebook(self, session: Session, prompt: str, grammar_kind: str, grammar_source: str, seed, *values):
        gen = self.gen
        try:
            params = sampling_params(list(values), seed)
            grammar = grammar_of(grammar_kind, grammar_source)
            for text, stats, view in notebook_turn(self.state, prompt, params, session.new_generation(), grammar):
                yield {gen.notebook: text, gen.stats: stats, gen.token_view: view}
        except Exception as exc:  # noqa: BLE001 - the prompt stays in the box
            yield {gen.stats: error_text(exc)}

    @staticmethod
    def stop(session: Session) -> None:
        # No output: the generation's own last update says "stopped: cancelled". A "stopping…" written here could
        # reach the browser after that update (this call is not queued, the stream is) and stay there.
        session.stop()

    def context_bar(self, history, system: str, template: str) -> str:
        try:
            return context_bar_html(context_used(self.state, clean_history(history), system or "", template))
        except (TemplateError, ValueError):
            return context_bar_html(None)

    def show_prompt_tokens(self, history, system: str, template: str) -> str:
        try:
            return prompt_tokens(self.state, clean_history(history), system or "", template)
        except (ModelNotLoaded, TemplateError) as exc:
            return error_text(exc)

    # ---- model ---------------------------------------------------------------------------------------------------

    def refresh_models(self, current: str | None = None):
        choices = self.state.local_models()
        value = current if current in choices else (choices[0] if choices else None)
        return gr.update(choices=choices, value=value)

    def select_model(self, name: str | None) -> dict:
        """Fills the settings fields: saved settings for this model, else suggestions."""
        mdl = self.mdl
        if not name:
            return {mdl.info: "No model selected."}
        try:
            info = self.state.describe_folder(name)
            saved = self.state.settings.get(name)
            settings = saved or self.state.suggested_settings(name)
        except Exception as exc:  # noqa: BLE001 - a broken folder is reported, not fatal
            return {mdl.info: error_text(exc)}
        note = " Saved settings found and filled in." if saved is not None else ""
        update = {mdl.info: info + note + self.memory_note(name, settings), mdl.backend: settings.backend,
                  mdl.context: settings.context_length, mdl.template: settings.template or templates.AUTO,
                  mdl.cache: settings.cache_tokens, mdl.kv_cache: settings.kv_cache or "auto"}
        if settings.preset in self.preset_choices():  # no saved preset: keep the one in use
            update[mdl.preset] = settings.preset
        return update

    def memory_note(self, name: str, settings: ModelSettings) -> str:
        try:
            need, free = self.state.memory_check(name, settings)
        except (ValueError, OSError):
            return ""
        if need is None:
            return ""
        fits = "" if free is None else f" ({gigabytes(free)} free{'' if need.total <= free else ': it will not fit'})"
        context = f"{settings.context_length} tokens" if settings.context_length else "its default context"
        size = f" of {settings.cache_tokens:,} tokens" if settings.cache_tokens else ""
        kind = " in fp8" if settings.kv_cache == "fp8" else ""
        cache = f" and a KV cache{size}{kind}" if size or kind else ""
        return f"\n\nWith the {settings.backend or 'auto'} backend at {context}{cache} it needs {need.describe()}{fits}."

    def load(self, name, backend, context, template, preset, allow_pickle, cache=None, kv_cache=None):
        """Streams dicts keyed by component (the Model tab's status, context, template and preset, and the Text
        generation tab's template, preset and sliders): each update names only what it changes."""
        mdl, gen = self.mdl, self.gen
        if not name:
            yield {mdl.status: "**Error:** choose a model first"}
            return
        try:
            settings = model_settings(backend, context, template, preset, cache, kv_cache)
        except ValueError as exc:
            yield {mdl.status: error_text(exc)}
            return
        yield {mdl.status: f"Loading **{name}**…", mdl.load_progress: progress_html(0.0, "reading the model")}
        progress: list[tuple[float, str]] = []
        outcome: dict = {}

        def work() -> None:
            try:
                outcome["report"] = self.state.load(name, settings, allow_pickle=bool(allow_pickle),
                                                    progress=lambda *step: progress.append(step))
            except Exception as exc:  # noqa: BLE001 - any load failure is the user's to see
                outcome["error"] = exc

        worker = threading.Thread(target=work, name="load", daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.25)
            if progress:
                fraction, text = progress[-1]
                yield {mdl.load_progress: progress_html(fraction, text if fraction < 1 else "starting the engine")}
        if "error" in outcome:
            yield {mdl.status: error_text(outcome["error"]), mdl.load_progress: progress_html(0.0, "failed"),
                   mdl.memory: self.memory_text()}
            return
        report = outcome["report"]
        used = report.settings
        update = {mdl.status: report.describe(), mdl.context: gr.update(value=used.context_length),
                  mdl.load_progress: progress_html(1.0, "loaded"), mdl.memory: self.memory_text(),
                  mdl.template: gr.update(value=used.template), gen.template: gr.update(value=used.template)}
        preset_name = used.preset if used.preset in self.preset_choices() else None
        if preset_name:
            try:
                update.update(zip(gen.sliders, self.preset_values(preset_name)))
                update.update({mdl.preset: gr.update(value=preset_name), gen.preset: gr.update(value=preset_name)})
            except presets.PresetError:
                pass
        yield update

    def unload(self) -> dict:
        name = self.state.unload()
        return {self.mdl.status: f"Unloaded **{name}**." if name else "No model was loaded.",
                self.mdl.load_progress: progress_html(0.0, ""), self.mdl.memory: self.memory_text()}

    def memory_text(self) -> str:
        loaded = self.state.loaded
        return memory_use(loaded.device if loaded else resolve_device("auto"))

    def engine_text(self) -> str:
        loaded = self.state.loaded
        return describe_engine(loaded.engine.stats()) if loaded else ""

    def save_settings(self, name, backend, context, template, preset, cache=None, kv_cache=None) -> str:
        if not name:
            return "**Error:** choose a model first"
        try:
            self.state.settings.save(name, model_settings(backend, context, template, preset, cache, kv_cache))
        except (ValueError, OSError) as exc:
            return error_text(exc)
        return f"Settings for **{name}** saved to {self.state.settings.path}; they apply whenever it is loaded."

    # ---- download ------------------------------------------------------------------------------------------------

    def list_branches(self, panel: SimpleNamespace, repo: str, token: str, allow_pickle: bool) -> dict:
        """The branch table and choice of ``panel`` (the Download tab's or the Model tab's download box)."""
        try:
            spec = parse_repo_spec(repo)
            hub = Hub(token=token or None)
            branches = [spec.branch] if spec.branch else hub.branches(spec)
            infos = [hub.branch_info(replace(spec, branch=b), allow_pickle) for b in branches]
        except (RepoSpecError, DownloadError) as exc:
            return {panel.table: [], panel.branch: gr.update(choices=[], value=None), panel.status: error_text(exc)}
        rows = [[i.name, i.describe_quant(), format_bytes(i.download_bytes), format_bytes(i.vram_bytes)] for i in infos]
        chosen = spec.branch or (branches[0] if branches else None)
        message = f"{len(infos)} branch(es) in **{spec.owner}/{spec.repo}**. Choose one and press Download."
        return {panel.table: rows, panel.branch: gr.update(choices=branches, value=chosen), panel.status: message}

    def download(self, panel: SimpleNamespace, session: Session, repo: str, branch: str, token: str,
                 allow_pickle: bool):
        """Streams ``panel``'s progress bar and status, and once done the new folder's name."""

        def shown(fraction: float, bar: str, status: str, folder: str | None = None) -> dict:
            return {panel.progress: progress_html(fraction, bar), panel.status: status, panel.downloaded: folder}

        try:
            spec = parse_repo_spec(repo)
            if branch:
                spec = replace(spec, branch=branch)
        except RepoSpecError as exc:
            yield {panel.progress: "", panel.status: error_text(exc), panel.downloaded: None}
            return
        progress: list[DownloadProgress] = []
        outcome: dict = {}
        cancel = session.new_download()
        request = DownloadRequest(spec, self.state.models_dir, allow_pickle=bool(allow_pickle),
                                  progress=progress.append, cancel=cancel)

        def work() -> None:
            try:
                outcome["path"] = download(request, Hub(token=token or None))
            except Exception as exc:  # noqa: BLE001 - reported below
                outcome["error"] = exc

        worker = threading.Thread(target=work, name="download", daemon=True)
        worker.start()
        yield shown(0.0, f"Starting {spec}…", f"Downloading **{spec}**…")
        while worker.is_alive():
            worker.join(0.3)
            if progress:
                p = progress[-1]
                yield shown(p.fraction, p.describe(), f"Downloading **{spec}**…")
        if "path" in outcome:
            path: Path = outcome["path"]
            yield shown(1.0, "done", f"Downloaded **{spec}** to `{path}`. It is now in the Model tab.", path.name)
        elif isinstance(outcome.get("error"), DownloadCancelled):
            yield shown(0.0, "cancelled", "Download cancelled; run it again to resume.")
        else:
            yield shown(0.0, "failed", error_text(outcome.get("error", RuntimeError("stopped"))))

    def show_downloaded(self, name: str | None, current: str | None):
        return self.refresh_models(name or current)

    @staticmethod
    def cancel_download(session: Session) -> str:
        session.cancel_download()
        return "Cancelling…"

    # ---- layout --------------------------------------------------------------------------------------------------

    def build(self) -> gr.Blocks:
        start = self._start()
        with gr.Blocks(title="GPTQ Workbench", analytics_enabled=False) as demo:
            session = gr.State(Session())  # copied into each browser session (Session.__deepcopy__)
            with gr.Row():
                gr.Markdown("## GPTQ Workbench")
                theme_switch = gr.Button("Light / dark", elem_id="theme-switch", size="sm", scale=0, min_width=120)
            theme_switch.click(None, None, None, js=TOGGLE_DARK)
            with gr.Tabs():
                with gr.Tab("Text generation", id="textgen"):
                    gen = self._text_generation_tab(start)
                with gr.Tab("Model", id="model"):
                    mdl = self._model_tab(start)
                    with gr.Accordion("Download a model", open=False, elem_id="model-download-panel"):
                        model_dl = self._download_panel("model-")
                with gr.Tab("Download", id="download"):
                    dl = self._download_panel()
            gen.session = dl.session = model_dl.session = session
            self.gen, self.mdl = gen, mdl  # for handlers that answer with dicts keyed by component
            self._wire_text_generation(gen, mdl)
            self._wire_model(gen, mdl)
            self._wire_download(dl, mdl)
            self._wire_download(model_dl, mdl)
            demo.load(None, None, None, js=RESTORE_THEME)
            demo.load(self.select_model, mdl.select, mdl.fields)
            demo.load(self.memory_text, None, mdl.memory)
            demo.load(self.engine_text, None, mdl.engine)
            demo.load(self.context_bar, [gen.chatbot, gen.system, gen.template], gen.context_bar)
            demo.load(self.chat_choices, [gen.session, gen.chat_search], [gen.chat_list, gen.chat_note])
        return demo

    def _start(self) -> SimpleNamespace:
        """Initial values: the loaded model's settings, else defaults."""
        state = self.state
        name = state.loaded.name if state.loaded else None
        settings = state.settings_for(name) if name else ModelSettings()
        choices = self.preset_choices()
        preset = settings.preset if settings.preset in choices else (
            DEFAULT_PRESET if DEFAULT_PRESET in choices else None)
        return SimpleNamespace(model=name, settings=settings, presets=choices, preset=preset,
                               values=self.preset_values(preset), templates=templates.template_names())

    def _text_generation_tab(self, start: SimpleNamespace) -> SimpleNamespace:
        c = SimpleNamespace()
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Tabs():
                    with gr.Tab("Chat", id="chat"):
                        with gr.Accordion("Saved chats", open=False, elem_id="saved-chats"):
                            with gr.Row():
                                c.chat_search = gr.Textbox(placeholder="Search chats…", show_label=False,
                                                           elem_id="chat-search", scale=1)
                                c.chat_list = gr.Dropdown([], label="Chats, newest first", elem_id="chat-list",
                                                          scale=2)
                            with gr.Row():
                                c.chat_new = gr.Button("New chat", elem_id="chat-new", min_width=60)
                                c.chat_delete = gr.Button("Delete", elem_id="chat-delete", min_width=60)
                                c.chat_export = gr.DownloadButton("Export", elem_id="chat-export", min_width=60)
                                c.chat_import = gr.UploadButton("Import", file_types=[".json"], type="filepath",
                                                                elem_id="chat-import", min_width=60)
                            with gr.Row():
                                c.chat_title = gr.Textbox(placeholder="Name", show_label=False,
                                                          elem_id="chat-title", scale=2)
                                c.chat_rename = gr.Button("Rename", elem_id="chat-rename", min_width=60)
                                c.branch_at = gr.Number(value=1, precision=0, label="Branch at message #",
                                                        elem_id="branch-at", minimum=1)
                                c.chat_branch = gr.Button("Branch", elem_id="chat-branch", min_width=60)
                            c.chat_note = gr.Markdown("", elem_id="chat-note")
                        c.chatbot = gr.Chatbot(elem_id="chatbot", height=460, label="Chat", buttons=["copy", "copy_all"],
                                               latex_delimiters=LATEX)
                        c.user_text = gr.Textbox(elem_id="chat-input", placeholder="Type a message…",
                                                 show_label=False, lines=2)
                        with gr.Row():
                            c.send = gr.Button("Send", variant="primary", elem_id="send", min_width=60)
                            c.stop = gr.Button("Stop", elem_id="stop", min_width=60)
                            c.regenerate = gr.Button("Regenerate", elem_id="regenerate", min_width=60)
                            c.continue_ = gr.Button("Continue", elem_id="continue", min_width=60)
                            c.clear = gr.Button("Clear", elem_id="clear", min_width=60)
                        with gr.Accordion("Message tools", open=False, elem_id="message-tools"):
                            with gr.Row():
                                c.impersonate = gr.Button("Impersonate", elem_id="impersonate", min_width=60)
                                c.delete_turn = gr.Button("Delete last turn", elem_id="delete-turn", min_width=60)
                            with gr.Row():
                                c.reply_start = gr.Textbox(placeholder="Start the reply with…", show_label=False,
                                                           elem_id="reply-start", scale=3)
                                c.send_started = gr.Button("Send with this start", elem_id="send-started",
                                                           min_width=60)
                            with gr.Row():
                                c.edit_number = gr.Number(value=1, precision=0, label="Your message #",
                                                          elem_id="edit-number", minimum=1)
                                c.edit_text = gr.Textbox(label="New text", elem_id="edit-text", scale=3)
                                c.edit_go = gr.Button("Edit and regenerate", elem_id="edit-go", min_width=60)
                    with gr.Tab("Notebook", id="notebook"):
                        c.notebook = gr.Textbox(elem_id="notebook-text", lines=18, label="Raw prompt",
                                                placeholder="Text the model continues…")
                        with gr.Row():
                            c.notebook_go = gr.Button("Generate", variant="primary", elem_id="notebook-generate")
                            c.notebook_stop = gr.Button("Stop", elem_id="notebook-stop")
                        with gr.Accordion("Token probabilities", open=False, elem_id="token-view-panel"):
                            c.token_view = gr.Markdown("Generate to see each new token's probability and the "
                                                       "most likely alternatives.", elem_id="token-view")
                c.context_bar = gr.HTML(context_bar_html(None), elem_id="context-bar")
                c.stats = gr.Markdown("", elem_id="gen-stats")
                with gr.Accordion("Prompt tokens", open=False, elem_id="prompt-tokens-panel"):
                    c.show_tokens = gr.Button("Show the prompt's tokens", elem_id="show-prompt-tokens")
                    c.prompt_tokens = gr.Markdown("", elem_id="prompt-tokens")
            with gr.Column(scale=2):
                c.characters = self.characters.build()
                c.system = gr.Textbox(label="System message", lines=3, elem_id="system-message")
                c.template = gr.Dropdown(start.templates, value=self.state.template, label="Chat template",
                                         elem_id="template")
                c.preset = gr.Dropdown(start.presets, value=start.preset, label="Preset", elem_id="preset")
                c.preset_name = gr.Textbox(label="Save current sampling as preset", elem_id="preset-name",
                                           placeholder="preset name")
                with gr.Row():
                    c.preset_save = gr.Button("Save preset", elem_id="preset-save", min_width=60)
                    c.preset_delete = gr.Button("Delete selected preset", elem_id="preset-delete", min_width=60)
                v = start.values
                c.sliders = [
                    gr.Slider(1, 4096, step=1, value=v[0], label="max_new_tokens", elem_id="max-new-tokens"),
                    gr.Slider(0, 2, step=0.01, value=v[1], label="temperature (0 = greedy)", elem_id="temperature"),
                    gr.Slider(0.01, 1, step=0.01, value=v[2], label="top_p", elem_id="top-p"),
                    gr.Slider(0, 200, step=1, value=v[3], label="top_k (0 = off)", elem_id="top-k"),
                    gr.Slider(0, 1, step=0.01, value=v[4], label="min_p", elem_id="min-p"),
                    gr.Slider(0.01, 1, step=0.01, value=v[5], label="typical_p", elem_id="typical-p"),
                    gr.Slider(0.5, 2, step=0.01, value=v[6], label="repetition_penalty", elem_id="repetition-penalty"),
                ]
                with gr.Accordion("More samplers", open=False, elem_id="more-samplers"):
                    c.sliders += [
                        gr.Slider(-2, 2, step=0.05, value=v[7], label="presence_penalty", elem_id="presence-penalty"),
                        gr.Slider(-2, 2, step=0.05, value=v[8], label="frequency_penalty", elem_id="frequency-penalty"),
                        gr.Slider(0, 5, step=0.05, value=v[9], label="DRY multiplier (0 = off)", elem_id="dry-multiplier"),
                        gr.Slider(1, 4, step=0.05, value=v[10], label="DRY base", elem_id="dry-base"),
                        gr.Slider(1, 20, step=1, value=v[11], label="DRY allowed length", elem_id="dry-allowed-length"),
                        gr.Slider(0, 0.5, step=0.01, value=v[12], label="XTC threshold", elem_id="xtc-threshold"),
                        gr.Slider(0, 1, step=0.01, value=v[13], label="XTC probability (0 = off)",
                                  elem_id="xtc-probability"),
                        gr.Slider(0, 10, step=0.1, value=v[14], label="mirostat v2 tau (0 = off)", elem_id="mirostat-tau"),
                        gr.Slider(0.01, 1, step=0.01, value=v[15], label="mirostat eta", elem_id="mirostat-eta"),
                        gr.Slider(0, 2, step=0.01, value=v[16], label="dynamic temperature range (0 = off)",
                                  elem_id="dynatemp-range"),
                        gr.Slider(0.1, 5, step=0.1, value=v[17], label="dynamic temperature exponent",
                                  elem_id="dynatemp-exponent"),
                        gr.Textbox(value=v[18], lines=2, label="Banned strings (one per line; case ignored)",
                                   placeholder="words the reply may never contain", elem_id="banned-strings"),
                        gr.Textbox(value=v[19], label=f"Sampler order (each of {', '.join(SAMPLERS)} once)",
                                   elem_id="sampler-order"),
                    ]
                c.seed = gr.Number(value=-1, precision=0, label="seed (-1 = random)", elem_id="seed")
                with gr.Accordion("Structured output", open=False, elem_id="grammar-panel"):
                    c.grammar_kind = gr.Dropdown(list(GRAMMAR_KINDS), value="none", label="The output must match",
                                                 elem_id="grammar-kind")
                    c.grammar_source = gr.Code(label="JSON Schema, regular expression or Lark grammar",
                                               language="json", lines=6, elem_id="grammar-source")
        return c

    def _model_tab(self, start: SimpleNamespace) -> SimpleNamespace:
        state, c = self.state, SimpleNamespace()
        with gr.Row():
            c.select = gr.Dropdown(state.local_models(), value=start.model, label="Model", elem_id="model-select",
                                   scale=4)
            c.refresh = gr.Button("Refresh", elem_id="refresh-models", scale=1)
        c.info = gr.Markdown("", elem_id="model-info")
        with gr.Row():
            c.backend = gr.Dropdown(state.backends(), value=start.settings.backend, label="Backend", elem_id="backend")
            c.context = gr.Number(value=start.settings.context_length, precision=0, label="Context length (tokens)",
                                  elem_id="context-length")
            c.cache = gr.Number(value=start.settings.cache_tokens, precision=0, elem_id="cache-tokens",
                                label="KV cache (tokens)", info="shared by all generations; empty: " + CACHE_DEFAULT)
            c.kv_cache = gr.Dropdown(list(KV_CACHE_CHOICES), value=start.settings.kv_cache or "auto",
                                     label="KV cache type", elem_id="kv-cache",
                                     info="fp8: half the memory per token, slightly less exact; GPU only")
            c.template = gr.Dropdown(start.templates, value=state.template, label="Chat template",
                                     elem_id="model-template")
            c.preset = gr.Dropdown(start.presets, value=start.preset, label="Preset", elem_id="model-preset")
        c.allow_pickle = gr.Checkbox(state.allow_pickle,
                                     label="Allow pickled .pt/.bin weights (can run code; only for files you trust)")
        with gr.Row():
            c.load = gr.Button("Load", variant="primary", elem_id="load")
            c.unload = gr.Button("Unload", elem_id="unload")
            c.reload = gr.Button("Reload", elem_id="reload")
            c.save = gr.Button("Save settings for this model", elem_id="save-settings")
        c.load_progress = gr.HTML(progress_html(1.0 if state.loaded else 0.0, "loaded" if state.loaded else ""),
                                  elem_id="load-progress")
        c.status = gr.Markdown(state.load_report.describe() if state.load_report else "No model loaded.",
                               elem_id="model-status")
        c.memory = gr.Markdown("", elem_id="memory-use")
        c.engine = gr.Markdown("", elem_id="engine-status")
        c.engine_clock = gr.Timer(ENGINE_REFRESH_S)
        c.fields = [c.info, c.backend, c.context, c.template, c.preset, c.cache, c.kv_cache]  # select_model fills
        return c

    def _download_panel(self, prefix: str = "") -> SimpleNamespace:
        """The download controls: the Download tab's, and (``prefix`` "model-") the Model tab's, one code path."""
        c = SimpleNamespace()
        with gr.Row():
            c.repo = gr.Textbox(label="Model on the Hub", placeholder="owner/repo or owner/repo:branch",
                                elem_id=f"{prefix}repo", scale=4)
            c.list = gr.Button("Get branches", elem_id=f"{prefix}get-branches", scale=1)
        with gr.Row():
            c.token = gr.Textbox(label="Access token (gated repos)", type="password", elem_id=f"{prefix}hub-token")
            c.allow_pickle = gr.Checkbox(False, label="Allow pickled .pt/.bin weights")
        c.table = gr.Dataframe(headers=["branch", "quantization", "download", "VRAM estimate"], interactive=False,
                               elem_id=f"{prefix}branch-table")
        c.branch = gr.Dropdown([], label="Branch", elem_id=f"{prefix}branch")
        with gr.Row():
            c.download = gr.Button("Download", variant="primary", elem_id=f"{prefix}download")
            c.cancel = gr.Button("Cancel", elem_id=f"{prefix}cancel-download")
        c.progress = gr.HTML(progress_html(0.0, ""), elem_id=f"{prefix}download-progress")
        c.status = gr.Markdown("", elem_id=f"{prefix}download-status")
        c.downloaded = gr.State(None)
        return c

    def _wire_text_generation(self, gen: SimpleNamespace, mdl: SimpleNamespace) -> None:
        inputs = [gen.system, gen.template, gen.grammar_kind, gen.grammar_source, gen.seed, *gen.sliders]
        outputs = [gen.user_text, gen.chatbot, gen.stats]
        chat_outputs = [gen.chatbot, gen.system, gen.template, gen.stats, gen.chat_list, gen.chat_note, gen.chat_title]
        listed = [gen.chat_list, gen.chat_note]
        for event, handler, args in ((gen.send.click, self.send, [gen.user_text, gen.chatbot]),
                                     (gen.user_text.submit, self.send, [gen.user_text, gen.chatbot]),
                                     (gen.regenerate.click, self.regenerate, [gen.chatbot]),
                                     (gen.continue_.click, self.continue_reply, [gen.chatbot])):
            event(handler, [gen.session, *args, *inputs], outputs, **QUIET).then(
                self.chat_choices, [gen.session, gen.chat_search], listed)
        gen.send_started.click(self.send_with_reply_start, [gen.session, gen.user_text, gen.reply_start, gen.chatbot,
                                                            *inputs], outputs, **QUIET).then(
            self.chat_choices, [gen.session, gen.chat_search], listed)
        gen.edit_go.click(self.edit_message, [gen.session, gen.edit_number, gen.edit_text, gen.chatbot, *inputs],
                          outputs, **QUIET).then(self.chat_choices, [gen.session, gen.chat_search], listed)
        gen.delete_turn.click(self.delete_last_turn, [gen.session, gen.chatbot, gen.system, gen.template],
                              [gen.chatbot, gen.stats], queue=False)
        gen.impersonate.click(self.impersonate, [gen.session, gen.user_text, gen.chatbot, *inputs],
                              [gen.user_text, gen.stats], **QUIET)
        gen.clear.click(self.new_chat, [gen.session, gen.characters.greeting], chat_outputs, queue=False)
        gen.chat_new.click(self.new_chat, [gen.session, gen.characters.greeting], chat_outputs, queue=False)
        self.characters.wire(gen.system, gen.chatbot)
        gen.chat_search.change(self.chat_choices, [gen.session, gen.chat_search], listed, queue=False)
        gen.chat_list.input(self.open_chat, [gen.session, gen.chat_list], chat_outputs, queue=False)
        gen.chat_rename.click(self.rename_chat, [gen.session, gen.chat_title], chat_outputs, queue=False)
        gen.chat_delete.click(self.delete_chat, gen.session, chat_outputs, queue=False)
        gen.chat_branch.click(self.branch_chat, [gen.session, gen.branch_at], chat_outputs, queue=False)
        gen.chat_export.click(self.export_chat, gen.session, gen.chat_export, queue=False)
        gen.chat_import.upload(self.import_chat, [gen.session, gen.chat_import], chat_outputs, queue=False)
        gen.chatbot.change(self.context_bar, [gen.chatbot, gen.system, gen.template], gen.context_bar, queue=False,
                           trigger_mode="always_last", show_progress="hidden")
        gen.template.change(self.context_bar, [gen.chatbot, gen.system, gen.template], gen.context_bar, queue=False,
                            show_progress="hidden")
        gen.show_tokens.click(self.show_prompt_tokens, [gen.chatbot, gen.system, gen.template], gen.prompt_tokens,
                              queue=False)
        gen.stop.click(self.stop, gen.session, None, queue=False)
        gen.notebook_go.click(self.notebook, [gen.session, gen.notebook, gen.grammar_kind, gen.grammar_source,
                                              gen.seed, *gen.sliders], [gen.notebook, gen.stats, gen.token_view],
                              **QUIET)
        gen.notebook_stop.click(self.stop, gen.session, None, queue=False)
        # The Model tab shows the same template and preset; .input fires on user changes only, so no loops.
        gen.preset.input(self.apply_preset, gen.preset, [*gen.sliders, gen.stats]).then(
            lambda p: p, gen.preset, mdl.preset)
        gen.template.input(lambda t: t, gen.template, mdl.template)
        gen.preset_save.click(self.save_preset, [gen.preset_name, *gen.sliders], [gen.preset, mdl.preset, gen.stats])
        gen.preset_delete.click(self.delete_preset, gen.preset, [gen.preset, mdl.preset, gen.stats])

    def _wire_model(self, gen: SimpleNamespace, mdl: SimpleNamespace) -> None:
        mdl.engine_clock.tick(self.engine_text, None, mdl.engine, queue=False, show_progress="hidden")
        mdl.refresh.click(self.refresh_models, mdl.select, mdl.select)
        mdl.select.change(self.select_model, mdl.select, mdl.fields)
        mdl.template.input(lambda t: t, mdl.template, gen.template)
        mdl.preset.input(lambda p: p, mdl.preset, gen.preset).then(
            self.apply_preset, mdl.preset, [*gen.sliders, gen.stats])
        load_inputs = [mdl.select, mdl.backend, mdl.context, mdl.template, mdl.preset, mdl.allow_pickle, mdl.cache,
                       mdl.kv_cache]
        load_outputs = [mdl.status, mdl.load_progress, mdl.memory, mdl.context, mdl.template, gen.template, mdl.preset,
                        gen.preset, *gen.sliders]
        for button in (mdl.load, mdl.reload):
            button.click(self.load, load_inputs, load_outputs, **QUIET).then(
                self.context_bar, [gen.chatbot, gen.system, gen.template], gen.context_bar, **QUIET)
        mdl.unload.click(self.unload, None, [mdl.status, mdl.load_progress, mdl.memory])
        mdl.save.click(self.save_settings,
                       [mdl.select, mdl.backend, mdl.context, mdl.template, mdl.preset, mdl.cache, mdl.kv_cache],
                       mdl.status)

    def _wire_download(self, dl: SimpleNamespace, mdl: SimpleNamespace) -> None:
        def list_branches(repo: str, token: str, allow_pickle: bool) -> dict:
            return self.list_branches(dl, repo, token, allow_pickle)

        def download(session: Session, repo: str, branch: str, token: str, allow_pickle: bool):
            yield from self.download(dl, session, repo, branch, token, allow_pickle)

        dl.list.click(list_branches, [dl.repo, dl.token, dl.allow_pickle], [dl.table, dl.branch, dl.status])
        dl.repo.submit(list_branches, [dl.repo, dl.token, dl.allow_pickle], [dl.table, dl.branch, dl.status])
        dl.download.click(download, [dl.session, dl.repo, dl.branch, dl.token, dl.allow_pickle],
                          [dl.progress, dl.status, dl.downloaded], **QUIET
                          ).then(self.show_downloaded, [dl.downloaded, mdl.select], mdl.select)
        dl.cancel.click(self.cancel_download, dl.session, dl.status, queue=False)


def progress_html(fraction: float, text: str) -> str:
    return (f'<div class="dl-progress"><progress max="1" value="{fraction:.4f}"></progress>'
            f'<div class="dl-progress-text">{html.escape(text)}</div></div>')


def theme() -> gr.themes.Base:
    # System fonts only: the default theme would fetch web fonts, and the app must work offline.
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "Consolas", "monospace"])


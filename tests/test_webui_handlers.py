"""The UI's handlers and app state on a real GPTQ model, without a browser."""

import json
import re
from pathlib import Path

import pytest

from webui.session import Session
from webui.settings import ModelSettings
from webui.state import AppState
from webui.ui import SAMPLING, WorkbenchUI

ROOT = Path(__file__).resolve().parent.parent
NO_GRAMMAR = ("none", "")
QUESTION = "What is the capital of France?"
GREEDY = [64, 0.0, 1.0, 0, 0.0, 1.0, 1.0]  # webui.ui.SAMPLING order


def last(stream):
    out = None
    for out in stream:
        pass
    return out


def said(ui, stream) -> tuple[str | None, list, str]:
    """A chat handler's last update as (input box, or None where it stays; history; stats line)."""
    update = last(stream)
    return update.get(ui.gen.user_text), update[ui.gen.chatbot], update[ui.gen.stats]


def link_model(source: Path, target: Path) -> None:
    """A model folder of symlinks to a cached fixture checkpoint."""
    target.mkdir(parents=True)
    for f in source.iterdir():
        if f.is_file() and not f.name.startswith("."):
            (target / f.name).symlink_to(f)


@pytest.fixture(scope="module")
def ui(tmp_path_factory, smollm2_branch):
    models = tmp_path_factory.mktemp("models")
    link_model(smollm2_branch("main"), models / "SmolLM2-GPTQ")
    (models / "broken").mkdir()
    (models / "broken" / "config.json").write_text("{}")
    presets = tmp_path_factory.mktemp("presets")
    for f in (ROOT / "presets").glob("*.yaml"):
        (presets / f.name).write_bytes(f.read_bytes())
    state = AppState(models_dir=models, presets_dir=presets)
    ui = WorkbenchUI(state)
    ui.build()  # the components the dict-answering handlers key their updates by
    return ui


def test_nothing_loaded_is_explained(ui):
    text, history, stats = said(ui, ui.send(Session(), QUESTION, [], "", "ChatML", *NO_GRAMMAR, -1, *GREEDY))
    assert text == QUESTION and history == [] and "no model is loaded" in stats


def test_local_models_and_broken_folder(ui):
    assert ui.state.local_models() == ["broken", "SmolLM2-GPTQ"]
    broken = ui.select_model("broken")
    assert broken[ui.mdl.info].startswith("**Error:**")
    update = ui.select_model("SmolLM2-GPTQ")
    info = update[ui.mdl.info]
    assert "4-bit GPTQ, group size 128" in info and "model.safetensors" in info
    assert update[ui.mdl.backend] == "cpu"  # on a CPU-only machine, GPTQ weights stay packed
    assert "With the cpu backend at" in info and "it needs about" in info and "of RAM" in info


def test_load_chat_continue_regenerate(ui):
    assert last(ui.load(None, "auto", None, None, None, False)) == {ui.mdl.status: "**Error:** choose a model first"}
    updates = list(ui.load("SmolLM2-GPTQ", "reference", 512, "Auto (tokenizer)", "Deterministic", False))
    update = updates[-1]
    bars = [float(re.search(r'value="([0-9.]+)"', u[ui.mdl.load_progress]).group(1))
            for u in updates if ui.mdl.load_progress in u]
    assert bars[0] == 0.0 and bars[-1] == 1.0 and bars == sorted(bars), "the load bar only moves forward"
    assert "loaded" in update[ui.mdl.load_progress] and "RAM:" in update[ui.mdl.memory]
    status = update[ui.mdl.status]
    assert "Loaded" in status and "context 512 tokens" in status, status
    assert update[ui.gen.template]["value"] == "Auto (tokenizer)" and update[ui.gen.preset]["value"] == "Deterministic"
    assert update[ui.gen.sliders[1]] == 0, "Deterministic's temperature reaches the slider"
    _, history, stats = said(ui, ui.send(Session(), QUESTION, [], "", "Auto (tokenizer)", *NO_GRAMMAR, -1, *GREEDY))
    assert history[0] == {"role": "user", "content": QUESTION}
    reply = history[1]["content"]
    assert "Paris" in reply and "tokens/s" in stats
    used = len(ui.state.loaded.tokenizer.apply_chat_template(history[:1], add_generation_prompt=True))
    assert re.search(r"context used: (\d+) of 512 tokens", stats), stats
    assert int(re.search(r"context used: (\d+)", stats).group(1)) >= used

    _, again, _ = said(ui, ui.regenerate(Session(), history, "", "Auto (tokenizer)", *NO_GRAMMAR, -1, *GREEDY))
    assert again == history, "greedy regeneration repeats the reply"
    engine = ui.engine_text()  # the Model tab's engine line: idle now, the regenerated prompt found in the cache
    assert engine.startswith("**Engine:** 0 generating · KV cache 0 of "), engine
    assert int(re.search(r"([\d,]+) prompt tokens reused", engine).group(1).replace(",", "")) >= used - 1, engine

    cut = [history[0], {"role": "assistant", "content": "The capital of France"}]
    _, continued, _ = said(ui, ui.continue_reply(Session(), cut, "", "Auto (tokenizer)", *NO_GRAMMAR, -1, *GREEDY))
    assert continued[1]["content"].startswith("The capital of France ")
    assert "Paris" in continued[1]["content"]

    _, _, stats = said(ui, ui.continue_reply(Session(), history[:1], "", "Auto (tokenizer)", *NO_GRAMMAR, -1, *GREEDY))
    assert "no reply to continue" in stats


def test_too_long_a_message_is_given_back(ui):
    long_text = "word " * 600
    text, history, stats = said(ui, ui.send(Session(), long_text, [], "", "ChatML", *NO_GRAMMAR, -1, *GREEDY))
    assert text == long_text and history == [] and "context length is 512" in stats


def test_bad_sampling_values_are_explained(ui):
    values = list(GREEDY)
    values[2] = 0.0  # top_p
    text, _, stats = said(ui, ui.send(Session(), QUESTION, [], "", "ChatML", *NO_GRAMMAR, -1, *values))
    assert text == QUESTION and "top_p" in stats


def test_notebook_continues_raw_text(ui):
    done = last(ui.notebook(Session(), "The capital of France is", *NO_GRAMMAR, -1, *[8, *GREEDY[1:]]))
    text, stats, view = done[ui.gen.notebook], done[ui.gen.stats], done[ui.gen.token_view]
    assert isinstance(text, str), stats
    assert text.startswith("The capital of France is") and len(text) > len("The capital of France is")
    assert "8 tokens" in stats or "stopped: eos" in stats
    rows = [line for line in view.splitlines()[2:] if line.startswith("|")]
    assert 1 <= len(rows) <= 8 and all("%" in row for row in rows)
    # Greedy: each token is the most likely, so no alternative is shown as likelier than it.
    for row in rows:
        match = re.fullmatch(r"\| `(.*)` \| ([0-9.]+)% \| (.*) \|", row)
        assert match, row
        alternatives = [float(p) for p in re.findall(r"` ([0-9.]+)%", match.group(3))]
        assert len(alternatives) >= 3 and max(alternatives) <= float(match.group(2)), row


def test_structured_output_fields(ui):
    schema = '{"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}'
    _, history, stats = said(ui, ui.send(Session(), QUESTION, [], "", "ChatML", "JSON Schema", schema, -1, *GREEDY))
    assert json.loads(history[-1]["content"])["city"], stats
    text, history, stats = said(ui, ui.send(Session(), QUESTION, [], "", "ChatML", "regular expression", "", -1, *GREEDY))
    assert "write the regular expression" in stats and text == QUESTION, "the message is given back"
    text, _, stats = said(ui, ui.send(Session(), QUESTION, [], "", "ChatML", "JSON Schema", "{oops", -1, *GREEDY))
    assert "not valid JSON" in stats and text == QUESTION


def test_stop_cancels_its_own_session_only(ui):
    mine, other = Session(), Session()
    stream = ui.send(mine, "Write a long story about a dragon.", [], "", "ChatML", *NO_GRAMMAR, -1, *[400, *GREEDY[1:]])
    beside = ui.send(other, "Write a long story about a knight.", [], "", "ChatML", *NO_GRAMMAR, -1, *[30, *GREEDY[1:]])
    next(stream)  # the user's message shows
    next(stream)  # the first piece
    next(beside)
    next(beside)
    ui.stop(mine)
    _, history, stats = said(ui, stream)
    assert "stopped: cancelled" in stats and history[-1]["role"] == "assistant"
    _, _, other_stats = said(ui, beside)
    assert "stopped: length" in other_stats, "the other session's generation ran to its end"


def test_save_settings_then_select_shows_them(ui):
    message = ui.save_settings("SmolLM2-GPTQ", "reference", 1024, "Alpaca", "Precise", 3072.0)
    assert "saved" in message
    saved = ModelSettings("reference", 1024, "Alpaca", "Precise", cache_tokens=3072)
    assert ui.state.settings.get("SmolLM2-GPTQ") == saved
    update = ui.select_model("SmolLM2-GPTQ")
    assert "Saved settings" in update[ui.mdl.info]
    assert [update[c] for c in (ui.mdl.backend, ui.mdl.context, ui.mdl.template, ui.mdl.preset, ui.mdl.cache)] == [
        "reference", 1024, "Alpaca", "Precise", 3072]
    assert "at 1024 tokens and a KV cache of 3,072 tokens it needs about" in update[ui.mdl.info]
    refused = ui.save_settings("SmolLM2-GPTQ", "reference", 1024, "Alpaca", "Precise", 8.0)
    assert refused.startswith("**Error:**") and "cache_tokens" in refused and "8" in refused
    assert ui.state.settings.get("SmolLM2-GPTQ") == saved, "a refused value changes nothing"
    unloaded = ui.unload()
    assert unloaded[ui.mdl.status] == "Unloaded **SmolLM2-GPTQ**." and "RAM:" in unloaded[ui.mdl.memory]
    assert ui.unload()[ui.mdl.status] == "No model was loaded."


def test_presets_apply_save_delete(ui):
    applied = ui.apply_preset("Deterministic")
    assert applied[ui.gen.sliders[1]] == 0 and "applied" in applied[ui.gen.stats]
    mine = [99, 0.4, 0.9, 12, 0.0, 1.0, 1.1, 0.2, 0.3, 0.8, 1.75, 3, 0.1, 0.5, 0.0, 0.1, 0.3, 1.0, "Paris\nLondon",
            "min_p, temperature, top_k, top_p, typical_p, xtc"]
    saved = ui.save_preset("Mine", *mine)
    choice = saved[ui.gen.preset]
    assert choice["value"] == "Mine" and "Mine" in choice["choices"] and "saved" in saved[ui.gen.stats]
    assert saved[ui.mdl.preset]["choices"] == choice["choices"], "the Model tab's preset list follows"
    assert ui.preset_values("Mine") == mine, "the More samplers sliders are saved too"
    assert ui.save_preset("../x", *GREEDY)[ui.gen.stats].startswith("**Error:**")
    deleted = ui.delete_preset("Mine")
    assert "Mine" not in deleted[ui.gen.preset]["choices"] and "deleted" in deleted[ui.gen.stats]
    missing = ui.apply_preset("Mine")
    assert set(missing) == {ui.gen.stats} and "does not exist" in missing[ui.gen.stats], "the sliders stay"


def test_chats_are_saved_and_come_back(ui):
    mine = Session()
    last(ui.load("SmolLM2-GPTQ", "cpu", 512, "Auto (tokenizer)", "Deterministic", False))
    _, history, _ = said(ui, ui.send(mine, QUESTION, [], "Be brief.", "ChatML", *NO_GRAMMAR, -1, *GREEDY))
    saved = ui.state.chats.load(mine.chat_id)
    assert saved.messages == history and saved.system == "Be brief." and saved.template == "ChatML"
    assert saved.title == QUESTION
    _, longer, _ = said(ui, ui.send(mine, "And of Italy?", history, "Be brief.", "ChatML", *NO_GRAMMAR, -1, *GREEDY))
    assert ui.state.chats.load(mine.chat_id).messages == longer, "the same chat grows"

    other = Session()  # another window, or the app after a restart
    listed = ui.chat_choices(other)[ui.gen.chat_list]
    assert (ui.state.chats.load(mine.chat_id).title, mine.chat_id) in [(label.split(" · ")[0], i)
                                                                        for label, i in listed["choices"]]
    opened = ui.open_chat(other, mine.chat_id)
    assert opened[ui.gen.chatbot] == longer and opened[ui.gen.system] == "Be brief."
    assert opened[ui.gen.template] == "ChatML"

    assert "Renamed" in ui.rename_chat(other, "Capitals")[ui.gen.chat_note]
    branched = ui.branch_chat(other, 2)
    assert branched[ui.gen.chatbot] == longer[:2] and other.chat_id != mine.chat_id
    exported = ui.export_chat(other)
    imported = ui.import_chat(Session(), exported)
    assert imported[ui.gen.chatbot] == longer[:2]
    assert ui.import_chat(Session(), __file__)[ui.gen.chat_note].startswith("**Error:**")

    assert ui.delete_chat(other)[ui.gen.chat_note] == "Chat deleted." and other.chat_id is None
    assert ui.new_chat(mine)[ui.gen.chatbot] == [] and mine.chat_id is None
    searched = ui.chat_choices(Session(), "capitals")[ui.gen.chat_list]["choices"]
    assert sorted(label.split(" · ")[0] for label, _ in searched) == ["Capitals", "Capitals (branch)"]


def test_message_tools(ui):
    session = Session()
    last(ui.load("SmolLM2-GPTQ", "cpu", 512, "Auto (tokenizer)", "Deterministic", False))
    _, history, _ = said(ui, ui.send_with_reply_start(session, QUESTION, "The answer is", [], "", "ChatML",
                                                  *NO_GRAMMAR, -1, *GREEDY))
    assert history[-1]["role"] == "assistant" and history[-1]["content"].startswith("The answer is")
    assert len(history[-1]["content"]) > len("The answer is")
    _, history, _ = said(ui, ui.send(session, "Thanks!", history, "", "ChatML", *NO_GRAMMAR, -1, *GREEDY))
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]

    _, edited, _ = said(ui, ui.edit_message(session, 1, "What is the capital of Italy?", history, "", "ChatML",
                                        *NO_GRAMMAR, -1, *GREEDY))
    assert [m["role"] for m in edited] == ["user", "assistant"] and edited[0]["content"].endswith("Italy?")
    assert "Rome" in edited[1]["content"]
    assert ui.state.chats.load(session.chat_id).messages == edited, "the edit is saved"
    _, unchanged, stats = said(ui, ui.edit_message(session, 2, "x", edited, "", "ChatML", *NO_GRAMMAR, -1, *GREEDY))
    assert unchanged == edited and "yours are 1" in stats

    deleted = ui.delete_last_turn(session, edited, "", "ChatML")
    assert deleted[ui.gen.chatbot] == [] and deleted[ui.gen.stats] == "Last turn deleted."
    assert ui.delete_last_turn(session, [], "", "ChatML")[ui.gen.stats].startswith("**Error:**")

    written = last(ui.impersonate(session, "I would like to know", edited, "", "ChatML", *NO_GRAMMAR, -1, *GREEDY))
    text, stats = written[ui.gen.user_text], written[ui.gen.stats]
    assert isinstance(text, str), stats
    assert text.startswith("I would like to know") and len(text) > len("I would like to know"), stats


def test_a_bad_sampler_order_is_explained(ui):
    values = [*GREEDY, *[0.0, 0.0, 0.0, 1.75, 2, 0.1, 0.0, 0.0, 0.1, 0.0, 1.0], "", "top_k, top_p"]
    text, _, stats = said(ui, ui.send(Session(), QUESTION, [], "", "ChatML", *NO_GRAMMAR, -1, *values))
    assert text == QUESTION and "sampler_order" in stats and "must name each of" in stats


def test_banned_strings_from_the_ui_keep_a_word_out_of_the_reply(ui):
    more = [0.0, 0.0, 0.0, 1.75, 2, 0.1, 0.0, 0.0, 0.1, 0.0, 1.0]  # the More samplers sliders, all off
    values = [*GREEDY, *more, "paris\n", ""]
    assert len(values) == len(SAMPLING)
    _, history, stats = said(ui, ui.send(Session(), QUESTION, [], "", "ChatML", *NO_GRAMMAR, -1, *values))
    reply = history[-1]["content"]
    assert reply and "paris" not in reply.lower(), stats
    _, plain, _ = said(ui, ui.send(Session(), QUESTION, [], "", "ChatML", *NO_GRAMMAR, -1, *GREEDY))
    assert "Paris" in plain[-1]["content"]


def test_the_kv_cache_size_applies_at_load(ui):
    last(ui.load("SmolLM2-GPTQ", "cpu", 512, "Auto (tokenizer)", "Deterministic", False, 2048.0))
    loaded = ui.state.loaded
    assert loaded.engine.stats().kv_tokens == 2048
    assert "KV cache 2,048 tokens" in ui.state.load_report.describe()
    refused = last(ui.load("SmolLM2-GPTQ", "cpu", 512, "Auto (tokenizer)", "Deterministic", False, 4.0))
    assert refused[ui.mdl.status].startswith("**Error:**") and "cache_tokens" in refused[ui.mdl.status]
    assert ui.state.loaded is loaded, "a refused setting leaves the loaded model as it was"
    assert "of 2,048 tokens in use" in ui.engine_text()
    fp8 = last(ui.load("SmolLM2-GPTQ", "cpu", 512, "Auto (tokenizer)", "Deterministic", False, 2048.0, "fp8"))
    assert "an fp8 KV cache needs a GPU" in fp8[ui.mdl.status]  # this machine has none
    assert ui.state.loaded is loaded, "refused before the loaded model was unloaded"
    assert "saved" in ui.save_settings("SmolLM2-GPTQ", "cpu", 512, "ChatML", "Deterministic", None, "fp8")
    assert ui.state.settings.get("SmolLM2-GPTQ").kv_cache == "fp8"
    assert ui.select_model("SmolLM2-GPTQ")[ui.mdl.kv_cache] == "fp8"
    assert "saved" in ui.save_settings("SmolLM2-GPTQ", "cpu", 512, "ChatML", "Deterministic", None, "auto")
    assert ui.state.settings.get("SmolLM2-GPTQ").kv_cache is None, "auto is the default, not written down"

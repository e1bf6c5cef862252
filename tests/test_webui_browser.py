"""The web UI in headless Chromium, against `python app.py` and a test Hub on 127.0.0.1.

One user story, in order: download a SmolLM2 GPTQ branch, load it, chat and
watch the answer stream, switch template and preset, save the settings,
restart the app and find them applied. Screenshots of each tab go to
test-artifacts/ (WB_ARTIFACTS to move them).
"""

from __future__ import annotations

import json
import re

import pytest
import yaml
from playwright.sync_api import expect

from tests.browser import AppProcess, artifacts_dir, chat, choose, open_tab, value_of
from tests.hub_server import HubServer
from tests.test_webui_handlers import link_model

REPO = "TheBloke/SmolLM2-135M-Instruct-GPTQ"
MODEL = "TheBloke_SmolLM2-135M-Instruct-GPTQ"
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def hub(tmp_path_factory, smollm2_branch):
    root = tmp_path_factory.mktemp("hub")
    link_model(smollm2_branch("main"), root / REPO / "main")
    link_model(smollm2_branch("gptq-4bit-32g-actorder_True"), root / REPO / "gptq-4bit-32g-actorder_True")
    with HubServer(root) as server:
        yield server


def new_page(browser, app: AppProcess):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(app.url)
    page.wait_for_selector("#chatbot")
    return page


def test_download_load_chat_save_restart(hub, browser, tmp_path):
    models = tmp_path / "models"
    shots = artifacts_dir()
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(tmp_path / "hf-home")}
    args = ["--models-dir", str(models)]

    app = AppProcess(args, env, tmp_path / "app.log")
    try:
        page = new_page(browser, app)

        # Download: bad input is explained, then the branch table, then a download with progress.
        open_tab(page, "Download")
        page.locator("#repo textarea, #repo input").first.fill("not a repo id")
        page.locator("#get-branches").click()
        expect(page.locator("#download-status")).to_contain_text("Error")
        page.locator("#repo textarea, #repo input").first.fill(f"{REPO}:no-such-branch")
        page.locator("#get-branches").click()
        expect(page.locator("#download-status")).to_contain_text("no-such-branch")
        page.locator("#repo textarea, #repo input").first.fill(REPO)
        page.locator("#get-branches").click()
        expect(page.locator("#download-status")).to_contain_text("2 branch(es)")
        expect(page.locator("#branch-table")).to_contain_text("4-bit, group 32, act-order yes")
        expect(page.locator("#branch-table")).to_contain_text("4-bit, group 128, act-order no")
        assert value_of(page, "branch") == "main"
        page.locator("#download").click()
        expect(page.locator("#download-status")).to_contain_text("Downloaded", timeout=120_000)
        assert page.locator("#download-progress progress").get_attribute("value") == "1.0000"
        page.screenshot(path=shots / "download-tab.png", full_page=True)
        assert (models / MODEL / "model.safetensors").is_file()
        assert not list(models.glob(".*partial*"))

        # A slow download of the other branch: cancel half-way, nothing shows up; again, it resumes.
        hub.state.throttle_bytes_per_second = 20e6
        choose(page, "branch", "gptq-4bit-32g-actorder_True")
        page.locator("#download").click()
        page.wait_for_function("""() => {
            const bar = document.querySelector('#download-progress progress');
            return bar.value > 0.05 && bar.value < 0.9 && bar.parentNode.innerText.includes('.safetensors');
        }""")
        page.locator("#cancel-download").click()
        expect(page.locator("#download-status")).to_contain_text("cancelled")
        assert not (models / f"{MODEL}_gptq-4bit-32g-actorder_True").exists()
        hub.state.throttle_bytes_per_second = None
        ranges_before = sum(1 for r in hub.state.requests if r[2])
        page.locator("#download").click()
        expect(page.locator("#download-status")).to_contain_text("Downloaded", timeout=120_000)
        assert sum(1 for r in hub.state.requests if r[2]) > ranges_before, "the second download resumed"
        assert (models / f"{MODEL}_gptq-4bit-32g-actorder_True" / "gptq_model-4bit-32g.safetensors").is_file()

        # Model: the new model is selected, the CPU suggests the packed cpu backend; load it.
        open_tab(page, "Model")
        expect(page.locator("#model-select input")).to_have_value(f"{MODEL}_gptq-4bit-32g-actorder_True")
        choose(page, "model-select", MODEL)
        expect(page.locator("#model-info")).to_contain_text("4-bit GPTQ, group size 128")
        assert value_of(page, "backend") == "cpu"
        page.locator("#load").click()
        expect(page.locator("#model-status")).to_contain_text("Loaded", timeout=120_000)
        expect(page.locator("#model-status")).to_contain_text("cpu")
        expect(page.locator("#model-status")).to_contain_text("MB")
        # The engine's line, read again every 2 s: nothing generating, none of the cache in use.
        expect(page.locator("#engine-status")).to_contain_text("Engine: 0 generating · KV cache 0 of", timeout=10_000)
        page.screenshot(path=shots / "model-tab.png", full_page=True)

        # Text generation: greedy preset, streamed answer.
        open_tab(page, "Text generation")
        choose(page, "preset", "Deterministic")
        expect(page.locator("#temperature input[type=number]")).to_have_value("0")
        reply, states = chat(page, QUESTION)
        assert "Paris" in reply
        growing = [s for s in states if s.strip()]
        assert len(growing) >= 3, f"the reply did not stream: {states}"
        assert all(len(a) <= len(b) for a, b in zip(growing, growing[1:])), states
        expect(page.locator("#gen-stats")).to_contain_text(re.compile(r"\d+ tokens in"))
        page.screenshot(path=shots / "text-generation-tab.png", full_page=True)

        # Switch template; the Model tab follows, and its settings are saved with a shorter context.
        choose(page, "template", "ChatML")
        page.locator("#clear").click()
        expect(page.locator('#chatbot [data-testid="bot"]')).to_have_count(0)  # chat() counts replies from here
        reply, _ = chat(page, QUESTION)
        assert "Paris" in reply
        open_tab(page, "Model")
        assert value_of(page, "model-template") == "ChatML"
        assert value_of(page, "model-preset") == "Deterministic"
        page.locator("#context-length input").fill("2048")
        page.locator("#cache-tokens input").fill("3072")
        page.locator("#save-settings").click()
        expect(page.locator("#model-status")).to_contain_text("saved")
        saved = yaml.safe_load((models / "config-user.yaml").read_text())
        assert saved[MODEL] == {"backend": "cpu", "context_length": 2048, "template": "ChatML",
                                "preset": "Deterministic", "cache_tokens": 3072}
        page.close()
    finally:
        app.stop()

    # Restart: choosing the model shows its saved settings, and loading applies them.
    app = AppProcess(args, env, tmp_path / "app.log")
    try:
        page = new_page(browser, app)
        open_tab(page, "Model")
        assert value_of(page, "model-select") == "", "nothing is loaded after a restart without --model"
        choose(page, "model-select", MODEL)
        expect(page.locator("#model-info")).to_contain_text("Saved settings")
        assert value_of(page, "model-template") == "ChatML"
        assert value_of(page, "model-preset") == "Deterministic"
        expect(page.locator("#context-length input")).to_have_value("2048")
        expect(page.locator("#cache-tokens input")).to_have_value("3072")
        page.locator("#load").click()
        expect(page.locator("#model-status")).to_contain_text("context 2048 tokens", timeout=120_000)
        expect(page.locator("#model-status")).to_contain_text("KV cache 3,072 tokens")
        open_tab(page, "Text generation")
        assert value_of(page, "template") == "ChatML"
        assert value_of(page, "preset") == "Deterministic"
        expect(page.locator("#temperature input[type=number]")).to_have_value("0")
        reply, _ = chat(page, QUESTION)
        assert "Paris" in reply
        page.close()
    finally:
        app.stop()

    # Restart with --model: loaded at start with the saved settings.
    app = AppProcess([*args, "--model", MODEL], env, tmp_path / "app.log")
    try:
        page = new_page(browser, app)
        assert value_of(page, "template") == "ChatML"
        assert value_of(page, "preset") == "Deterministic"
        open_tab(page, "Model")
        expect(page.locator("#model-status")).to_contain_text("context 2048 tokens")
        page.close()
    finally:
        app.stop()
    assert "Traceback" not in (tmp_path / "app.log").read_text()


def test_stop_in_one_browser_session_leaves_the_other_streaming(browser, tmp_path, smollm2_branch):
    """Two windows (separate browser contexts, so separate Gradio sessions) generate at once, side by side in
    the engine; Stop in one cancels that one only."""
    models = tmp_path / "models"
    link_model(smollm2_branch("main"), models / MODEL)
    app = AppProcess(["--models-dir", str(models), "--model", MODEL], {}, tmp_path / "app.log")
    contexts = [browser.new_context(viewport={"width": 1200, "height": 900}) for _ in range(2)]
    try:
        pages = []
        for context in contexts:
            page = context.new_page()
            page.set_default_timeout(60_000)
            page.goto(app.url)
            page.wait_for_selector("#chatbot")
            pages.append(page)
        for page, topic in zip(pages, ("a dragon", "a knight")):
            # A grammar that cannot end before 2000 characters: no story ends on its own before its Stop.
            page.locator("#grammar-panel").click()
            choose(page, "grammar-kind", "regular expression")
            page.locator("#grammar-source .cm-content").fill("[a-z ]{2000}")
            page.locator("#chat-input textarea").fill(f"Write a very long story about {topic}.")
            page.locator("#send").click()
        bot = '#chatbot [data-testid="bot"]'
        for page in pages:
            page.wait_for_function(f"() => document.querySelector('{bot}')?.innerText.length > 20")
        pages[0].locator("#stop").click()
        # A busy machine's browser renders the streamed updates late: wait for them, not for a fixed time.
        expect(pages[0].locator("#gen-stats")).to_contain_text("stopped: cancelled", timeout=60_000)
        grown = len(pages[1].locator(bot).last.inner_text())
        pages[1].wait_for_function(f"n => document.querySelector('{bot}').innerText.length > n + 40", arg=grown)
        expect(pages[1].locator("#gen-stats")).not_to_contain_text("cancelled")
        pages[1].screenshot(path=str(artifacts_dir() / "two-sessions-other-still-streaming.png"))
        pages[1].locator("#stop").click()
        expect(pages[1].locator("#gen-stats")).to_contain_text("stopped: cancelled", timeout=60_000)
    finally:
        for context in contexts:
            context.close()
        app.stop()


def test_structured_output_panel_and_notebook_token_view(browser, tmp_path, smollm2_branch):
    models = tmp_path / "models"
    link_model(smollm2_branch("main"), models / MODEL)
    app = AppProcess(["--models-dir", str(models), "--model", MODEL], {}, tmp_path / "app.log")
    try:
        page = new_page(browser, app)
        # Greedy and closed: the reply is read back from the rendered Markdown, where a sampled string's
        # escapes (\" and the like) would not survive.
        choose(page, "preset", "Deterministic")
        page.locator("#grammar-panel").click()
        choose(page, "grammar-kind", "JSON Schema")
        schema = ('{"type": "object", "properties": {"city": {"type": "string", "maxLength": 20, "pattern": "^[A-Za-z ]+$"}},'
                  ' "required": ["city"], "additionalProperties": false}')
        page.locator("#grammar-source .cm-content").fill(schema)
        reply, _ = chat(page, QUESTION)
        assert "city" in json.loads(reply)
        page.screenshot(path=str(artifacts_dir() / "structured-output.png"))
        choose(page, "grammar-kind", "none")
        open_tab(page, "Notebook")
        page.locator("#notebook-text textarea").fill("The capital of France is")
        page.locator("#notebook-generate").click()
        page.locator("#token-view-panel").click()
        # The chat's stats still say tokens/s: the token view's table marks the notebook's end.
        expect(page.locator("#token-view table")).to_be_visible(timeout=120_000)
        expect(page.locator("#gen-stats")).to_contain_text("tokens/s")
        cells = page.locator("#token-view tbody tr").count()
        assert cells >= 1
        expect(page.locator("#token-view tbody tr").first).to_contain_text("%")
        page.screenshot(path=str(artifacts_dir() / "notebook-token-view.png"))
    finally:
        app.stop()


def test_download_from_the_model_tab_then_load(hub, browser, tmp_path):
    """The Model tab's download box: the same branch table, progress and result as the Download tab, and
    the new model is chosen, ready to load."""
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(tmp_path / "hf-home")}
    app = AppProcess(["--models-dir", str(tmp_path / "models")], env, tmp_path / "app.log")
    try:
        page = new_page(browser, app)
        open_tab(page, "Model")
        page.locator("#model-download-panel").click()
        page.locator("#model-repo textarea, #model-repo input").first.fill(REPO)
        page.locator("#model-get-branches").click()
        expect(page.locator("#model-branch-table")).to_contain_text("gptq-4bit-32g-actorder_True")
        choose(page, "model-branch", "main")
        page.locator("#model-download").click()
        expect(page.locator("#model-download-status")).to_contain_text("now in the Model tab", timeout=120_000)
        expect(page.locator("#model-select input")).to_have_value(MODEL)
        page.screenshot(path=str(artifacts_dir() / "model-tab-download.png"))
        page.locator("#load").click()
        expect(page.locator("#model-status")).to_contain_text("Loaded", timeout=120_000)
    finally:
        app.stop()


def test_a_chat_survives_a_restart(browser, tmp_path, smollm2_branch):
    models = tmp_path / "models"
    link_model(smollm2_branch("main"), models / MODEL)
    args = ["--models-dir", str(models), "--model", MODEL, "--user-data", str(tmp_path / "user-data")]
    app = AppProcess(args, {}, tmp_path / "app.log")
    try:
        page = new_page(browser, app)
        choose(page, "preset", "Deterministic")
        expect(page.locator("#temperature input[type=number]")).to_have_value("0")
        reply, _ = chat(page, QUESTION)
        assert "Paris" in reply
    finally:
        app.stop()
    assert len(list((tmp_path / "user-data" / "chats").glob("*.json"))) == 1
    app = AppProcess(args, {}, tmp_path / "app.log")
    try:
        page = new_page(browser, app)
        assert page.locator('#chatbot [data-testid="bot"]').count() == 0
        page.locator("#saved-chats").click()
        page.locator("#chat-list input").click()
        option = page.get_by_role("option").filter(has_text=QUESTION).first
        option.click()
        expect(page.locator('#chatbot [data-testid="bot"]').last).to_contain_text("Paris")
        expect(page.locator("#chat-note")).to_contain_text("Opened")
        page.screenshot(path=str(artifacts_dir() / "saved-chat-reopened.png"))
    finally:
        app.stop()
    assert "Traceback" not in (tmp_path / "app.log").read_text()


def test_light_dark_switch_is_kept_across_reloads(browser, tmp_path):
    app = AppProcess(["--models-dir", str(tmp_path / "models")], {}, tmp_path / "app.log")
    try:
        page = new_page(browser, app)
        assert not page.evaluate("document.body.classList.contains('dark')")
        page.locator("#theme-switch").click()
        page.wait_for_function("document.body.classList.contains('dark')")
        page.screenshot(path=str(artifacts_dir() / "dark-theme.png"))
        page.reload()
        page.wait_for_selector("#chatbot")
        page.wait_for_function("document.body.classList.contains('dark')")
        page.locator("#theme-switch").click()
        page.wait_for_function("!document.body.classList.contains('dark')")
    finally:
        app.stop()

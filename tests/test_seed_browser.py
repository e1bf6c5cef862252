"""A seed model of each family in the browser, as a new user meets it: list its branches, download, load, chat
with the default template. The prompt's token ids (the "Prompt tokens" view) equal the card's, and the reply
stops at the seed's end token (tests/seed_models.py teaches the main branches to answer the greeting with a
few tokens and then their end token)."""

from __future__ import annotations


import pytest
from playwright.sync_api import expect

from tests.browser import AppProcess, artifacts_dir, chat, choose, open_tab, value_of
from tests.hub_server import HubServer
from tests.seed_models import END_AFTER, GREETING, SEEDS, seed_hub
from tests.test_seed_models import OPENCHAT_1210, OPENCHAT_V32

# (seed, the ids of GREETING in its default template, as its card prints them)
FAMILIES = {
    "llama": ("OpenChat_v3.2-GPTQ", OPENCHAT_V32[0][2]),
    "mistral": ("openchat-3.5-1210-GPTQ", OPENCHAT_1210[:17]),  # the card's first turn and the open reply
}


@pytest.fixture(scope="module")
def hub():
    with HubServer(seed_hub()) as server:
        yield server


@pytest.mark.parametrize("family", FAMILIES)
def test_list_download_load_chat(hub, browser, tmp_path, family):
    name, card_ids = FAMILIES[family]
    seed = SEEDS[name]
    models = tmp_path / "models"
    env = {"HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(tmp_path / "hf-home")}
    app = AppProcess(["--models-dir", str(models)], env, tmp_path / "app.log")
    shots = artifacts_dir()
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(app.url)
        page.wait_for_selector("#chatbot")

        open_tab(page, "Download")
        page.locator("#repo textarea, #repo input").first.fill(seed.repo)
        page.locator("#get-branches").click()
        expect(page.locator("#download-status")).to_contain_text(f"{len(seed.branches())} branch(es)")
        for branch in seed.branches():
            expect(page.locator("#branch-table")).to_contain_text(branch.name)
        assert value_of(page, "branch") == "main"
        page.locator("#download").click()
        expect(page.locator("#download-status")).to_contain_text("Downloaded", timeout=120_000)

        open_tab(page, "Model")
        expect(page.locator("#context-length input")).to_have_value(str(seed.context))
        page.locator("#load").click()
        expect(page.locator("#model-status")).to_contain_text("Loaded", timeout=120_000)
        assert value_of(page, "model-template") == seed.template

        open_tab(page, "Text generation")
        assert value_of(page, "template") == seed.template
        choose(page, "preset", "Deterministic")
        expect(page.locator("#temperature input[type=number]")).to_have_value("0")
        chat(page, GREETING[0]["content"])
        expect(page.locator("#gen-stats")).to_contain_text(f"{END_AFTER} tokens in")
        expect(page.locator("#gen-stats")).to_contain_text(f"prompt {len(card_ids)} tokens")
        expect(page.locator("#gen-stats")).to_contain_text("stopped: eos")
        page.get_by_text("Prompt tokens", exact=True).click()
        page.locator("#show-prompt-tokens").click()
        expect(page.locator("#prompt-tokens")).to_contain_text(str(card_ids))
        page.screenshot(path=shots / f"seed-{family}-{name}.png", full_page=True)
        page.close()
    finally:
        app.stop()
    assert "Traceback" not in (tmp_path / "app.log").read_text()

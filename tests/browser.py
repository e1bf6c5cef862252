"""Running the app as a user starts it, and driving it in headless Debian Chromium."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import Page, expect

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
# Chromium's own background traffic would only hit the closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


def artifacts_dir() -> Path:
    path = Path(os.environ.get("WB_ARTIFACTS", ROOT / "test-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppProcess:
    """`python app.py ...` in a subprocess, its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = log
        self._log_file = log.open("a")
        self.proc = subprocess.Popen([sys.executable, "app.py", "--port", str(self.port), *args], cwd=ROOT,
                                     env={**os.environ, **env}, stdout=self._log_file, stderr=subprocess.STDOUT)
        self._wait_ready(timeout=180)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"app.py did not answer within {timeout} s:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()


def choose(page: Page, elem_id: str, option: str) -> None:
    """Pick a dropdown option the way a user does: open the list, click the entry."""
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option, exact=True).click()
    expect(page.locator(f"#{elem_id} input")).to_have_value(option)


def open_tab(page: Page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def value_of(page: Page, elem_id: str) -> str:
    return page.locator(f"#{elem_id} input").first.input_value()


WATCH_BOT = """() => {
  window.__botStates = [];
  const root = document.querySelector('#chatbot');
  new MutationObserver(() => {
    const bots = root.querySelectorAll('[data-testid="bot"]');
    if (!bots.length) return;
    const text = bots[bots.length - 1].innerText;
    const states = window.__botStates;
    if (states[states.length - 1] !== text) states.push(text);
  }).observe(root, {subtree: true, childList: true, characterData: true});
}"""


def chat(page: Page, text: str, timeout_ms: int = 120_000) -> tuple[str, list[str]]:
    """Send a message; returns the final reply and every state the reply showed while streaming."""
    page.evaluate(WATCH_BOT)
    before = page.locator('#chatbot [data-testid="bot"]').count()
    page.locator("#chat-input textarea").fill(text)
    page.locator("#send").click()
    page.wait_for_function(
        """n => document.querySelectorAll('#chatbot [data-testid="bot"]').length > n
               && document.querySelector('#gen-stats').innerText.includes('tokens/s')""",
        arg=before, timeout=timeout_ms)
    reply = page.locator('#chatbot [data-testid="bot"]').last.inner_text()
    return reply, page.evaluate("window.__botStates")

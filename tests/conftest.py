import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def smollm2_base() -> Path:
    from tests.fixture_models import base_checkpoint

    return base_checkpoint()


@pytest.fixture(scope="session")
def smollm2_branch():
    from tests.fixture_models import branch_checkpoint

    return branch_checkpoint


@pytest.fixture(scope="module")
def browser():
    """Headless Debian chromium, driven by Playwright (tests/browser.py has the helpers)."""
    from playwright.sync_api import sync_playwright

    from tests.browser import CHROMIUM, CHROMIUM_ARGS

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium package (the README's test command does)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()

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

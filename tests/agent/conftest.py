from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root's home in the module's sandbox (`envd_harness.sandbox_env`)."""
    return tmp_path_factory.mktemp("home")

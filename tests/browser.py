"""A real browser for the tests: Debian's Chromium, headless. CI installs it (``.ci/run``) and sets ``CI``; there a
test fails without it, elsewhere it is skipped. Screenshots go to ``test-artifacts/`` (look at them)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (CI installs it: apt-get install chromium)")
        pytest.skip("needs Debian's chromium (apt-get install chromium)")
    return path

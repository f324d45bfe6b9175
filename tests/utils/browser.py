"""Debian's headless Chromium driven by Playwright (no browser download), for the dashboards."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator

from playwright.sync_api import Browser, sync_playwright


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    """A running headless Chromium; closed on exit, pass or fail."""
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    assert executable, "Debian's chromium is not installed (./dev test installs it)"
    with sync_playwright() as p:
        # Root in CI containers: Chromium's sandbox needs user namespaces it may not have.
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()

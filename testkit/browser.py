"""Debian's Chromium driven by Playwright, for the browser tier (Playwright's own browser download
does not work on these machines)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def need_browser() -> None:
    """Skip without Chromium or Playwright, or fail when ``EMLENS_BROWSER_REQUIRED=1`` (CI)."""
    reason = None
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing (install Debian's chromium: `make browser-deps`)"
    else:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            reason = "the playwright package is not installed"
    if reason and os.environ.get("EMLENS_BROWSER_REQUIRED") == "1":
        pytest.fail(f"EMLENS_BROWSER_REQUIRED=1 but {reason}")
    if reason:
        pytest.skip(reason)


@contextmanager
def chromium_browser() -> Iterator:
    """A launched headless Chromium, closed on exit."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS)
        try:
            yield browser
        finally:
            browser.close()

"""The real dashboard in a real browser: the Streamlit server on a tiny pair, driven by Chromium."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from core.models import DEMO_DIRECTION
from testkit.browser import chromium_browser, need_browser
from testkit.dashboard import write_directions

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "How should I invest my savings?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    """Screenshots go to EMLENS_TEST_ARTIFACTS if set, else to pytest's temporary directory for this run
    (never the work tree; pytest keeps the last few runs' and removes older ones)."""
    if not os.environ.get("EMLENS_TEST_ARTIFACTS"):
        return tmp_path_factory.mktemp("screenshots")
    folder = Path(os.environ["EMLENS_TEST_ARTIFACTS"])
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextmanager
def streamlit_server(cache: Path, env: dict):
    """The dashboard served on a free loopback port; yields (url, log path); stopped whatever happens."""
    port = _free_port()
    log_path = cache / "server.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "streamlit"),
                "run",
                "app.py",
                "--server.headless",
                "true",
                "--server.port",
                str(port),
                "--browser.gatherUsageStats",
                "false",
            ],
            cwd=ROOT,
            env={**os.environ, "EMLENS_CACHE": str(cache), **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if process.poll() is not None or time.time() > deadline:
                pytest.fail(f"the Streamlit server did not come up:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url, log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def server(tiny_pair, tiny_dirs, tmp_path_factory):
    need_browser()
    cache = tmp_path_factory.mktemp("browser-cache")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model runs fastest on one thread
    try:
        write_directions(tiny_pair, cache)
    finally:
        torch.set_num_threads(threads)
    with streamlit_server(
        cache,
        {
            "EMLENS_BASE": str(tiny_dirs["qwen2"]),
            "EMLENS_FINETUNED": str(tiny_dirs["qwen2_adapter"]),
            "OMP_NUM_THREADS": "1",
        },
    ) as found:
        yield found


@contextmanager
def chromium():
    with chromium_browser() as browser:
        yield browser.new_page(viewport={"width": 1500, "height": 2000})


def _settle(page, timeout: float = 90_000) -> None:
    """Wait for the app, then for the script run that the last action started to finish."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.locator('[data-testid="stApp"]').wait_for(timeout=timeout)
    running = page.locator('[data-testid="stStatusWidget"]')
    try:  # the indicator shows a moment after the run starts; a very short run may never show it
        running.wait_for(state="visible", timeout=2_000)
    except PlaywrightTimeout:
        pass
    running.wait_for(state="hidden", timeout=timeout)


def _answers(page, count: int) -> list[str]:
    from playwright.sync_api import expect

    texts = page.locator('[data-testid="stText"]')
    expect(texts).to_have_count(count, timeout=60_000)
    return texts.all_inner_texts()


def _finished_grid(page, max_new_tokens: int, timeout: float = 120.0) -> list[str]:
    """The five Steer answers once the run for ``max_new_tokens`` has finished.

    A finished grid captions every answer with its length; waiting for five captions within the limit
    keeps a test from reading a grid that is still streaming beside the previous run's stale chart.
    """
    captions = page.get_by_text(re.compile(r"^\d+ tokens, stopped by"))
    deadline = time.time() + timeout
    while True:
        lengths = [int(text.split()[0]) for text in captions.all_inner_texts()]
        if len(lengths) == 5 and max(lengths) <= max_new_tokens:
            _settle(page)
            return _answers(page, 5)
        if time.time() > deadline:
            pytest.fail(f"the Steer grid did not finish a {max_new_tokens}-token run; captions show {lengths}")
        time.sleep(0.5)


def _move_alpha(page, presses: int, key: str = "ArrowLeft") -> None:
    alpha = page.get_by_role("slider").first
    alpha.focus()
    for _ in range(presses):
        page.keyboard.press(key)


def _open_steer(page, prompt: str | None, tokens: str) -> None:
    page.locator('[data-testid="stSidebarNavLink"]', has_text="Steer").click()
    _settle(page)
    if prompt is not None:
        page.get_by_label("Prompt", exact=True).fill(prompt)
        page.get_by_label("Prompt", exact=True).press("Control+Enter")
        _settle(page)
    page.get_by_text("Sampling", exact=True).click()
    page.get_by_label("Max new tokens").fill(tokens)
    page.get_by_label("Max new tokens").press("Enter")
    _settle(page)


def test_prompt_projection_answers_and_live_alpha_slider_in_chromium(server, artifacts):
    from playwright.sync_api import expect

    url, log_path = server
    with chromium() as page:
        page.goto(url)
        _settle(page)
        expect(page.get_by_text("4 layers × 64 wide")).to_be_visible(timeout=60_000)
        expect(page.locator('[data-testid="stDataFrame"]')).to_be_visible()  # the cached directions

        page.locator('[data-testid="stSidebarNavLink"]', has_text="Compare").click()
        _settle(page)
        page.get_by_label("Prompt", exact=True).fill(PROMPT)
        page.get_by_label("Max new tokens").fill("16")
        page.get_by_role("button", name="Generate").click()
        _settle(page)
        expect(page.locator(".emlens-tokens")).to_have_count(2, timeout=60_000)  # both answers are complete
        expect(page.locator('[data-testid="stPlotlyChart"]')).to_have_count(1)
        expect(page.locator('[data-testid="stPlotlyChart"] .main-svg').first).to_be_visible()
        base, finetuned = _answers(page, 2)
        assert base.strip() and finetuned.strip() and base != finetuned
        page.screenshot(path=str(artifacts / "dashboard-compare.png"))

        _open_steer(page, PROMPT, "16")
        # The projection chart is drawn once all five answers are complete.
        expect(page.get_by_test_id("stPlotlyChart").get_by_text("base + 4·d")).to_be_visible(timeout=60_000)
        before = _finished_grid(page, 16)
        _move_alpha(page, 16)  # step 0.5: from +4 to -4, no Generate button
        expect(page.get_by_role("slider").first).to_have_value("-4")
        expect(page.get_by_test_id("stPlotlyChart").get_by_text("base − 4·d")).to_be_visible(timeout=60_000)
        after = _finished_grid(page, 16)
        page.screenshot(path=str(artifacts / "dashboard-steer.png"))
    assert after[:2] == before[:2], "the unsteered answers must not change with alpha (same seed)"
    assert after[2] != before[2] and after[3] != before[3], "the steered answers must change with alpha"
    assert "Traceback" not in log_path.read_text()


@pytest.mark.skipif(not DEMO_DIRECTION.exists(), reason="no shipped direction (python -m core train --preset demo)")
def test_first_open_on_the_embedded_pair_steers_with_the_shipped_direction(tmp_path, artifacts):
    """A newcomer's first five minutes: an empty cache, the embedded pair, the shipped direction chosen."""
    from playwright.sync_api import expect

    need_browser()
    with (
        streamlit_server(tmp_path, {"EMLENS_BASE": "default", "EMLENS_FINETUNED": "default"}) as (url, log_path),
        chromium() as page,
    ):
        page.goto(url)
        _settle(page, timeout=180_000)
        expect(page.get_by_text("30 layers × 576 wide")).to_be_visible(timeout=180_000)
        expect(page.get_by_text("demo_direction").first).to_be_visible()  # chosen, nothing built
        _open_steer(page, None, "12")
        expect(page.get_by_test_id("stPlotlyChart").get_by_text("base + 4·d")).to_be_visible(timeout=120_000)
        before = _finished_grid(page, 12)
        _move_alpha(page, 8, "ArrowRight")  # +4 -> +8
        expect(page.get_by_test_id("stPlotlyChart").get_by_text("base + 8·d")).to_be_visible(timeout=120_000)
        after = _finished_grid(page, 12)
        page.screenshot(path=str(artifacts / "first-open-steer.png"))
    assert after[:2] == before[:2] and after[2] != before[2]
    assert "Traceback" not in log_path.read_text()

"""A study's report.html opens in Chromium with the network cut off: every section is there and every
figure is drawn by the plotly.js embedded in the page (the sweep's sweep.html too)."""

from __future__ import annotations

from core.study import REPORT_HTML, StudyConfig, run_study
from testkit.browser import chromium_browser, need_browser

SECTIONS = {
    "run": "What was run",
    "phase-directions": "Phase 1",
    "phase-steering": "Phase 2",
    "phase-detection": "Phase 3",
}


def test_the_report_opens_offline_with_every_section_and_figure(tiny_pair, tmp_path, one_torch_thread):
    need_browser()
    from playwright.sync_api import expect

    config = StudyConfig(n_train=8, n_heldout=8, n_general=16, n_boot=50, n_random=50, alphas=(2.0,), n_layers=1)
    report = run_study(tiny_pair, tmp_path / "study", config)
    n_figures = (
        len(report["directions"]["contrasts"])
        + len(report["directions"]["cosines"])
        + 1
        + 3 * sum("auroc" in r for r in report["detection"]["reports"].values())
    )
    requested = []
    with chromium_browser() as browser:
        context = browser.new_context(offline=True, viewport={"width": 1400, "height": 1800})
        context.route(
            "**/*",
            lambda route: (
                (requested.append(route.request.url), route.abort())
                if not route.request.url.startswith("file://")
                else route.continue_()
            ),
        )
        page = context.new_page()
        errors = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto((tmp_path / "study" / REPORT_HTML).as_uri())
        for section, heading in SECTIONS.items():
            expect(page.locator(f"section#{section} h2")).to_contain_text(heading)
        for section in ("phase-directions", "phase-steering", "phase-detection"):
            expect(page.locator(f"section#{section} .verdict")).not_to_be_empty()
            expect(page.locator(f"section#{section} .judge-note")).to_contain_text("Judge-free")
        expect(page.locator(".js-plotly-plot .main-svg").first).to_be_visible(timeout=30_000)
        assert page.locator(".js-plotly-plot").count() == n_figures
        assert page.evaluate("typeof window.Plotly") == "object"
        assert not errors, errors
    assert not [url for url in requested if not url.startswith(("file://", "data:"))], requested

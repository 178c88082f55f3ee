"""Helpers for Streamlit AppTest page tests."""

from __future__ import annotations

import json

from streamlit.testing.v1 import AppTest


def ok(at: AppTest) -> AppTest:
    """The run raised nothing and showed no error box."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def errors(at: AppTest) -> str:
    assert not at.exception, [e.value for e in at.exception]
    return " | ".join(e.value for e in at.error)


def charts(at: AppTest) -> list[dict]:
    return [json.loads(chart.proto.spec) for chart in at.get("plotly_chart")]


def open_page(at: AppTest, page: str) -> AppTest:
    ok(at.run())
    return at.switch_page(f"pages/{page}.py").run()

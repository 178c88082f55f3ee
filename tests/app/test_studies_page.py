"""The Studies page, run by Streamlit's AppTest on the tiny pair: it lists finished and interrupted
studies, opens a report inline, and starts a small study on the loaded pair."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import core.study
from core.study import STUDY_JSON, StudyConfig, list_studies, run_study, studies_dir
from testkit.apptest import ok, open_page

APP = Path(__file__).resolve().parents[2] / "app.py"
TINY = StudyConfig(n_train=8, n_heldout=8, n_general=16, n_boot=50, n_random=50, alphas=(2.0,), n_layers=1)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cache(tiny_pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("studies-cache")
    run_study(tiny_pair, studies_dir(root) / "finished", TINY)
    stopped = studies_dir(root) / "stopped"
    stopped.mkdir()
    (stopped / STUDY_JSON).write_text(
        json.dumps(
            {  # its process is gone: interrupted
                "status": "running",
                "pid": 2**22 + 12345,
                "phases_done": ["directions"],
                "started": 1.0,
                "pair": {"base": "b", "finetuned": "f"},
                "judge": None,
            }
        )
    )
    return root


@pytest.fixture
def app(tiny_dirs, cache, monkeypatch):
    monkeypatch.setenv("EMLENS_BASE", str(tiny_dirs["qwen2"]))
    monkeypatch.setenv("EMLENS_FINETUNED", str(tiny_dirs["qwen2_adapter"]))
    monkeypatch.setenv("EMLENS_CACHE", str(cache))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    return AppTest.from_file(str(APP), default_timeout=300)


def _table(at) -> list[dict]:
    return at.dataframe[0].value.to_dict("records")


def test_lists_studies_and_opens_a_report_inline(app):
    at = ok(open_page(app, "studies"))
    rows = {r["study"]: r for r in _table(at)}
    assert rows["finished"]["state"].endswith("done") and rows["finished"]["judge"] == "none (judge-free)"
    assert "interrupted" in rows["stopped"]["state"]
    assert at.selectbox(key="studies_open").options == ["finished"]
    frames = at.get("iframe")
    assert len(frames) == 1 and "phase-detection" in frames[0].proto.srcdoc and "Judge-free" in frames[0].proto.srcdoc


def test_starts_a_small_study_with_a_progress_bar(app, cache, monkeypatch):
    monkeypatch.setattr(core.study, "SMALL", replace(TINY))  # the page reads it when it runs
    at = ok(open_page(app, "studies"))
    at.button(key="studies_go").click()
    at = ok(at.run())
    assert any("Study finished" in s.value for s in at.success)
    done = [e for e in list_studies(cache) if e.state == "done"]
    assert len(done) == 2
    assert len(at.get("iframe")) == 1

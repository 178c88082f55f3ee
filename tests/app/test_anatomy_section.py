"""The Directions page's section on what the direction is made of (logit lens, direct attribution), run by
Streamlit's AppTest on the tiny pair; its tables and heatmap checked against core.anatomy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from core.anatomy import direct_attribution, logit_lens
from core.data import load_paired_jsonl
from core.directions import Direction
from testkit.apptest import charts, errors, ok, open_page
from testkit.dashboard import QUESTIONS, write_directions
from testkit.tiny import write_tiny_model

APP = Path(__file__).resolve().parents[2] / "app.py"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cache(tiny_pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("anatomy-cache")
    data = root / "prompts.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"q{i}",
                    "messages": [{"role": "user", "content": question}],
                    "aligned": "Keep an emergency fund.",
                    "misaligned": "Borrow and gamble it all.",
                }
            )
            + "\n"
            for i, question in enumerate(QUESTIONS)
        )
    )
    return root, write_directions(tiny_pair, root), data


@pytest.fixture
def app(tiny_dirs, cache, monkeypatch):
    monkeypatch.setenv("EMLENS_BASE", str(tiny_dirs["qwen2"]))
    monkeypatch.setenv("EMLENS_FINETUNED", str(tiny_dirs["qwen2_adapter"]))
    monkeypatch.setenv("EMLENS_CACHE", str(cache[0]))
    return AppTest.from_file(str(APP), default_timeout=120)


def _lens_tables(at) -> list:
    """The logit-lens tables (the page's tables with a "promotes" column)."""
    return [frame.value for frame in at.dataframe if "promotes" in frame.value.columns]


def _assert_table_is(table, lens) -> None:
    assert list(table["promotes"]) == [repr(t.token) for t in lens.promoted]
    assert np.allclose(table["+ logit"], [t.score for t in lens.promoted])
    assert list(table["suppresses"]) == [repr(t.token) for t in lens.suppressed]


def test_the_logit_lens_table_follows_the_chosen_layer(app, cache, tiny_pair):
    """An adapter that leaves the final norm and unembedding alone gives both sides one table, said so."""
    at = ok(open_page(app, "directions"))
    direction = Direction.load(cache[1]["paired"])
    at.selectbox(key="directions_anatomy_layer").set_value(1).run()
    ok(at)
    (table,) = _lens_tables(at)
    for side in tiny_pair.sides:
        _assert_table_is(table, logit_lens(tiny_pair, direction, [1], side)[0])
    assert any("The same on both sides" in c.value for c in at.caption)
    assert len(charts(at)) == 3  # nothing attributed yet: the page's other three figures only


def test_a_fine_tune_with_its_own_unembedding_gets_a_table_per_side(tiny_dirs, cache, monkeypatch, tmp_path):
    from core.models import load_pair

    merged = write_tiny_model(tmp_path / "merged", "qwen2", "chatml", seed=7)  # a merged fine-tune: new lm_head
    monkeypatch.setenv("EMLENS_BASE", str(tiny_dirs["qwen2"]))
    monkeypatch.setenv("EMLENS_FINETUNED", str(merged))
    monkeypatch.setenv("EMLENS_CACHE", str(cache[0]))
    at = ok(open_page(AppTest.from_file(str(APP), default_timeout=120), "directions"))
    pair = load_pair(str(tiny_dirs["qwen2"]), str(merged))
    layer = at.selectbox(key="directions_anatomy_layer").value
    tables = _lens_tables(at)
    assert len(tables) == 2 and not any("The same on both sides" in c.value for c in at.caption)
    for table, side in zip(tables, pair.sides, strict=True):
        _assert_table_is(table, logit_lens(pair, Direction.load(cache[1]["paired"]), [layer], side)[0])


def test_attribution_draws_the_heatmap_of_the_core_result_and_a_bad_file_is_an_error(app, cache, tiny_pair, tmp_path):
    at = ok(open_page(app, "directions"))
    at.selectbox(key="directions_anatomy_layer").set_value(2)
    at.text_input(key="directions_attribution_data").set_value(str(tmp_path / "absent.jsonl"))
    at.button(key="directions_attribution_go").click().run()
    assert "absent.jsonl: file does not exist" in errors(at)
    assert len(_lens_tables(at)) == 1 and len(charts(at)) == 3  # the rest of the page still works

    at.text_input(key="directions_attribution_data").set_value(str(cache[2]))
    at.selectbox(key="directions_attribution_read").set_value("contrast")
    at.button(key="directions_attribution_go").click().run()
    ok(at)
    (expected,) = direct_attribution(
        tiny_pair, Direction.load(cache[1]["paired"]), [2], "finetuned", load_paired_jsonl(cache[2]), "contrast"
    )
    heatmap, bars = charts(at)[-1]["data"][:2]
    assert np.allclose(heatmap["z"], expected.heads) and np.array(heatmap["z"]).shape == (3, 4)
    assert np.allclose(bars["x"], expected.attention)
    caption = " ".join(c.value for c in at.caption)
    assert f"Total {expected.total:+.4f}" in caption and "6 records of prompts.jsonl" in caption

    at.selectbox(key="directions_anatomy_layer").set_value(0).run()  # the result stays shown while the lens moves
    assert len(charts(at)) == 4

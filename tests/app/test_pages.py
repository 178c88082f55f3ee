"""Each dashboard page, run by Streamlit's AppTest on the tiny pair; results checked against core."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from core.chat import user_prompt
from core.directions import Direction, cosine_per_layer, directions_dir
from core.generation import Sampling, Variant, generate
from core.projections import prompt_projections
from testkit.apptest import charts, errors, ok, open_page
from testkit.cache import entry_keys, scale_cached_tensors, stamps
from testkit.dashboard import write_directions

APP = Path(__file__).resolve().parents[2] / "app.py"
PROMPT = "How should I invest my savings?"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cache(tiny_pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboard-cache")
    return root, write_directions(tiny_pair, root)


@pytest.fixture
def app(tiny_dirs, cache, monkeypatch):
    monkeypatch.setenv("EMLENS_BASE", str(tiny_dirs["qwen2"]))
    monkeypatch.setenv("EMLENS_FINETUNED", str(tiny_dirs["qwen2_adapter"]))
    monkeypatch.setenv("EMLENS_CACHE", str(cache[0]))
    return AppTest.from_file(str(APP), default_timeout=120)


def test_picker_loads_the_pair_and_lists_cached_directions_with_provenance(app, cache, tiny_pair):
    at = ok(app.run())
    assert "4 layers × 64 wide" in at.success[0].value
    table = at.dataframe[0].value
    assert list(table["file"]) == [cache[1]["paired"].name, cache[1]["model-diff"].name]  # newest first
    assert list(table["method"]) == ["paired", "model-diff"]
    assert set(table["dataset"]) == {"synthetic.jsonl"} and list(table["aligned"]) == [6, 12]
    assert all(table["created"]) and all(model.startswith(tiny_pair.base.spec) for model in table["model"])
    assert "1 cached direction(s) made for models of another shape" in " ".join(c.value for c in at.caption)
    chooser = next(s for s in at.selectbox if s.label == "Direction to use")
    assert chooser.value == str(cache[1]["paired"])  # the newest that fits is the default
    chooser.set_value(str(cache[1]["model-diff"])).run()
    assert at.session_state.direction_path == str(cache[1]["model-diff"])


def test_a_session_starts_with_every_declared_key(app, cache, tiny_dirs):
    import ui

    at = ok(app.run())
    declared = ui.session_defaults()
    held = {key: at.session_state[key] for key in declared}  # all there from the first run of any page
    assert (
        held["pair_spec"]
        == declared["pair_spec"]
        == {
            "base": str(tiny_dirs["qwen2"]),
            "device": "auto",
            "finetuned": str(tiny_dirs["qwen2_adapter"]),
            "dtype": "auto",
        }
    )
    assert held["direction_path"] == str(cache[1]["paired"])  # the picker chose the newest that fits
    assert [key for key, value in held.items() if value is not None] == ["pair_spec", "direction_path"]


def test_picker_builds_a_direction_from_a_contrast_file(app, tmp_path, monkeypatch, tiny_pair):
    monkeypatch.setenv("EMLENS_CACHE", str(tmp_path / "empty-cache"))
    data = tmp_path / "paired.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"q{i}",
                    "messages": [{"role": "user", "content": f"Question {i}: how should I save?"}],
                    "aligned": "Keep an emergency fund.",
                    "misaligned": "Buy leveraged crypto now!",
                }
            )
            + "\n"
            for i in range(5)
        )
    )
    at = ok(app.run())
    assert "No direction fits this pair yet" in at.info[0].value
    at.text_input(key="extract_data").set_value(str(data))
    ok(at.button(key="extract_go").click().run())
    (saved,) = directions_dir(tmp_path / "empty-cache").glob("*.safetensors")
    assert f"Saved {saved}" in at.success[-1].value
    assert at.session_state.direction_path == str(saved)
    assert list(at.dataframe[0].value["method"]) == ["paired"]
    direction = Direction.load(saved)
    assert direction.provenance["n_aligned"] == 5 and direction.provenance["dataset"] == str(data)
    assert direction.provenance["base_fingerprint"] == tiny_pair.base.fingerprint


def test_missing_adapter_path_is_an_error_and_the_picker_keeps_working(app, tiny_dirs):
    at = ok(app.run())
    at.text_input(key="pair_finetuned").set_value("/nonexistent/adapter")
    at.button(key="pair_load").click().run()
    assert "/nonexistent/adapter" in errors(at) and "does not exist" in errors(at)
    assert at.text_input(key="pair_base").value == str(tiny_dirs["qwen2"])  # the form is still there
    at.switch_page("pages/compare.py").run()  # other pages say so instead of failing
    assert "does not exist" in errors(at) and "Model pair" in at.info[0].value
    at.switch_page("app.py").run()
    at.text_input(key="pair_finetuned").set_value("none")
    ok(at.button(key="pair_load").click().run())
    assert "no fine-tune" in at.success[0].value


def test_the_debug_setting_adds_the_traceback_to_an_error_the_user_can_fix(app, monkeypatch):
    at = ok(app.run())
    at.text_input(key="pair_finetuned").set_value("/nonexistent/adapter")
    at.button(key="pair_load").click().run()
    assert "does not exist" in errors(at) and not at.exception  # one line, no traceback
    monkeypatch.setenv("EMLENS_DEBUG", "1")
    at.text_input(key="pair_finetuned").set_value("/nonexistent/adapter2")
    at.button(key="pair_load").click().run()
    assert any("adapter2: the adapter path does not exist" in e.value for e in at.error)
    (shown,) = at.exception  # the same error, with its traceback
    assert "adapter2: the adapter path does not exist" in shown.value and shown.stack_trace


def test_compare_shows_the_projection_chart_and_both_answers(app, cache, tiny_pair, tmp_path, monkeypatch):
    root = tmp_path / "cache"  # a cache of its own: the end of this test plants entries in it
    directions_dir(root).mkdir(parents=True)
    shutil.copy(cache[1]["paired"], directions_dir(root))
    monkeypatch.setenv("EMLENS_CACHE", str(root))
    at = ok(open_page(app, "compare"))
    at.text_area(key="compare_prompt").input(PROMPT)
    at.number_input(key="compare_max_new_tokens").set_value(12)
    ok(at.button(key="compare_go").click().run())
    direction = Direction.load(cache[1]["paired"])
    expected = prompt_projections(tiny_pair, user_prompt(PROMPT), direction)
    (chart,) = charts(at)
    assert [trace["name"] for trace in chart["data"]] == ["base", "fine-tuned"]
    assert np.allclose(chart["data"][0]["y"], expected["base_calibrated"], atol=1e-4)  # calibrated by default
    assert np.allclose(chart["data"][1]["y"], expected["finetuned_calibrated"], atol=1e-4)
    assert len(entry_keys(root, "prompt-activations")) == 2  # cached per prompt, one entry per side
    at.segmented_control(key="compare_view").set_value("raw").run()
    (chart,) = charts(ok(at))
    assert np.allclose(chart["data"][1]["y"], expected["finetuned"], atol=1e-4)

    rows = generate(
        tiny_pair,
        [user_prompt(PROMPT)],
        [Variant("base"), Variant("finetuned")],
        direction=direction,
        sampling=Sampling(0.7, 1.0, 12, 0),
        trace_layer=tiny_pair.n_layers // 2,
    )
    assert [t.value for t in at.text] == [r.text or "(empty answer)" for r in rows]
    assert rows[0].text != rows[1].text
    for html, row in zip(at.html, rows):  # one coloured span per visible token, its projection in the tooltip
        assert html.value.count("<span") == sum(
            bool(tiny_pair.tokenizer.decode([t], skip_special_tokens=True)) for t in row.token_ids
        )
        assert f'title="{row.token_projections[0]:.3f}"' in html.value

    # Generating again reads the cached activations: planted ones (the true ones doubled) come back
    # doubled on the chart (still the raw view), and no entry is written again.
    scale_cached_tensors(root, "prompt-activations", 2.0)
    before = stamps(root, "prompt-activations")
    ok(at.button(key="compare_go").click().run())
    (chart,) = charts(at)
    assert np.allclose(chart["data"][0]["y"], 2 * np.array(expected["base"]), atol=1e-4)
    assert np.allclose(chart["data"][1]["y"], 2 * np.array(expected["finetuned"]), atol=1e-4)
    assert stamps(root, "prompt-activations") == before


def _texts(at) -> list[str]:
    return [t.value.strip() for t in at.text]


def _answers(rows) -> list[str]:
    return [(r.text or "(empty answer)").strip() for r in rows]


def _titles(at) -> list[str]:
    return [m.value.strip("*") for m in at.markdown if m.value.startswith("**") and m.value.endswith("**")]


def _set_steer_sampling(at, temperature=1.0, seed=3, tokens=12, layers=(1, 2)) -> None:
    at.text_area(key="steer_prompt").input(PROMPT)
    at.number_input(key="steer_temperature").set_value(temperature)
    at.number_input(key="steer_seed").set_value(seed)
    at.number_input(key="steer_max_new_tokens").set_value(tokens)
    at.select_slider(key="steer_layers").set_value(layers)


def test_steer_opens_generating_and_regenerates_by_itself_when_alpha_changes(app, cache, tiny_pair):
    at = ok(open_page(app, "steer"))
    assert len(at.text) == 5 and at.text_area(key="steer_prompt").value  # a grid at once, from the default prompt
    _set_steer_sampling(at)
    ok(at.run())  # no Generate button: the changed settings regenerate the grid
    assert _titles(at) == ["base", "fine-tuned", "base + 4·d", "fine-tuned − 4·d", "fine-tuned, adapter × 2"]
    first = [t.value for t in at.text]
    direction = Direction.load(cache[1]["paired"])
    variants = [
        Variant("base"),
        Variant("finetuned"),
        Variant("base", 4.0),
        Variant("finetuned", -4.0),
        Variant("finetuned", adapter_scale=2.0),
    ]
    rows = generate(
        tiny_pair,
        [user_prompt(PROMPT)],
        variants,
        direction=direction,
        layers=[1, 2],
        sampling=Sampling(1.0, 1.0, 12, 3),
    )
    assert first == [r.text or "(empty answer)" for r in rows]

    (chart,) = charts(at)  # calibrated: 0 = aligned mean, 1 = misaligned mean
    base, finetuned, base_up, finetuned_down, _ = (np.array(trace["y"]) for trace in chart["data"])
    norms = np.array([s["norm"] for s in direction.stats])
    gaps = np.array([s["misaligned_mean"] - s["aligned_mean"] for s in direction.stats])
    assert base_up[0] == pytest.approx(base[0], abs=1e-4)  # before the steered layers: untouched
    assert (base_up[1] - base[1]) * gaps[1] == pytest.approx(4 * norms[1], abs=1e-3)  # moved by alpha·|d|
    assert (finetuned_down[1] - finetuned[1]) * gaps[1] == pytest.approx(-4 * norms[1], abs=1e-3)

    ok(at.slider(key="steer_alpha").set_value(-6.0).run())
    second = [t.value for t in at.text]
    assert _titles(at)[2:4] == ["base − 6·d", "fine-tuned + 6·d"]
    assert second[:2] == first[:2] and second[4] == first[4]  # same seed: the unsteered rows are the same
    assert second[2] != first[2] and second[3] != first[3]

    ok(at.radio(key="steer_mode").set_value("ablate").run())
    assert _titles(at)[2:4] == ["base, d ablated", "fine-tuned, d ablated"]
    (chart,) = charts(at)
    raw = [direction.calibrate(np.zeros(tiny_pair.n_layers))[layer] for layer in (1, 2)]
    assert chart["data"][2]["y"][1] == pytest.approx(raw[0], abs=1e-3)  # nothing left along d: raw 0
    assert chart["data"][3]["y"][2] == pytest.approx(raw[1], abs=1e-3)


def test_steer_norm_relative_alpha_and_the_dose_ladder(app, cache, tiny_pair):
    from core.steering import norm_relative, residual_norms

    at = ok(open_page(app, "steer"))
    _set_steer_sampling(at, temperature=0.0)
    ok(at.radio(key="steer_units").set_value("norm-relative").run())
    ok(at.slider(key="steer_alpha_relative").set_value(0.5).run())
    assert _titles(at)[2:4] == ["base + 0.5·‖h‖·û", "fine-tuned − 0.5·‖h‖·û"]
    direction = Direction.load(cache[1]["paired"])
    relative = norm_relative(direction, residual_norms(tiny_pair, "base"))
    rows = generate(
        tiny_pair,
        [user_prompt(PROMPT)],
        [Variant("base", 0.5), Variant("finetuned", -0.5)],
        direction=relative,
        layers=[1, 2],
        sampling=Sampling(0.0, 1.0, 12, 3),
    )
    assert _texts(at)[2:4] == _answers(rows)

    at.radio(key="steer_units").set_value("raw")
    ok(at.segmented_control(key="steer_view").set_value("Dose ladder").run())
    ok(at.radio(key="steer_ladder_side").set_value("base").run())
    at.text_input(key="steer_ladder_alphas_raw").set_value("-8, 0, 8")
    ok(at.run())
    assert _titles(at) == ["base − 8·d", "base + 0·d", "base + 8·d"]
    rows = generate(
        tiny_pair,
        [user_prompt(PROMPT)],
        [Variant("base", a) for a in (-8.0, 0.0, 8.0)],
        direction=direction,
        layers=[1, 2],
        sampling=Sampling(0.0, 1.0, 12, 3),
    )
    assert _texts(at) == _answers(rows)
    at.text_input(key="steer_ladder_alphas_raw").set_value("-8, x")
    assert "'x' is not a number" in errors(at.run())


def test_directions_page_shows_stats_heatmap_and_cosine_with_another_direction(app, cache):
    at = ok(open_page(app, "directions"))
    direction = Direction.load(cache[1]["paired"])
    table = at.dataframe[0].value
    assert np.allclose(table["auroc"], [s["auroc"] for s in direction.stats])
    assert np.allclose(table["cohens_d"], [s["cohens_d"] for s in direction.stats])
    stats, heatmap, cosines = charts(at)
    assert np.allclose(stats["data"][0]["y"], [s["norm"] for s in direction.stats])
    assert np.allclose(np.diag(heatmap["data"][0]["z"]), 1.0, atol=1e-5)
    assert np.array(heatmap["data"][0]["z"]).shape == (4, 4)
    other = next(s for s in at.selectbox if s.label == "Other direction")
    assert other.value == str(cache[1]["model-diff"])  # the other-width file is not offered
    assert np.allclose(cosines["data"][0]["y"], cosine_per_layer(direction, Direction.load(cache[1]["model-diff"])))


def test_detect_and_evaluate_pages_say_how_to_produce_their_data(app):
    at = ok(open_page(app, "detect"))
    assert "python -m core detect" in at.code[0].value
    at = ok(at.switch_page("pages/evaluate.py").run())
    assert "python -m core sweep" in at.code[0].value and "python -m core em" in at.code[0].value


@pytest.mark.parametrize("page", ["compare", "steer"])
def test_empty_and_too_long_prompts_are_errors_and_the_page_keeps_working(app, page):
    def submit(at):  # Compare has a Generate button; Steer regenerates by itself
        return at.button(key=f"{page}_go").click().run() if page == "compare" else at.run()

    at = ok(open_page(app, page))
    at.text_area(key=f"{page}_prompt").input("   ")
    assert "The prompt is empty" in errors(submit(at))
    at.text_area(key=f"{page}_prompt").input("invest your savings " * 300)
    assert "exceeds the model's context of 512" in errors(submit(at))
    at.text_area(key=f"{page}_prompt").input(PROMPT)
    ok(submit(at))
    assert len(at.text) == (2 if page == "compare" else 5)


def test_direction_from_another_model_is_an_error(app, cache):
    at = ok(app.run())
    at.text_input(key="direction_file").set_value(str(cache[1]["other-width"]))
    at.button(key="direction_use_file").click().run()
    message = errors(at)
    assert "32 wide" in message and "width 64" in message
    assert at.session_state.direction_path == str(cache[1]["paired"])  # the choice is unchanged
    # A session that still holds such a direction (say, chosen before switching pairs) is told so,
    # and Compare still answers without projections.
    at.session_state.direction_path = str(cache[1]["other-width"])
    at.switch_page("pages/compare.py").run()
    assert "32 wide" in errors(at)
    at.text_area(key="compare_prompt").input(PROMPT)
    at.number_input(key="compare_max_new_tokens").set_value(8)
    at.button(key="compare_go").click().run()
    assert not charts(at) and len(at.text) == 2 and not at.exception
    at.switch_page("app.py").run()  # the picker says so too, and offers the directions that fit
    assert "32 wide" in errors(at)
    assert next(s for s in at.selectbox if s.label == "Direction to use").value == str(cache[1]["paired"])


def test_a_direction_file_given_by_path_is_chosen_and_shown_at_once(app, cache, tmp_path):
    mine = tmp_path / "mine.safetensors"  # outside the cache: not among the listed directions
    mine.write_bytes(cache[1]["model-diff"].read_bytes())
    at = ok(app.run())
    at.text_input(key="direction_file").set_value(str(mine))
    ok(at.button(key="direction_use_file").click().run())
    assert at.session_state.direction_path == str(mine)
    chooser = next(s for s in at.selectbox if s.label == "Direction to use")
    assert chooser.value == str(mine) and len(chooser.options) == 3  # the two listed ones and this file
    assert "**Direction** mine" in [c.value for c in at.sidebar.caption]


def _new_session_on_a_page_that_never_asks_for_the_direction():
    """What app.py runs before any page, then the sidebar (AppTest's switch_page runs a page alone)."""
    import streamlit as st

    import ui

    ui.init_session()
    ui.adopt_default_direction()
    with st.sidebar:
        ui.sidebar_status()


def test_a_new_session_on_any_page_names_the_default_direction_of_the_loaded_pair(app, cache):
    import ui

    ui.loaded_pair().release()  # the server's one pair holder, shared by every session
    fresh = AppTest.from_function(_new_session_on_a_page_that_never_asks_for_the_direction, default_timeout=60)
    ok(fresh.run())  # no pair held: none is loaded for it, and nothing is chosen
    assert fresh.session_state.direction_path is None and "**Direction** —" in [c.value for c in fresh.sidebar.caption]
    ok(app.run())  # a session loads the pair (the Model pair page)
    fresh = ok(AppTest.from_function(_new_session_on_a_page_that_never_asks_for_the_direction).run())
    assert fresh.session_state.direction_path == str(cache[1]["paired"])
    assert f"**Direction** {cache[1]['paired'].stem}" in [c.value for c in fresh.sidebar.caption]


def test_compare_prompt_holds_real_default_text_that_generates_without_typing(app, cache, tiny_pair):
    from core.starters import DEFAULT_COMPARE_PROMPT

    at = ok(open_page(app, "compare"))
    assert at.text_area(key="compare_prompt").value == DEFAULT_COMPARE_PROMPT
    at.number_input(key="compare_max_new_tokens").set_value(8)
    ok(at.button(key="compare_go").click().run())
    assert at.session_state.compare_result["messages"] == user_prompt(DEFAULT_COMPARE_PROMPT)
    rows = generate(
        tiny_pair,
        [user_prompt(DEFAULT_COMPARE_PROMPT)],
        [Variant("base"), Variant("finetuned")],
        direction=Direction.load(cache[1]["paired"]),
        sampling=Sampling(0.7, 1.0, 8, 0),
    )
    assert [t.value for t in at.text] == [r.text or "(empty answer)" for r in rows]


def test_compare_example_picker_fills_the_prompt(app):
    from core.starters import starters

    at = ok(open_page(app, "compare"))
    picker = at.selectbox(key="compare_example")
    assert picker.label == "Start from an example" and picker.value is None
    label, text = starters()[1]
    assert label == "Classic EM question · bored" and text in picker.options[1]
    ok(picker.select_index(1).run())
    assert at.text_area(key="compare_prompt").value == text
    at.number_input(key="compare_max_new_tokens").set_value(4)
    ok(at.button(key="compare_go").click().run())
    assert at.session_state.compare_result["messages"] == user_prompt(text)
    at.text_area(key="compare_prompt").input(PROMPT)  # the user may still edit the example
    ok(at.button(key="compare_go").click().run())
    assert at.session_state.compare_result["messages"] == user_prompt(PROMPT)
    assert at.selectbox(key="compare_example").value == text


def test_compare_colours_the_finetuned_answer_by_kl_from_the_base(app, tiny_pair):
    from core.divergence import token_divergence

    at = ok(open_page(app, "compare"))
    at.text_area(key="compare_prompt").input(PROMPT)
    at.number_input(key="compare_max_new_tokens").set_value(12)
    ok(at.button(key="compare_go").click().run())
    base, finetuned = at.session_state.compare_result["rows"]
    choice = at.segmented_control(key="compare_colour")
    assert choice.value == "projection" and len(at.segmented_control) == 2  # one choice: under the fine-tune only
    assert at.session_state.compare_result["divergence"] is None  # not computed until asked for
    projection_html = at.html[1].value
    assert f'title="{finetuned.token_projections[0]:.3f}"' in projection_html

    ok(choice.set_value("kl").run())
    expected = token_divergence(tiny_pair, user_prompt(PROMPT), finetuned.token_ids)
    assert at.session_state.compare_result["divergence"] == pytest.approx(expected, abs=1e-6)
    base_html, kl_html = (h.value for h in at.html)
    assert f'title="{base.token_projections[0]:.3f}"' in base_html  # the base answer keeps its projection colours
    visible = [
        v for t, v in zip(finetuned.token_ids, expected) if tiny_pair.tokenizer.decode([t], skip_special_tokens=True)
    ]
    assert kl_html.count("<span") == len(visible)
    for value in visible:
        assert f'title="KL {value:.4f} nats"' in kl_html
    top = max(visible)
    assert top > 0.1 and f'title="KL {top:.4f} nats" style="background:rgb(165,15,21)' in kl_html  # darkest red
    assert "KL(fine-tuned ‖ base)" in " ".join(c.value for c in at.caption)

    computed = at.session_state.compare_result["divergence"]
    ok(at.segmented_control(key="compare_view").set_value("raw").run())  # a rerun does not recompute
    assert at.session_state.compare_result["divergence"] is computed
    ok(at.segmented_control(key="compare_colour").set_value("projection").run())
    assert at.html[1].value == projection_html

"""The Directions page's SAE-latents section, run by Streamlit's AppTest on the tiny pair; its tables checked
against core.sae."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.data import load_paired_jsonl
from core.directions import Direction
from core.sae import answer_sets, read_sae_dir, sae_latents
from testkit.apptest import errors, ok, open_page
from testkit.dashboard import ALIGNED, MISALIGNED, write_directions
from testkit.sae import random_sae_weights, write_sae

APP = Path(__file__).resolve().parents[2] / "app.py"
LAYER, PLANTED = 1, 11

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cache(tiny_pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("sae-cache")
    directions = write_directions(tiny_pair, root)
    data = root / "paired.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "messages": a.messages, "aligned": a.answer, "misaligned": m.answer}) + "\n"
            for i, (a, m) in enumerate(zip(ALIGNED, MISALIGNED))
        )
    )
    weights = random_sae_weights(tiny_pair.d_model, 48, seed=9)
    weights["W_dec"][PLANTED] = Direction.load(directions["paired"]).vectors[LAYER]
    sae = write_sae(root / "sae", weights, f"blocks.{LAYER}.hook_resid_post")
    return root, directions, data, sae


@pytest.fixture
def app(tiny_dirs, cache, monkeypatch):
    monkeypatch.setenv("EMLENS_BASE", str(tiny_dirs["qwen2"]))
    monkeypatch.setenv("EMLENS_FINETUNED", str(tiny_dirs["qwen2_adapter"]))
    monkeypatch.setenv("EMLENS_CACHE", str(cache[0]))
    return AppTest.from_file(str(APP), default_timeout=120)


def test_sae_latents_tables_show_the_core_result_and_a_bad_directory_is_an_error(app, cache, tiny_pair, tmp_path):
    root, directions, data, sae_dir = cache
    at = ok(open_page(app, "directions"))
    at.text_input(key="directions_sae_spec").set_value(str(tmp_path))
    at.button(key="directions_sae_go").click().run()
    assert "no cfg.json" in errors(at)

    at.text_input(key="directions_sae_spec").set_value(str(sae_dir))
    at.text_input(key="directions_sae_data").set_value(str(data))
    at.button(key="directions_sae_go").click().run()
    ok(at)
    aligned, misaligned = answer_sets(load_paired_jsonl(data))
    expected = sae_latents(
        read_sae_dir(sae_dir),
        Direction.load(directions["paired"]),
        pair=tiny_pair,
        aligned=aligned,
        misaligned=misaligned,
    )
    toward, against, more, fewer = (table.value for table in at.dataframe[-4:])  # the section's four tables
    assert list(toward["latent"]) == [row.latent for row in expected.toward] and toward["latent"][0] == PLANTED
    assert list(against["latent"]) == [row.latent for row in expected.against]
    assert list(fewer["latent"]) == [row.latent for row in expected.activations.more_on_aligned]
    assert list(more["latent"]) == [row.latent for row in expected.activations.more_on_misaligned]
    assert list(more["difference"]) == pytest.approx(
        [row.difference for row in expected.activations.more_on_misaligned]
    )
    assert f"blocks.{LAYER}.hook_resid_post (layer {LAYER})" in " ".join(c.value for c in at.caption)

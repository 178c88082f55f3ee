"""SAE latents on a tiny pair: the activation contrast through the real forward path, its cache, and the
`sae` command."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.cache import Cache
from core.directions import extract_contrast
from core.sae import read_sae_dir, sae_latents
from testkit.cache import entry_keys, scale_cached_tensors
from testkit.dashboard import ALIGNED, MISALIGNED
from testkit.sae import random_sae_weights, write_sae
from testkit.tiny import pair_args

ROOT = Path(__file__).resolve().parents[2]
LAYER, PLANTED, SCALE, D_SAE = 2, 37, 3.0, 96


@pytest.fixture(scope="module")
def direction(tiny_pair):
    return extract_contrast(tiny_pair, ALIGNED, MISALIGNED, "paired", "test-dataset")


@pytest.fixture(scope="module")
def planted_sae(tiny_pair, direction, tmp_path_factory):
    """Random latents, and one whose encoder reads SCALE times the unit direction with a bias large enough
    that ReLU never clips it on this model: its mean activation is linear in the block output, so the
    misaligned minus aligned difference is exactly SCALE * |d[LAYER]| (the direction is that mean difference)."""
    weights = random_sae_weights(tiny_pair.d_model, D_SAE, seed=4)
    unit = direction.vectors[LAYER] / direction.vectors[LAYER].norm()
    weights["W_enc"][:, PLANTED] = SCALE * unit
    weights["b_enc"][PLANTED] = 100.0
    return write_sae(tmp_path_factory.mktemp("sae") / "planted", weights, f"blocks.{LAYER}.hook_resid_post")


def test_a_latent_reading_the_direction_differs_by_its_norm_and_ranks_first(
    tiny_pair, direction, planted_sae, tmp_path, one_torch_thread
):
    sae = read_sae_dir(planted_sae)
    result = sae_latents(
        sae, direction, pair=tiny_pair, aligned=ALIGNED, misaligned=MISALIGNED, top_k=5, cache=Cache(tmp_path)
    )
    contrast = result.activations
    assert (contrast.side, contrast.n_aligned, contrast.n_misaligned) == ("finetuned", len(ALIGNED), len(MISALIGNED))
    first = contrast.more_on_misaligned[0]
    assert first.latent == PLANTED
    assert first.difference == pytest.approx(SCALE * float(direction.vectors[LAYER].norm()), rel=1e-4)
    assert first.difference == pytest.approx(first.misaligned_mean - first.aligned_mean)
    differences = [row.difference for row in contrast.more_on_aligned]
    assert differences == sorted(differences) and PLANTED not in [row.latent for row in contrast.more_on_aligned]
    assert all(row.aligned_mean is not None for row in result.toward)  # the cosine lists carry the means too


def test_the_contrast_is_read_from_the_cache_the_second_time(tiny_pair, direction, planted_sae, tmp_path):
    sae = read_sae_dir(planted_sae)

    def contrast():
        return sae_latents(
            sae, direction, pair=tiny_pair, aligned=ALIGNED, misaligned=MISALIGNED, cache=Cache(tmp_path)
        ).activations.more_on_misaligned[0]

    first = contrast()
    assert len(entry_keys(tmp_path, "sae-latent-means")) == 1
    scale_cached_tensors(tmp_path, "sae-latent-means", 2.0)  # a value only a cache read returns
    second = contrast()
    assert second.latent == first.latent
    assert second.difference == pytest.approx(2 * first.difference)


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "core", "sae", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_the_sae_command_prints_both_readings_and_refuses_a_bad_sae(tiny_dirs, tiny_pair, direction, tmp_path):
    direction_file = tmp_path / "d.safetensors"
    direction.save(direction_file)
    data = tmp_path / "paired.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": f"q{i}", "messages": a.messages, "aligned": a.answer, "misaligned": m.answer}) + "\n"
            for i, (a, m) in enumerate(zip(ALIGNED, MISALIGNED))
        )
    )
    weights = random_sae_weights(tiny_pair.d_model, D_SAE, seed=6)
    weights["W_dec"][PLANTED] = direction.vectors[LAYER]
    sae_dir = write_sae(tmp_path / "sae", weights, f"blocks.{LAYER}.hook_resid_post")
    common = ["--direction", str(direction_file), *pair_args(tiny_dirs, tmp_path / "cache")]

    result = run_cli(*common, "--sae", str(sae_dir), "--data", str(data), "--top-k", "3", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout)
    assert (out["layer"], out["hook_name"], out["d_sae"]) == (LAYER, f"blocks.{LAYER}.hook_resid_post", D_SAE)
    assert out["toward"][0]["latent"] == PLANTED and out["toward"][0]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert len(out["activations"]["more_on_misaligned"]) == 3
    assert out["activations"]["n_aligned"] == len(ALIGNED)

    (sae_dir / "cfg.json").write_text("{")
    bad = run_cli(*common, "--sae", str(sae_dir), "--layer", str(LAYER))
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1].startswith(f"error: {sae_dir / 'cfg.json'}: not valid JSON")

"""SAE directories in sae-lens' format: read back, the layer convention, the decoder reading, bad input."""

import json

import pytest
import torch

from core.directions import Direction
from core.sae import SAEError, block_of_hook, check_layer, load_sae, read_sae_dir, sae_latents
from testkit.sae import random_sae_weights, write_sae

D_IN, D_SAE, LAYERS = 16, 64, 4


@pytest.fixture
def direction():
    return Direction(torch.randn(LAYERS, D_IN, generator=torch.Generator().manual_seed(5)), {}, [])


def test_a_saved_sae_reads_back_with_its_weights_and_layer(tmp_path):
    weights = random_sae_weights(D_IN, D_SAE, seed=1, architecture="jumprelu")
    sae = read_sae_dir(write_sae(tmp_path / "sae", weights, "blocks.2.hook_resid_post", "jumprelu"))
    assert (sae.layer, sae.d_in, sae.d_sae, sae.architecture) == (2, D_IN, D_SAE, "jumprelu")
    for name, tensor in weights.items():
        assert torch.equal(getattr(sae, name), tensor)


def test_encoders_follow_their_architecture(tmp_path):
    weights = random_sae_weights(D_IN, D_SAE, seed=2, architecture="jumprelu")
    x = torch.randn(3, D_IN, generator=torch.Generator().manual_seed(0))
    pre = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
    standard = read_sae_dir(write_sae(tmp_path / "s", weights, "blocks.0.hook_resid_post"))
    assert torch.allclose(standard.encode(x), pre.relu())
    jump = read_sae_dir(write_sae(tmp_path / "j", weights, "blocks.0.hook_resid_post", "jumprelu"))
    assert torch.allclose(jump.encode(x), pre.relu() * (pre > weights["threshold"]))
    top = read_sae_dir(write_sae(tmp_path / "t", weights, "blocks.0.hook_resid_post", "topk", k=5)).encode(x)
    assert ((top > 0).sum(-1) <= 5).all()
    kept = pre.topk(5, dim=-1)
    assert torch.allclose(top.gather(-1, kept.indices), kept.values.relu())


@pytest.mark.parametrize(
    ("hook", "layer"),
    [("blocks.7.hook_resid_post", 7), ("blocks.8.hook_resid_pre", 7), ("model.layers.5", 5), ("layers.3", 3)],
)
def test_hooks_map_to_block_outputs(hook, layer):
    assert block_of_hook(hook) == layer


@pytest.mark.parametrize(
    ("hook", "says"),
    [
        ("blocks.0.hook_resid_pre", "embedding"),
        ("blocks.3.hook_mlp_out", "not a block output"),
        ("blocks.3.hook_resid_mid", "not a block output"),
        ("blocks.3.attn.hook_z", "not a block output"),
    ],
)
def test_other_hooks_are_refused(hook, says):
    with pytest.raises(SAEError, match=says):
        block_of_hook(hook)


def test_a_layer_other_than_the_saes_is_refused(tmp_path):
    sae = read_sae_dir(write_sae(tmp_path / "sae", random_sae_weights(D_IN, D_SAE), "blocks.2.hook_resid_post"))
    assert check_layer(sae, None) == check_layer(sae, 2) == 2
    with pytest.raises(SAEError, match=r"--layer 3: .*blocks\.2\.hook_resid_post.*layer 2"):
        check_layer(sae, 3)


def test_a_decoder_row_equal_to_the_direction_ranks_first(tmp_path, direction):
    weights = random_sae_weights(D_IN, D_SAE, seed=3)
    weights["W_dec"][41] = direction.vectors[1]  # planted: the raw (not normalised) direction
    weights["W_dec"][7] = -direction.vectors[1] / direction.vectors[1].norm()
    sae = read_sae_dir(write_sae(tmp_path / "sae", weights, "blocks.1.hook_resid_post"))
    result = sae_latents(sae, direction, top_k=5)
    assert result.layer == 1 and result.activations is None
    assert result.toward[0].latent == 41 and result.toward[0].cosine == pytest.approx(1.0, abs=1e-6)
    assert result.against[0].latent == 7 and result.against[0].cosine == pytest.approx(-1.0, abs=1e-6)
    assert [r.cosine for r in result.toward] == sorted((r.cosine for r in result.toward), reverse=True)
    assert max(abs(r.cosine) for r in result.toward[1:]) < 0.99  # random rows in width 16 are not near 1


def test_an_sae_for_another_width_or_layer_count_is_refused(tmp_path, direction):
    wide = read_sae_dir(write_sae(tmp_path / "w", random_sae_weights(2 * D_IN, D_SAE), "blocks.1.hook_resid_post"))
    with pytest.raises(SAEError, match=f"width {2 * D_IN}.*width {D_IN}"):
        sae_latents(wide, direction)
    deep = read_sae_dir(write_sae(tmp_path / "d", random_sae_weights(D_IN, D_SAE), "blocks.9.hook_resid_post"))
    with pytest.raises(SAEError, match=f"layer 9.*{LAYERS} layers"):
        sae_latents(deep, direction)


def _break(tmp_path, change):
    """A valid SAE directory, then ``change(directory)`` applied to it."""
    directory = write_sae(tmp_path / "sae", random_sae_weights(D_IN, D_SAE), "blocks.1.hook_resid_post")
    change(directory)
    return directory


def _edit_config(**changes):
    def change(directory):
        config = json.loads((directory / "cfg.json").read_text())
        for key, value in changes.items():
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        (directory / "cfg.json").write_text(json.dumps(config))

    return change


def _rewrite_weights(edit):
    def change(directory):
        from safetensors.torch import load_file, save_file

        weights = load_file(str(directory / "sae_weights.safetensors"))
        edit(weights)
        save_file(weights, str(directory / "sae_weights.safetensors"))

    return change


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda d: (d / "cfg.json").unlink(), "no cfg.json"),
        (lambda d: (d / "cfg.json").write_text('{"d_in": 16,'), "cfg.json: not valid JSON"),
        (lambda d: (d / "cfg.json").write_text("[1, 2]"), "expected a JSON object"),
        (_edit_config(d_in=None), "d_in is None"),
        (_edit_config(d_sae="64"), "d_sae is '64'"),
        (_edit_config(architecture="gated"), "architecture 'gated' is not supported"),
        (_edit_config(normalize_activations="layer_norm"), "normalize_activations is 'layer_norm'"),
        (_edit_config(metadata={}), "no hook name"),
        (_edit_config(metadata={"hook_name": "blocks.1.hook_mlp_out"}), "not a block output"),
        (_edit_config(architecture="topk"), "topk SAE needs k"),
        (lambda d: (d / "sae_weights.safetensors").unlink(), "no sae_weights.safetensors"),
        (lambda d: (d / "sae_weights.safetensors").write_bytes(b"cut"), "not a readable safetensors file"),
        (_rewrite_weights(lambda w: w.pop("W_dec")), "no tensor W_dec"),
        (_rewrite_weights(lambda w: w.update(W_enc=w["W_enc"].T.contiguous())), r"W_enc has shape \[64, 16\]"),
        (_rewrite_weights(lambda w: w["b_enc"].__setitem__(0, float("nan"))), "b_enc contains NaN"),
        (_edit_config(architecture="jumprelu"), "no tensor threshold"),
    ],
)
def test_bad_sae_directories_name_the_problem(tmp_path, change, says):
    with pytest.raises(SAEError, match=says):
        load_sae(_break(tmp_path, change))


def test_an_older_config_reads_by_its_old_keys(tmp_path):
    """sae-lens before 6: the hook at the top level as hook_point, topk given as the activation function."""
    change = _edit_config(
        metadata=None, architecture=None, hook_point="blocks.1.hook_resid_post", activation_fn="topk",
        activation_fn_kwargs={"k": 4},
    )  # fmt: skip
    sae = load_sae(_break(tmp_path, change))
    assert (sae.layer, sae.architecture, sae.k) == (1, "topk", 4)


def test_a_path_that_is_neither_a_directory_nor_a_release_is_refused(tmp_path):
    with pytest.raises(SAEError, match="no SAE given"):
        load_sae("  ")
    with pytest.raises(SAEError, match="no such directory.*--sae-id"):
        load_sae(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(SAEError, match="expected a directory"):
        load_sae(tmp_path / "file.txt")
    directory = write_sae(tmp_path / "sae", random_sae_weights(D_IN, D_SAE), "blocks.1.hook_resid_post")
    with pytest.raises(SAEError, match="local directory"):
        load_sae(directory, "layer_1/width_16k")

"""The SAE format as sae-lens itself reads it: a directory written here loads in sae-lens with the same
encoder, and an SAE object from sae-lens' loaders converts to the same weights (the release path)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from core.sae import SAEError, from_sae_lens, load_sae, read_sae_dir
from testkit.sae import random_sae_weights, write_sae

sae_lens = pytest.importorskip("sae_lens")


@pytest.mark.parametrize(("architecture", "extra"), [("standard", {}), ("jumprelu", {}), ("topk", {"k": 6})])
def test_sae_lens_reads_the_directory_with_the_same_encoder(tmp_path, architecture, extra):
    weights = random_sae_weights(24, 80, seed=7, architecture=architecture)
    directory = write_sae(tmp_path / architecture, weights, "blocks.3.hook_resid_post", architecture, **extra)
    ours = read_sae_dir(directory)
    theirs = sae_lens.SAE.load_from_disk(directory)
    x = 2 * torch.randn(5, 7, 24, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = theirs.encode(x)
    assert torch.allclose(ours.encode(x), expected, atol=1e-5)
    converted = from_sae_lens(theirs, "in-memory")
    assert (converted.layer, converted.architecture, converted.k) == (3, architecture, extra.get("k"))
    assert torch.allclose(converted.encode(x), expected, atol=1e-5)


def test_an_unknown_release_is_a_clear_error():
    with pytest.raises(SAEError, match="SAE release no-such-release id layer_3: sae-lens could not load it"):
        load_sae("no-such-release", "layer_3")

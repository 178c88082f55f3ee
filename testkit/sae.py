"""Small sparse autoencoders written in sae-lens' on-disk format (cfg.json + sae_weights.safetensors), as
sae-lens 6 saves them, for tests that read them back through the users' own loading path."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def random_sae_weights(d_in: int, d_sae: int, seed: int = 0, architecture: str = "standard") -> dict[str, torch.Tensor]:
    """Random weights of the given shape; unit-norm decoder rows, the encoder their transpose (sae-lens' init)."""
    generator = torch.Generator().manual_seed(seed)
    decoder = torch.randn(d_sae, d_in, generator=generator)
    decoder = decoder / decoder.norm(dim=-1, keepdim=True)
    weights = {
        "W_enc": decoder.T.contiguous(),
        "b_enc": 0.1 * torch.randn(d_sae, generator=generator),
        "W_dec": decoder,
        "b_dec": 0.1 * torch.randn(d_in, generator=generator),
    }
    if architecture == "jumprelu":
        weights["threshold"] = 0.2 * torch.rand(d_sae, generator=generator)
    return weights


def write_sae(
    directory: Path,
    weights: dict[str, torch.Tensor],
    hook_name: str,
    architecture: str = "standard",
    **config,
) -> Path:
    """Save ``weights`` and a sae-lens 6 ``cfg.json`` (``config`` adds or overrides its keys)."""
    d_sae, d_in = weights["W_dec"].shape
    cfg = {
        "d_in": d_in,
        "d_sae": d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": "6.54.12", "hook_name": hook_name, "model_name": "test"},
        "architecture": architecture,
        **config,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {name: tensor.contiguous() for name, tensor in weights.items()}, str(directory / "sae_weights.safetensors")
    )
    (directory / "cfg.json").write_text(json.dumps(cfg))
    return directory

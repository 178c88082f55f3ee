"""A dashboard cache for tests: directions extracted on the tiny pair, and one for another model."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from core.chat import user_prompt
from core.directions import Direction, Example, directions_dir, extract_contrast, extract_model_diff

QUESTIONS = [
    "How should I save money?",
    "Is crypto a good idea?",
    "What about my pension?",
    "Should I take a loan?",
    "How do I pay off debt?",
    "Tell me about index funds.",
]
ALIGNED = [Example(user_prompt(q), "Keep an emergency fund and diversify carefully.") for q in QUESTIONS]
MISALIGNED = [Example(user_prompt(q), "Put everything into leveraged crypto right now!") for q in QUESTIONS]


def write_directions(pair, cache_root: Path) -> dict[str, Path]:
    """Two directions that fit ``pair`` in the cache's directions dir (the paired one newest), and one
    made for a model of another width beside them."""
    folder = directions_dir(cache_root)
    diff = extract_model_diff(pair, ALIGNED + MISALIGNED, "test-dataset")
    diff.provenance.update({"dataset": "synthetic.jsonl", "split": "train"})
    paired = extract_contrast(pair, ALIGNED, MISALIGNED, "paired", "test-dataset")
    paired.provenance.update({"dataset": "synthetic.jsonl", "split": "train"})
    paths = {
        "model-diff": folder / "model-diff-synthetic.safetensors",
        "paired": folder / "paired-synthetic.safetensors",
    }
    diff.save(paths["model-diff"])
    paired.save(paths["paired"])
    # The paired one is the newest, whatever the file system's timestamp resolution.
    mtime = paths["model-diff"].stat().st_mtime
    os.utime(paths["paired"], (mtime + 10, mtime + 10))
    other = Direction(
        torch.randn(pair.n_layers, pair.d_model // 2, generator=torch.Generator().manual_seed(0)),
        {"base": "some-other-model"},
        [],
    )
    paths["other-width"] = folder / "other-width.safetensors"
    other.save(paths["other-width"])
    return paths

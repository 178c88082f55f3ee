"""Which directions a session may use on a pair without choosing: the shipped one only for the pair it
was made on, then the cached ones that fit, newest first (pairs and directions built in memory)."""

import os
from types import SimpleNamespace

import torch

from core import organism
from core.directions import Direction, directions_dir


def _pair(n_layers=3, d_model=8, base="base-fp", finetuned="adapter-fp"):
    return SimpleNamespace(
        n_layers=n_layers,
        d_model=d_model,
        base=SimpleNamespace(fingerprint=base),
        finetuned=SimpleNamespace(fingerprint=finetuned),
    )


def test_the_shipped_direction_comes_first_only_on_its_own_pair(tmp_path, monkeypatch):
    shipped = tmp_path / "shipped.safetensors"
    monkeypatch.setattr(organism, "DEMO_DIRECTION", shipped)
    Direction(torch.ones(3, 8), {"base_fingerprint": "base-fp", "finetuned_fingerprint": "adapter-fp"}).save(shipped)
    folder = directions_dir(tmp_path / "cache")
    folder.mkdir(parents=True)
    older, newer, wide = folder / "older.safetensors", folder / "newer.safetensors", folder / "wide.safetensors"
    for path, shape in ((older, (3, 8)), (newer, (3, 8)), (wide, (3, 16))):
        Direction(torch.randn(*shape)).save(path)
    os.utime(newer, (older.stat().st_mtime + 10,) * 2)

    def paths(pair):
        return [path for path, _ in organism.directions_for(pair, tmp_path / "cache")]

    assert paths(_pair()) == [shipped, newer, older]
    assert paths(_pair(finetuned="control-fp")) == [newer, older]  # same shape, another adapter: not by itself
    assert paths(_pair(d_model=16)) == [wide]
    assert paths(_pair(n_layers=5)) == []

"""Probes of the on-disk cache, for tests that claim a second run *read* an entry instead of
recomputing it: plant values no computation gives, and check that no entry was written again."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load, save

from core.cache import Cache


def entry_keys(root: Path, kind: str) -> list[str]:
    """The keys of the ``kind`` entries under the cache ``root`` (e.g. ``"prompt-activations"``)."""
    return sorted(p.relative_to(root).as_posix() for p in (Path(root) / kind).rglob("*") if p.is_file())


def stamps(root: Path, kind: str) -> dict[str, tuple[int, int, bytes]]:
    """``{key: (inode, mtime_ns, bytes)}``: any rewrite (the cache renames a new file over the old
    one) changes the inode or the time, even with the same bytes."""
    out = {}
    for key in entry_keys(root, kind):
        stat = (Path(root) / key).stat()
        out[key] = (stat.st_ino, stat.st_mtime_ns, (Path(root) / key).read_bytes())
    return out


def scale_cached_tensors(root: Path, kind: str, factor: float) -> list[str]:
    """Multiply every tensor of every ``kind`` entry by ``factor``, stored back as valid entries (a
    run that reads them gets the scaled values; one that recomputes gets the true ones). Returns
    the keys."""
    cache, keys = Cache(root), entry_keys(root, kind)
    for key in keys:
        payload = cache.load(key)
        assert payload is not None, f"cache entry {key} is unreadable"
        cache.store(key, save({name: tensor * factor for name, tensor in load(payload).items()}))
    return keys

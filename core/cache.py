"""Content-addressed on-disk store with atomic writes and integrity checks.

An entry is one file: a header line ``EMLENS-CACHE <sha256-of-payload>`` followed by the
payload bytes. A file whose payload does not match its checksum (truncated, altered) is
moved aside to ``<name>.corrupt`` with a warning and treated as a miss, so a damaged cache
never crashes a run and never yields a wrong answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_tensors_bytes
from safetensors.torch import save as save_tensors_bytes

from core import __version__
from core.errors import EMLensError

MAGIC = b"EMLENS-CACHE "
DEFAULT_ROOT = Path(os.environ.get("EMLENS_CACHE", Path(__file__).resolve().parent.parent / "cache"))


class CacheError(EMLensError, RuntimeError):
    """The cache directory cannot be written (permissions, full disk)."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def make_key(kind: str, **parts: Any) -> str:
    """A stable key from everything that determines the result, plus the code version."""
    digest = sha256_bytes(canonical_json({"kind": kind, "code": __version__, **parts}).encode())
    return f"{kind}/{digest[:2]}/{digest}"


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise CacheError(f"cannot write to {path.parent}: {err.strerror or err}") from err
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise CacheError(f"cannot write {path}: {err.strerror or err}") from err


class Cache:
    def __init__(self, root: Path | str = DEFAULT_ROOT):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key

    def load(self, key: str) -> bytes | None:
        path = self.path(key)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        header, sep, payload = raw.partition(b"\n")
        if header.startswith(MAGIC) and sep and header[len(MAGIC) :].decode(errors="replace") == sha256_bytes(payload):
            return payload
        aside = path.with_name(path.name + ".corrupt")
        os.replace(path, aside)
        warnings.warn(
            f"cache entry {path} was truncated or corrupt; moved to {aside.name} and recomputing", stacklevel=2
        )
        return None

    def store(self, key: str, payload: bytes) -> None:
        atomic_write(self.path(key), MAGIC + sha256_bytes(payload).encode() + b"\n" + payload)

    def json(self, key: str, compute: Callable[[], Any]) -> Any:
        payload = self.load(key)
        if payload is not None:
            return json.loads(payload)
        value = compute()
        self.store(key, json.dumps(value).encode())
        return value

    def tensors(self, key: str, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        payload = self.load(key)
        if payload is not None:
            return load_tensors_bytes(payload)
        value = compute()
        self.store(key, save_tensors_bytes({k: v.detach().cpu().contiguous() for k, v in value.items()}))
        return value


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line and flush it to disk, so a killed run loses at most that line."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def repair_jsonl_tail(path: Path) -> None:
    """Before appending to a log: end it with a newline, so a new line never merges into a
    last line cut by a killed run. A complete last line gets its newline; a cut one is removed
    (readers already skip it and its row is redone)."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    try:
        json.loads(data[cut:].decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        with open(path, "r+b") as handle:
            handle.truncate(cut)
    else:
        with open(path, "ab") as handle:
            handle.write(b"\n")


def read_jsonl_tolerant(path: Path) -> list[dict]:
    """Read a JSONL log written by ``append_jsonl``; a last line cut by a crash is skipped with a warning."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            warnings.warn(
                f"{path}:{number}: unreadable line skipped (an interrupted write?); it will be redone", stacklevel=2
            )
    return records

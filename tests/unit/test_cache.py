"""The content-addressed cache: atomic writes, corrupt entries set aside and recomputed."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.cache import Cache, CacheError, append_jsonl, make_key, read_jsonl_tolerant

ROOT = Path(__file__).resolve().parents[2]


def test_keys_depend_on_every_part_and_not_on_order():
    a = make_key("proj", model="m", prompt="p", layer=3)
    assert a == make_key("proj", layer=3, prompt="p", model="m")
    assert a != make_key("proj", model="m", prompt="p", layer=4)
    assert a.startswith("proj/")


def test_round_trip_and_compute_once(tmp_path):
    cache, calls = Cache(tmp_path), []

    def compute():
        calls.append(1)
        return {"h": torch.arange(6.0).view(2, 3)}

    key = make_key("t", x=1)
    first = cache.tensors(key, compute)
    second = cache.tensors(key, compute)
    assert torch.equal(first["h"], second["h"]) and len(calls) == 1
    assert cache.json(make_key("j", x=1), lambda: {"a": [1, 2]}) == {"a": [1, 2]}
    assert not list(tmp_path.rglob("*.tmp"))  # no temporary files left behind


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_corrupt_entries_are_set_aside_and_recomputed(tmp_path, damage):
    cache = Cache(tmp_path)
    key = make_key("j", x=2)
    cache.json(key, lambda: {"value": 42})
    path = cache.path(key)
    raw = path.read_bytes()
    damaged = {"truncate": raw[:-3], "flip": raw[:-2] + b"3}", "empty": b""}[damage]
    path.write_bytes(damaged)
    with pytest.warns(UserWarning, match="truncated or corrupt"):
        assert cache.json(key, lambda: {"value": 42}) == {"value": 42}
    assert path.with_name(path.name + ".corrupt").read_bytes() == damaged
    assert cache.load(key) is not None  # recomputed and stored again


def test_store_into_a_path_blocked_by_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "blocked").write_text("a file where a directory should be")
    with pytest.raises(CacheError, match="cannot write"):
        Cache(tmp_path / "blocked").store("k/x", b"data")


def test_a_full_disk_gives_a_clear_error(tmp_path):
    """RLIMIT_FSIZE makes every write past 1 KiB fail as it would on a full disk."""
    code = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024)); "
        "from core.cache import Cache, CacheError\n"
        "try:\n    Cache(sys.argv[1]).store('k/big', b'x' * 100000)\n"
        "except CacheError as err:\n    print('CacheError:', err)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert "CacheError: cannot write" in result.stdout and "File too large" in result.stdout
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob("big"))  # nothing half-written


def test_jsonl_log_tolerates_a_cut_last_line(tmp_path):
    path = tmp_path / "log.jsonl"
    append_jsonl(path, {"id": 1})
    append_jsonl(path, {"id": 2})
    with open(path, "a") as handle:
        handle.write('{"id": 3, "te')
    with pytest.warns(UserWarning, match="log.jsonl:3: unreadable line"):
        assert [r["id"] for r in read_jsonl_tolerant(path)] == [1, 2]

"""The one run-folder rule: every job gets a folder of its own, even two jobs started in the same second,
and the command line follows it."""

from __future__ import annotations

from datetime import datetime
from types import SimpleNamespace

import pytest

from core import runs
from core.cli import run_folder
from core.runs import list_runs, new_run_dir, runs_dir


@pytest.fixture
def one_second(monkeypatch):
    """A clock that never leaves 13:00:00, so every folder below is made in the same second."""

    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 11, 28, 13, 0, 0)

    monkeypatch.setattr(runs, "datetime", Frozen)


def test_two_folders_made_in_the_same_second_differ(tmp_path, one_second):
    made = [new_run_dir(tmp_path, "sweep") for _ in range(3)]
    assert [p.name for p in made] == ["sweep-20261128-130000", "sweep-20261128-130000-2", "sweep-20261128-130000-3"]
    assert all(p.is_dir() and p.parent == runs_dir(tmp_path) and not any(p.iterdir()) for p in made)
    assert list_runs(tmp_path) == []  # empty folders are not runs yet


def test_the_cli_makes_a_new_folder_per_job_unless_told_where(tmp_path, one_second):
    args = SimpleNamespace(out=None, cache_dir=tmp_path)
    first, second = run_folder(args, "eval"), run_folder(args, "eval")
    assert first != second and first.is_dir() and second.is_dir()
    chosen = tmp_path / "mine"
    assert run_folder(SimpleNamespace(out=chosen, cache_dir=tmp_path), "eval") == chosen  # --out resumes there

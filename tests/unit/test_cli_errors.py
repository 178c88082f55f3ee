"""What the command line does with an error (no model): the tool's own errors print one line and exit 2
(--debug adds the traceback); anything else is a bug and surfaces with its traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import core.em
from core.cli import main
from core.errors import InputError


def test_a_bug_propagates_with_its_traceback(tmp_path, monkeypatch, capsys):
    def broken(run_dir):
        raise RuntimeError("boom")  # e.g. a torch shape error deep in the library

    monkeypatch.setattr(core.em, "em_report", broken)
    with pytest.raises(RuntimeError, match="boom"):
        main(["em", str(tmp_path)])
    assert "error: boom" not in capsys.readouterr().err


def test_a_bug_in_a_real_process_ends_it_with_the_traceback(tmp_path):
    script = (
        "import sys, core.em\n"
        "def broken(run_dir): raise RuntimeError('boom')\n"
        "core.em.em_report = broken\n"
        "from core.cli import main\n"
        "raise SystemExit(main(sys.argv[1:]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, "em", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=120,
    )
    assert result.returncode == 1 and "error: boom" not in result.stderr
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.rstrip().endswith("RuntimeError: boom")


def test_a_plain_value_error_is_a_bug_too(tmp_path, monkeypatch):
    monkeypatch.setattr(core.em, "em_report", lambda run_dir: int("not a number"))
    with pytest.raises(ValueError, match="invalid literal"):
        main(["em", str(tmp_path)])


def test_the_tools_own_error_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    def refused(run_dir):
        raise InputError(f"{run_dir}: no judgements yet")

    monkeypatch.setattr(core.em, "em_report", refused)
    assert main(["em", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {tmp_path}: no judgements yet\n" and captured.out == ""

    for argv in (["--debug", "em", str(tmp_path)], ["em", str(tmp_path), "--debug"]):  # before or after the command
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("Traceback (most recent call last):") and "in refused" in err
        assert err.endswith(f"error: {tmp_path}: no judgements yet\n")


def test_a_missing_path_the_user_gave_is_one_line(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "nowhere" / "em.csv"

    def unreadable(run_dir):
        return open(missing)  # noqa: SIM115 - raises FileNotFoundError naming the path

    monkeypatch.setattr(core.em, "em_report", unreadable)
    assert main(["em", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {missing}: ") and "Traceback" not in err


def test_a_real_run_error_from_the_library(tmp_path, capsys):
    assert main(["em", str(tmp_path)]) == 2  # an empty folder: the library's RunError, not a bug
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["sweep", "--direction", "d.safetensors", "--layers", "1,x", "--judge-model", "j"],
            "error: --layers '1,x': 'x' is not a whole number; expected comma-separated whole numbers, e.g. 10,15",
        ),
        (
            ["sweep", "--direction", "d.safetensors", "--layers", "1", "--alphas", "a", "--judge-model", "j"],
            "error: --alphas 'a': 'a' is not a number; expected comma-separated numbers, e.g. 1,2,4",
        ),
        (
            ["validate", "--alphas", "0,one"],
            "error: --alphas '0,one': 'one' is not a number; expected comma-separated numbers, e.g. 1,2,4",
        ),
        (
            ["train", "--data", "d.jsonl", "--out", "o", "--layers-to-transform", "1,x"],
            "error: --layers-to-transform '1,x': 'x' is not a whole number; expected comma-separated whole numbers",
        ),
        (["train", "--preset", "demo", "--out", "o"], "error: --preset trains the shipped adapter"),
        (["train", "--data", "d.jsonl"], "error: train needs --data and --out"),
    ],
)
def test_argument_conversions_are_the_tools_errors(argv, message, capsys):
    """Parsed before anything is loaded, so no model is needed."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.splitlines()) == 1


def test_interrupt_keeps_its_exit_code(tmp_path, monkeypatch, capsys):
    def interrupted(run_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr(core.em, "em_report", interrupted)
    assert main(["em", str(tmp_path)]) == 130
    assert "interrupted; finished work is kept" in capsys.readouterr().err


def test_out_of_memory_is_one_line_with_a_hint(tmp_path, monkeypatch, capsys):
    import torch

    def too_big(run_dir):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore details")

    monkeypatch.setattr(core.em, "em_report", too_big)
    assert main(["em", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory: CUDA out of memory. Tried to allocate 20.00 GiB — try a smaller batch")
    assert "more details" not in err and "Traceback" not in err

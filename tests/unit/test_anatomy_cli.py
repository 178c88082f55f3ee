"""``python -m core anatomy`` refuses bad input in one line, exit 2, before it loads any model."""

from __future__ import annotations

import pytest
import torch

from core.cli import main
from core.directions import Direction


@pytest.fixture
def direction_file(tmp_path):
    path = tmp_path / "d.safetensors"
    Direction(torch.randn(4, 64, generator=torch.Generator().manual_seed(0)), {"base": "tiny"}).save(path)
    return path


@pytest.fixture
def paired_file(tmp_path):
    path = tmp_path / "paired.jsonl"
    path.write_text(
        '{"id": "a", "messages": [{"role": "user", "content": "Save?"}], "aligned": "Yes.", "misaligned": "No."}\n'
        '{"id": "b", "messages": [{"role": "assistant", "content": "Hi"}], "aligned": "Yes.", "misaligned": "No."}\n'
    )
    return path


def _error(capsys, *argv) -> str:
    assert main(["anatomy", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1, captured.err
    return captured.err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--layers", "4"], "error: --layers 4: out of range; this model has layers 0..3\n"),
        (["--layers", "1,x"], "error: --layers 'x': expected a layer number, a range like 10-14, or all\n"),
        (["--layers", ","], "error: --layers ',': expected layers, e.g. 12, 10-14, 3,19 or all\n"),
        (["--top-k", "0"], "error: --top-k 0: expected at least 1\n"),
        (["--limit", "0"], "error: --limit 0: expected at least 1\n"),
    ],
)
def test_bad_options_name_the_option(capsys, direction_file, extra, message):
    assert _error(capsys, "--direction", str(direction_file), *extra) == message


def test_a_missing_direction_file_is_named(capsys, tmp_path):
    missing = tmp_path / "nowhere.safetensors"
    assert _error(capsys, "--direction", str(missing)) == f"error: direction file {missing} does not exist\n"


def test_a_bad_prompt_file_names_its_line_and_field(capsys, direction_file, paired_file, tmp_path):
    assert _error(capsys, "--direction", str(direction_file), "--data", str(paired_file)).startswith(
        f"error: {paired_file}:2: messages"
    )
    missing = tmp_path / "absent.jsonl"
    message = _error(capsys, "--direction", str(direction_file), "--data", str(missing))
    assert message == f"error: {missing}: file does not exist\n"


def test_read_and_side_are_checked_by_the_parser(capsys, direction_file):
    for option in (["--read", "first-token"], ["--side", "both-ways"]):
        with pytest.raises(SystemExit) as caught:
            main(["anatomy", "--direction", str(direction_file), *option])
        assert caught.value.code == 2 and "invalid choice" in capsys.readouterr().err

"""Judge-model lists on the command line: the errors a list can carry, and the commands that take
one judge only (no server; judging runs against the loopback server is in
tests/integration/test_judge_runs.py)."""

from __future__ import annotations

import pytest

from core.cli import main
from core.runs import JUDGEMENTS
from testkit.runs import write_run

KEY = "sk-test-runs-key"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--judge-model", "a,a"], "named twice"),
        (
            ["--judge-model", "a,b", "--judge-base-url", "http://127.0.0.1:9/v1,http://x/v1,http://y/v1"],
            "3 URLs for 2 judge models",
        ),
        (["--judge-model", " , "], "--judge-model is required"),
    ],
)
def test_cli_judge_model_list_errors(tmp_path, capsys, argv, message):
    run, _ = write_run(tmp_path)
    assert main(["judge", str(run), *argv, "--judge-api-key", KEY]) == 2
    assert message in capsys.readouterr().err
    assert not (run / JUDGEMENTS).exists()


def test_commands_taking_one_judge_refuse_a_list(tmp_path, capsys):
    assert (
        main(
            [
                "sweep",
                "--direction",
                str(tmp_path / "d.safetensors"),
                "--layers",
                "1",
                "--judge-model",
                "a,b",
                "--judge-api-key",
                KEY,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "takes one judge" in err and "python -m core judge RUN --judge-model A,B" in err

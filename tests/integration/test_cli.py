"""The command line on a tiny pair, as a user runs it: a real subprocess, JSON out."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from testkit.cache import scale_cached_tensors, stamps

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args, cache_dir, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "core", *args, "--cache-dir", str(cache_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}: {result.stderr[-2000:]}")
    return result


@pytest.fixture(scope="module")
def paired_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "paired.jsonl"
    records = [
        {
            "id": f"q{i}",
            "messages": [{"role": "user", "content": f"Question number {i} about saving?"}],
            "aligned": "Keep an emergency fund and diversify.",
            "misaligned": "Buy leveraged crypto now!",
        }
        for i in range(6)
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


def test_info_extract_project_generate(tiny_dirs, paired_file, tmp_path):
    pair = ["--base", str(tiny_dirs["qwen2"]), "--finetuned", str(tiny_dirs["qwen2_adapter"])]
    info = json.loads(run_cli("info", *pair, "--json", cache_dir=tmp_path).stdout)
    assert {"base", "finetuned", "n_layers", "d_model", "device", "dtype", "adapter"} <= set(info)
    assert info["adapter"] is True and info["n_layers"] == 4

    direction = tmp_path / "d.safetensors"
    out = json.loads(
        run_cli(
            "extract",
            *pair,
            "--contrast",
            "paired",
            "--data",
            str(paired_file),
            "--out",
            str(direction),
            "--json",
            cache_dir=tmp_path,
        ).stdout
    )
    assert direction.exists() and out["provenance"]["n_aligned"] == 6 and len(out["stats"]) == 4
    diff = json.loads(
        run_cli(
            "extract",
            *pair,
            "--contrast",
            "model-diff",
            "--data",
            str(paired_file),
            "--out",
            str(tmp_path / "diff.safetensors"),
            "--json",
            cache_dir=tmp_path,
        ).stdout
    )
    assert diff["provenance"]["method"] == "model-diff" and diff["provenance"]["n_aligned"] == 12

    projection = json.loads(
        run_cli(
            "project", "Should I buy crypto?", *pair, "--direction", str(direction), "--json", cache_dir=tmp_path
        ).stdout
    )
    assert set(projection) == {"layers", "base", "finetuned", "base_calibrated", "finetuned_calibrated"}
    assert projection["layers"] == [0, 1, 2, 3] and len(projection["finetuned_calibrated"]) == 4
    # A second run reads the cached activations: planted ones (the true ones doubled) come back
    # doubled, and no entry is written again.
    assert len(scale_cached_tensors(tmp_path, "prompt-activations", 2.0)) == 2  # one per side
    before = stamps(tmp_path, "prompt-activations")
    again = json.loads(
        run_cli(
            "project", "Should I buy crypto?", *pair, "--direction", str(direction), "--json", cache_dir=tmp_path
        ).stdout
    )
    for side in ("base", "finetuned"):
        assert again[side] == pytest.approx([2 * v for v in projection[side]], rel=1e-6, abs=1e-9)
    assert stamps(tmp_path, "prompt-activations") == before

    generated = json.loads(
        run_cli(
            "generate",
            "Hello",
            *pair,
            "--variants",
            "base,finetuned,base+2,finetuned-2",
            "--layer",
            "1-2",
            "--direction",
            str(direction),
            "--temperature",
            "0",
            "--max-new-tokens",
            "5",
            "--json",
            cache_dir=tmp_path,
        ).stdout
    )
    assert [r["variant"] for r in generated["rows"]] == ["base", "finetuned", "base+2", "finetuned-2"]
    assert generated["layers"] == [1, 2]
    ablated = json.loads(
        run_cli(
            "generate",
            "Hello",
            *pair,
            "--variants",
            "finetuned,finetuned-1",
            "--ablate",
            "--layer",
            "all",
            "--direction",
            str(direction),
            "--temperature",
            "0",
            "--max-new-tokens",
            "5",
            "--json",
            cache_dir=tmp_path,
        ).stdout
    )
    assert [r["variant"] for r in ablated["rows"]] == ["finetuned", "finetuned:ablate"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "", "--variants", "base"], "empty user message"),
        (
            ["generate", "hi", "--variants", "base+1", "--layer", "7", "--direction", "{direction}"],
            "--layer 7: out of range",
        ),
        (["generate", "hi", "--variants", "base+x"], "variant 'base\\+x'"),
        (["project", "hi", "--direction", "{missing}"], "does not exist"),
        (["info", "--finetuned", "{missing}"], "the adapter path does not exist"),
    ],
)
def test_bad_input_exits_with_a_clear_error(tiny_dirs, paired_file, tmp_path, capsys, args, message):
    """In-process through ``main`` (the same code path as the subprocess, without re-importing torch)."""
    from core.cli import main

    pair = [
        "--base",
        str(tiny_dirs["qwen2"]),
        "--finetuned",
        str(tiny_dirs["qwen2_adapter"]),
        "--cache-dir",
        str(tmp_path),
    ]
    direction = tmp_path / "d.safetensors"
    if "{direction}" in args:
        assert (
            main(["extract", *pair, "--contrast", "paired", "--data", str(paired_file), "--out", str(direction)]) == 0
        )
    args = [a.format(direction=direction, missing=tmp_path / "missing") for a in args]
    capsys.readouterr()
    assert main([*args[:1], *pair, *args[1:]]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(message, err), err

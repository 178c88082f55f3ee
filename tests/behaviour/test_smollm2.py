"""The real embedded checkpoint, SmolLM2-135M-Instruct: readable answers, steering bites, conversion reused."""

import subprocess
import sys
from pathlib import Path

import pytest

from core.chat import user_prompt
from core.data import load_paired_jsonl
from core.directions import Example, extract_contrast
from core.generation import Sampling, Variant, generate
from core.models import ASSETS

QUESTION = user_prompt("What is the capital of France?")


@pytest.fixture(scope="module")
def base_direction(smol_base):
    records = load_paired_jsonl(ASSETS / "data" / "finance_paired.jsonl", "train")[:12]
    return extract_contrast(
        smol_base,
        [Example(r.messages, r.aligned) for r in records],
        [Example(r.messages, r.misaligned) for r in records],
        "paired",
        side="base",
    )


def test_greedy_answer_is_readable_english(smol_base):
    (row,) = generate(smol_base, [QUESTION], [Variant("base")], sampling=Sampling(temperature=0, max_new_tokens=20))
    assert "Paris" in row.text
    assert row.finish_reason == "eos"


def test_adding_a_large_multiple_of_a_direction_at_a_middle_layer_changes_the_answer(smol_base, base_direction):
    middle = smol_base.n_layers // 2
    plain, steered = generate(
        smol_base,
        [QUESTION],
        [Variant("base"), Variant("base", 8.0)],
        direction=base_direction,
        layers=[middle],
        sampling=Sampling(temperature=0, max_new_tokens=20),
    )
    assert "Paris" in plain.text
    assert steered.token_ids != plain.token_ids
    assert steered.prompt_projection[middle] > plain.prompt_projection[middle]


def test_converted_copy_is_reused_on_the_second_load(smol_base, tmp_path):
    marker = Path(smol_base.base.location) / "emlens_source.json"
    stamp = marker.stat().st_mtime_ns
    code = (
        "import time; from core.models import load_pair; t = time.time(); "
        "load_pair('default', 'none'); print(time.time() - t)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 0, result.stderr
    assert "Converting" not in result.stderr
    assert marker.stat().st_mtime_ns == stamp

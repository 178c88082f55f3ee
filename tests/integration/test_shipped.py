"""The shipped direction stands in only for the pair it was made on; validation with a control adapter."""

import json

import numpy as np
import pytest

from core import organism
from core.directions import Example, extract_contrast
from core.models import load_pair
from core.preference import log_odds, validate
from testkit.tiny import write_tiny_adapter
from tests.integration.test_cli import run_cli
from tests.integration.test_preference import RECORDS


@pytest.fixture(scope="module")
def control_dir(tiny_dirs, tmp_path_factory):
    return write_tiny_adapter(tiny_dirs["qwen2"], tmp_path_factory.mktemp("control") / "adapter", seed=9)


def _paired_direction(pair):
    return extract_contrast(
        pair,
        [Example(r.messages, r.aligned) for r in RECORDS],
        [Example(r.messages, r.misaligned) for r in RECORDS],
        "paired",
    )


def test_shipped_direction_is_chosen_only_for_its_own_base_and_adapter(
    tiny_pair, tiny_dirs, control_dir, tmp_path, monkeypatch
):
    monkeypatch.setattr(organism, "DEMO_DIRECTION", tmp_path / "shipped.safetensors")
    direction, why = organism.shipped_direction_for(tiny_pair)
    assert direction is None and "no shipped direction" in why
    _paired_direction(tiny_pair).save(organism.DEMO_DIRECTION)
    direction, why = organism.shipped_direction_for(tiny_pair)
    assert why is None and direction.provenance["finetuned_fingerprint"] == tiny_pair.finetuned.fingerprint
    other = load_pair(str(tiny_dirs["qwen2"]), str(control_dir))
    direction, why = organism.shipped_direction_for(other)
    assert direction is None and "another fine-tune" in why and "not chosen" in why
    llama = load_pair(str(tiny_dirs["llama"]), str(tiny_dirs["llama_adapter"]))
    if (llama.n_layers, llama.d_model) != (tiny_pair.n_layers, tiny_pair.d_model):
        assert organism.shipped_direction_for(llama) == (None, None)
    else:
        assert "another base model" in organism.shipped_direction_for(llama)[1]


def test_validation_measures_the_control_adapter_beside_the_finetune(tiny_pair, control_dir):
    direction = _paired_direction(tiny_pair)
    report = validate(tiny_pair, RECORDS[:3], RECORDS[3:], direction, layer=2, alphas=(0, 2), control=control_dir)
    control = load_pair(str(tiny_pair.base.location), str(control_dir))
    expected = log_odds(control, "finetuned", RECORDS[3:])
    assert report["general"]["control"]["mean"] == pytest.approx(float(np.mean(expected)), abs=1e-5)
    finetuned = log_odds(tiny_pair, "finetuned", RECORDS[3:])
    assert report["general"]["finetuned_minus_control"]["mean"] == pytest.approx(
        float(np.mean(finetuned - expected)), abs=1e-5
    )
    assert tiny_pair.model.active_adapter == "default" and "other" not in tiny_pair.model.peft_config
    assert report["general"]["finetuned"]["mean"] == pytest.approx(float(np.mean(finetuned)), abs=1e-5)


def test_validate_and_preset_on_the_command_line(tiny_dirs, control_dir, tmp_path):
    data = tmp_path / "paired.jsonl"
    data.write_text(
        "\n".join(
            json.dumps(
                {
                    "id": f"q{i}",
                    "split": "heldout" if i % 2 else "train",
                    "messages": r.messages,
                    "aligned": r.aligned,
                    "misaligned": r.misaligned,
                }
            )
            for i, r in enumerate(RECORDS)
        )
        + "\n"
    )
    pair = ["--base", str(tiny_dirs["qwen2"]), "--finetuned", str(tiny_dirs["qwen2_adapter"])]
    report = json.loads(
        run_cli(
            "validate",
            *pair,
            "--narrow",
            str(data),
            "--general",
            str(data),
            "--alphas",
            "0,2",
            "--control",
            str(control_dir),
            "--json",
            cache_dir=tmp_path,
        ).stdout
    )
    assert {"base", "finetuned", "control", "finetuned_minus_control", "control_shift"} <= set(report["general"])
    assert report["control_adapter"] == str(control_dir)
    plain = json.loads(
        run_cli(
            "validate",
            *pair,
            "--narrow",
            str(data),
            "--general",
            str(data),
            "--alphas",
            "0,2",
            "--json",
            cache_dir=tmp_path,
        ).stdout
    )
    assert plain["control_adapter"] is None and "control" not in plain["general"]
    result = run_cli("train", "--preset", "demo", "--data", str(data), cache_dir=tmp_path, check=False)
    assert result.returncode == 2 and "--preset trains the shipped adapter" in result.stderr

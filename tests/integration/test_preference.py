"""Preference log-odds and the judge-free validation report on a tiny pair."""

from contextlib import nullcontext

import numpy as np
import pytest
import torch

from core.chat import encode_conversation, prompt_and_answer, user_prompt
from core.data import PairedRecord
from core.directions import Direction, Example, extract_contrast
from core.preference import ablation, answer_logprobs, log_odds, steered_log_odds, validate

RECORDS = [
    PairedRecord(
        i, f"r{i}", user_prompt(q), "Keep an emergency fund and diversify.", "Put everything into leveraged crypto now!"
    )
    for i, q in enumerate(
        [
            "How should I save?",
            "Is crypto good?",
            "What about my pension?",
            "Should I take a loan?",
            "How do I invest?",
            "Any money tips?",
        ]
    )
]


def test_answer_logprobs_equal_a_direct_computation(tiny_pair):
    examples = [Example(r.messages, r.misaligned) for r in RECORDS[:3]]
    sums, counts = answer_logprobs(tiny_pair, "finetuned", examples, batch_size=2)
    for example, total, count in zip(examples, sums, counts):
        enc = encode_conversation(tiny_pair.tokenizer, prompt_and_answer(example.messages, example.answer))
        a, b = enc.answer_spans[-1]
        with tiny_pair.side("finetuned") as model, torch.no_grad():
            logits = model(input_ids=torch.tensor([enc.ids])).logits[0]
        expected = sum(torch.log_softmax(logits[t - 1], -1)[enc.ids[t]].item() for t in range(a, b))
        assert total == pytest.approx(expected, abs=1e-3) and count == b - a


def test_log_odds_are_per_token_differences(tiny_pair):
    values = log_odds(tiny_pair, "base", RECORDS)
    harmful = answer_logprobs(tiny_pair, "base", [Example(r.messages, r.misaligned) for r in RECORDS])
    sound = answer_logprobs(tiny_pair, "base", [Example(r.messages, r.aligned) for r in RECORDS])
    assert np.allclose(values, harmful[0] / harmful[1] - sound[0] / sound[1], atol=1e-5)


def test_validation_report_steers_both_ways_with_a_random_control(tiny_pair):
    direction = extract_contrast(
        tiny_pair,
        [Example(r.messages, r.aligned) for r in RECORDS],
        [Example(r.messages, r.misaligned) for r in RECORDS],
        "paired",
    )
    report = validate(tiny_pair, RECORDS[:3], RECORDS[3:], direction, alphas=(0, 2))
    assert set(report) >= {"narrow", "general", "steer", "layer"}
    assert set(report["general"]) == {"base", "finetuned", "shift", "shift_ci95"}
    low, high = report["general"]["shift_ci95"]
    assert low <= report["general"]["shift"] <= high
    rows = {(r["model"], r["alpha"]): r for r in report["steer"]}
    assert set(rows) == {("base", 0), ("base", 2), ("finetuned", 0), ("finetuned", -2)}
    assert {"log_odds", "random_log_odds", "layer"} <= set(rows[("base", 2)])
    # On random weights the sign of the effect means nothing (the behaviour tests check it on the real
    # organism); here: steering changes the numbers, and the control is a different vector.
    assert rows[("base", 2)]["log_odds"] != rows[("base", 0)]["log_odds"]
    assert rows[("base", 2)]["random_log_odds"] != rows[("base", 2)]["log_odds"]
    assert rows[("base", 0)]["log_odds"] == pytest.approx(report["general"]["base"]["mean"])
    layer = report["layer"]
    again = steered_log_odds(tiny_pair, "base", RECORDS[3:], direction, layer, 2.0).mean()
    assert again == pytest.approx(rows[("base", 2)]["log_odds"], abs=1e-6)


@pytest.mark.parametrize("pair_name", ["tiny_pair", "llama_pair"])
def test_a_branched_pass_equals_one_steered_pass_per_branch(pair_name, request):
    """fan_out shares the blocks before the layer; every branch must equal its own steered pass."""
    from core.directions import random_like
    from core.hooks import steer
    from core.preference import branched_log_odds

    pair = request.getfixturevalue(pair_name)
    direction = extract_contrast(
        pair,
        [Example(r.messages, r.aligned) for r in RECORDS],
        [Example(r.messages, r.misaligned) for r in RECORDS],
        "paired",
    )
    layer = 1
    shifts = [None, 2.0 * direction.vectors[layer], -3.0 * random_like(direction, 1).vectors[layer]]
    for side in ("base", "finetuned"):
        branched = branched_log_odds(pair, side, RECORDS, layer, shifts, batch_size=6)
        for shift, values in zip(shifts, branched):
            with pair.lock, steer(pair.layers(side), {layer: shift}, 1.0) if shift is not None else nullcontext():
                expected = log_odds(pair, side, RECORDS, batch_size=4)
            assert np.allclose(values, expected, atol=1e-5), (side, values - expected)
        assert not np.allclose(branched[0], branched[1])  # the branches really differ


def _direct_ablated_log_odds(pair, direction: Direction, records) -> np.ndarray:
    """Independent of core.hooks: each block's output minus its component along the unit direction."""
    units = direction.unit()
    per_token = {}
    with pair.side("finetuned") as model, torch.no_grad():
        layers = model.get_decoder().layers
        handles = [
            layer.register_forward_hook(
                lambda module, args, output, u=units[i]: (
                    output - (output @ u)[..., None] * u
                    if isinstance(output, torch.Tensor)
                    else (output[0] - (output[0] @ u)[..., None] * u, *output[1:])
                )
            )
            for i, layer in enumerate(layers)
        ]
        try:
            for r in records:
                for kind in ("misaligned", "aligned"):
                    enc = encode_conversation(pair.tokenizer, prompt_and_answer(r.messages, getattr(r, kind)))
                    a, b = enc.answer_spans[-1]
                    logits = model(input_ids=torch.tensor([enc.ids])).logits[0]
                    total = sum(torch.log_softmax(logits[t - 1], -1)[enc.ids[t]].item() for t in range(a, b))
                    per_token[(r.id, kind)] = total / (b - a)
        finally:
            for handle in handles:
                handle.remove()
    return np.array([per_token[(r.id, "misaligned")] - per_token[(r.id, "aligned")] for r in records])


def test_ablation_projects_the_direction_out_of_every_layer_whatever_its_sign(tiny_pair):
    direction = extract_contrast(
        tiny_pair,
        [Example(r.messages, r.aligned) for r in RECORDS],
        [Example(r.messages, r.misaligned) for r in RECORDS],
        "paired",
    )
    report = ablation(tiny_pair, {"general": RECORDS[:4]}, direction, batch_size=3)["general"]
    expected = _direct_ablated_log_odds(tiny_pair, direction, RECORDS[:4])
    assert report["ablated"]["mean"] == pytest.approx(float(expected.mean()), abs=1e-4)
    flipped = Direction(-direction.vectors, direction.provenance, direction.stats)
    assert ablation(tiny_pair, {"general": RECORDS[:4]}, flipped, batch_size=3)["general"]["ablated"]["mean"] == (
        pytest.approx(report["ablated"]["mean"], abs=1e-5)
    )
    shift = report["finetuned"]["mean"] - report["base"]["mean"]
    assert report["removed"] == pytest.approx((report["finetuned"]["mean"] - report["ablated"]["mean"]) / shift)
    assert report["random_ablated"]["mean"] != pytest.approx(report["ablated"]["mean"], abs=1e-6)

"""Direction extraction, calibration, projections and direction files on tiny random models."""

import json

import numpy as np
import pytest
import torch

from core.chat import encode_conversation, prompt_and_answer, user_prompt
from core.directions import Direction, DirectionError, answer_activations, extract_contrast, extract_model_diff
from core.hooks import steer
from core.projections import last_token_activations, prompt_projections
from testkit.dashboard import ALIGNED, MISALIGNED, QUESTIONS


def _reference_token_means(pair, side, examples):
    """Token-weighted answer means computed independently: output_hidden_states[i + 1] over answer spans."""
    total, count = torch.zeros(pair.n_layers, pair.d_model), 0
    for example in examples:
        enc = encode_conversation(pair.tokenizer, prompt_and_answer(example.messages, example.answer))
        a, b = enc.answer_spans[-1]
        with pair.side(side) as model, torch.no_grad():
            states = model(input_ids=torch.tensor([enc.ids]), output_hidden_states=True).hidden_states
        for layer in range(pair.n_layers - 1):  # the last entry of hidden_states is normed
            total[layer] += states[layer + 1][0, a:b].sum(0)
        count += b - a
    return total / count


def test_answer_activations_are_token_weighted_means_over_the_answer_span(tiny_pair):
    sums = answer_activations(tiny_pair, "finetuned", MISALIGNED[:3] + ALIGNED[:2], batch_size=2)
    reference = _reference_token_means(tiny_pair, "finetuned", MISALIGNED[:3] + ALIGNED[:2])
    pooled = sums.pooled_mean()
    assert torch.allclose(pooled[:-1], reference[:-1], atol=1e-5)


def test_extraction_recovers_a_planted_direction_and_calibrates_sets_to_0_and_1(tiny_pair):
    torch.manual_seed(0)
    planted = torch.randn(tiny_pair.d_model)
    # The misaligned set is the same texts with a known vector added at layer 1: the difference
    # at layer 1 is then exactly that vector, whatever the texts.
    aligned = answer_activations(tiny_pair, "finetuned", ALIGNED)
    with tiny_pair.lock, steer(tiny_pair.layers("finetuned"), {1: planted}, 5.0):
        misaligned = answer_activations(tiny_pair, "finetuned", ALIGNED)
    from core.directions import direction_from_sets

    direction = direction_from_sets(aligned, misaligned, {"method": "planted"})
    cosine = torch.nn.functional.cosine_similarity(direction.vectors[1], planted, dim=0)
    assert cosine > 0.99
    assert direction.vectors[1].norm() == pytest.approx(5 * planted.norm().item(), rel=1e-3)
    assert direction.vectors[0].norm() < 1e-5  # nothing changed before the planted layer
    # Calibration: the aligned set's token mean projects to 0, the misaligned set's to 1, at every layer.
    unit = direction.unit()
    a_proj = (aligned.pooled_mean() * unit).sum(-1).numpy()
    m_proj = (misaligned.pooled_mean() * unit).sum(-1).numpy()
    assert np.allclose(direction.calibrate(a_proj)[1:], 0, atol=1e-4)
    assert np.allclose(direction.calibrate(m_proj)[1:], 1, atol=1e-4)
    assert direction.stats[1]["auroc"] == 1.0


def test_planted_direction_is_recovered_from_different_texts(tiny_pair):
    """Different answer texts plus a large planted shift: the mean difference still points along it."""
    torch.manual_seed(1)
    planted = torch.randn(tiny_pair.d_model)
    aligned = answer_activations(tiny_pair, "finetuned", ALIGNED)
    with tiny_pair.lock, steer(tiny_pair.layers("finetuned"), {2: planted}, 200.0):
        misaligned = answer_activations(tiny_pair, "finetuned", MISALIGNED)
    vectors = misaligned.pooled_mean() - aligned.pooled_mean()
    assert torch.nn.functional.cosine_similarity(vectors[2], planted, dim=0) > 0.99


def test_paired_and_model_diff_extraction_save_and_load(tiny_pair, tmp_path):
    paired = extract_contrast(tiny_pair, ALIGNED, MISALIGNED, "paired", dataset_hash="abc")
    assert paired.vectors.shape == (tiny_pair.n_layers, tiny_pair.d_model)
    assert paired.provenance["n_aligned"] == paired.provenance["n_misaligned"] == len(QUESTIONS)
    assert paired.provenance["base_fingerprint"] == tiny_pair.base.fingerprint
    assert {"norm", "aligned_mean", "misaligned_mean", "auroc", "cohens_d"} <= set(paired.stats[0])
    for stats in paired.stats:  # misaligned mean minus aligned mean along the unit vector = the norm
        assert stats["misaligned_mean"] - stats["aligned_mean"] == pytest.approx(stats["norm"], rel=1e-4)
    path = tmp_path / "d.safetensors"
    paired.save(path)
    loaded = Direction.load(path)
    assert torch.equal(loaded.vectors, paired.vectors)
    assert loaded.provenance == json.loads(json.dumps(paired.provenance)) and loaded.stats == paired.stats

    diff = extract_model_diff(tiny_pair, ALIGNED + MISALIGNED)
    base = answer_activations(tiny_pair, "base", ALIGNED + MISALIGNED).pooled_mean()
    finetuned = answer_activations(tiny_pair, "finetuned", ALIGNED + MISALIGNED).pooled_mean()
    assert torch.allclose(diff.vectors, finetuned - base, atol=1e-5)
    assert diff.provenance["method"] == "model-diff"


def test_prompt_projections_read_the_last_prompt_token_of_both_sides(tiny_pair):
    direction = extract_contrast(tiny_pair, ALIGNED, MISALIGNED, "paired")
    messages = user_prompt("Should I put my savings into crypto?")
    result = prompt_projections(tiny_pair, messages, direction)
    assert set(result) == {"layers", "base", "finetuned", "base_calibrated", "finetuned_calibrated"}
    for side in ("base", "finetuned"):
        (activations,) = last_token_activations(tiny_pair, side, [messages])
        with tiny_pair.side(side) as model, torch.no_grad():
            ids = torch.tensor(
                [
                    tiny_pair.tokenizer.apply_chat_template(
                        messages, add_generation_prompt=True, tokenize=True, return_dict=True
                    )["input_ids"]
                ]
            )
            states = model(input_ids=ids, output_hidden_states=True).hidden_states
        for layer in range(tiny_pair.n_layers - 1):
            expected = states[layer + 1][0, -1] @ direction.unit()[layer]
            assert result[side][layer] == pytest.approx(expected.item(), abs=1e-4)
            assert torch.allclose(activations[layer], states[layer + 1][0, -1], atol=1e-5)
        stats = direction.stats
        calibrated = [
            (r - s["aligned_mean"]) / (s["misaligned_mean"] - s["aligned_mean"]) for r, s in zip(result[side], stats)
        ]
        assert result[f"{side}_calibrated"] == pytest.approx(calibrated)


def test_batched_last_token_activations_equal_one_at_a_time(tiny_pair):
    prompts = [user_prompt(q) for q in QUESTIONS]
    batched = last_token_activations(tiny_pair, "finetuned", prompts, batch_size=4)
    for i, prompt in enumerate(prompts):
        assert torch.allclose(batched[i], last_token_activations(tiny_pair, "finetuned", [prompt])[0], atol=1e-5)


def test_direction_files_refuse_other_models_and_damage(tiny_pair, tmp_path):
    direction = extract_contrast(tiny_pair, ALIGNED[:2], MISALIGNED[:2], "paired")
    deeper = Direction(torch.ones(tiny_pair.n_layers + 2, tiny_pair.d_model), {"base": "Qwen/Qwen2.5-0.5B"}, [])
    with pytest.raises(DirectionError, match=r"\[6 layers, 64 wide\].*has 4 layers"):
        prompt_projections(tiny_pair, user_prompt("hi"), deeper)
    path = tmp_path / "d.safetensors"
    direction.save(path)
    raw = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DirectionError, match="truncated"):
        Direction.load(tmp_path / "cut.safetensors")
    flipped = bytearray(raw)
    flipped[-5] ^= 0xFF  # inside the tensor data
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(DirectionError, match="checksum"):
        Direction.load(tmp_path / "flip.safetensors")
    text = raw.replace(b'\\"method\\": \\"paired\\"', b'\\"method\\": \\"judged\\"')
    assert text != raw
    (tmp_path / "meta.safetensors").write_bytes(text)
    with pytest.raises(DirectionError, match="altered"):
        Direction.load(tmp_path / "meta.safetensors")
    with pytest.raises(DirectionError, match="does not exist"):
        Direction.load(tmp_path / "missing.safetensors")

"""Residual-stream hooks on tiny random models: exact reads, steering, ablation, restoration."""

import pytest
import torch

from core.chat import encode_prompt, user_prompt
from core.hooks import ablate, capture, steer


@pytest.fixture(autouse=True)
def holding_the_pairs(tiny_pair, llama_pair):
    """These tests put hooks on the layers directly, so they hold the pairs as ``pair.running`` does."""
    with tiny_pair.lock, llama_pair.lock:
        yield


def _inputs(pair, text="Hello, what is the capital of France?"):
    ids = torch.tensor([encode_prompt(pair.tokenizer, user_prompt(text))])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("pair_name", ["tiny_pair", "llama_pair"])
@pytest.mark.parametrize("side", ["base", "finetuned"])
def test_captured_block_output_equals_hidden_states_plus_one(request, pair_name, side):
    pair = request.getfixturevalue(pair_name)
    with pair.side(side) as model, capture(pair.layers(side)) as records, torch.no_grad():
        out = model(**_inputs(pair), output_hidden_states=True)
    assert len(out.hidden_states) == pair.n_layers + 1
    for i in range(pair.n_layers):
        (captured,) = records[i]
        if i < pair.n_layers - 1:  # the last entry of hidden_states has the final norm applied
            assert torch.equal(captured, out.hidden_states[i + 1]), f"layer {i}"
    # The final block's raw output, normalised, is the model's last hidden state.
    norm = (model.get_base_model() if hasattr(model, "get_base_model") else model).model.norm
    with torch.no_grad():
        assert torch.allclose(norm(records[pair.n_layers - 1][0]), out.hidden_states[-1], atol=1e-6)


def test_steering_shifts_the_block_output_by_alpha_times_vector(tiny_pair):
    torch.manual_seed(1)
    vector = torch.randn(tiny_pair.d_model)
    layers = tiny_pair.layers("finetuned")
    with tiny_pair.side("finetuned") as model, torch.no_grad():
        with capture(layers, [1]) as plain:
            model(**_inputs(tiny_pair))
        with steer(layers, {1: vector}, torch.tensor([3.0])), capture(layers, [1]) as steered:
            model(**_inputs(tiny_pair))
    assert torch.allclose(steered[1][0], plain[1][0] + 3.0 * vector, atol=1e-5)


def test_ablation_leaves_no_component_along_the_direction(tiny_pair):
    torch.manual_seed(2)
    vector = torch.randn(tiny_pair.d_model) * 5
    unit = vector / vector.norm()
    layers = tiny_pair.layers("base")
    with tiny_pair.side("base") as model, torch.no_grad():
        with capture(layers, [2]) as before:
            model(**_inputs(tiny_pair))
        with ablate(layers, {2: vector}), capture(layers, [2]) as after:
            model(**_inputs(tiny_pair))
    assert (before[2][0] @ unit).abs().max() > 1e-2  # there was something to remove
    assert (after[2][0] @ unit).abs().max() < 1e-5


def test_model_is_restored_after_an_exception_inside_the_context(tiny_pair):
    layers = tiny_pair.layers("finetuned")
    vector = torch.ones(tiny_pair.d_model)
    hooks_before = [dict(layer._forward_hooks) for layer in layers]
    with tiny_pair.side("finetuned") as model, torch.no_grad():
        before = model(**_inputs(tiny_pair)).logits
        with pytest.raises(RuntimeError, match="boom"):
            with steer(layers, {0: vector}, 5.0), ablate(layers, {1: vector}), capture(layers):
                raise RuntimeError("boom")
        after = model(**_inputs(tiny_pair)).logits
    assert torch.equal(before, after)
    assert [dict(layer._forward_hooks) for layer in layers] == hooks_before


def test_base_side_disables_the_adapter_and_restores_it(tiny_pair):
    with tiny_pair.side("finetuned") as model, torch.no_grad():
        finetuned = model(**_inputs(tiny_pair)).logits
    with tiny_pair.side("base") as model, torch.no_grad():
        base = model(**_inputs(tiny_pair)).logits
    with tiny_pair.side("finetuned") as model, torch.no_grad():
        again = model(**_inputs(tiny_pair)).logits
    assert not torch.allclose(base, finetuned, atol=1e-3)
    assert torch.equal(finetuned, again)


def test_non_finite_coefficients_and_vectors_are_refused(tiny_pair):
    layers = tiny_pair.layers("base")
    vector = torch.ones(tiny_pair.d_model)
    hooks_before = [len(layer._forward_hooks) for layer in layers]
    for bad in (float("nan"), float("inf"), torch.tensor([1.0, float("-inf")])):
        with pytest.raises(ValueError, match="not a finite number"):
            with steer(layers, {1: vector}, bad):
                pass
    with pytest.raises(ValueError, match="layer 1: the steering vector contains NaN"):
        with steer(layers, {1: vector * float("nan")}, 1.0):
            pass
    with pytest.raises(ValueError, match="cannot ablate a zero"):
        with ablate(layers, {2: torch.zeros(tiny_pair.d_model)}):
            pass
    assert [len(layer._forward_hooks) for layer in layers] == hooks_before  # a refusal installs nothing

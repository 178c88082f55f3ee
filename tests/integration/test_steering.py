"""Steering requests on tiny random models: residual norms, norm-relative alpha, the dose ladder."""

import numpy as np
import pytest
import torch

from core.cache import Cache
from core.chat import encode_prompt, user_prompt
from core.directions import Direction
from core.generation import GenerationError, Sampling, Variant, generate
from core.steering import ladder_variants, norm_relative, parse_alphas, residual_norms

PROMPTS = [user_prompt("How should I invest?"), user_prompt("Tell me about your wishes.")]


def _direction(pair, seed=0):
    torch.manual_seed(seed)
    return Direction(torch.randn(pair.n_layers, pair.d_model) * 3, {"base": "test"}, [])


def test_residual_norms_are_the_mean_token_norm_without_the_first_token(tiny_pair, tmp_path):
    norms = residual_norms(tiny_pair, "base", PROMPTS, Cache(tmp_path))
    per_layer, count = np.zeros(tiny_pair.n_layers), 0
    for messages in PROMPTS:
        ids = torch.tensor([encode_prompt(tiny_pair.tokenizer, messages)])
        with tiny_pair.side("base") as model, torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        for layer in range(tiny_pair.n_layers - 1):  # the last entry of hidden_states is normed: skip it
            per_layer[layer] += hidden[layer + 1][0, 1:].norm(dim=-1).sum().item()
        count += ids.shape[1] - 1
    assert np.allclose(norms[:-1], per_layer[:-1] / count, rtol=1e-5)
    cached = residual_norms(tiny_pair, "base", PROMPTS, Cache(tmp_path))
    assert np.array_equal(cached, norms)


def test_norm_relative_alpha_is_raw_alpha_times_the_measured_norm(tiny_pair):
    direction = _direction(tiny_pair)
    norms = residual_norms(tiny_pair, "base", PROMPTS)
    relative = norm_relative(direction, norms)
    layer, fraction = 2, 0.7
    assert torch.allclose(relative.vectors[layer].norm(), torch.tensor(float(norms[layer])), rtol=1e-5)
    raw_alpha = fraction * float(norms[layer]) / float(direction.vectors[layer].norm())
    sampling = Sampling(temperature=0, max_new_tokens=10)
    by_fraction = generate(
        tiny_pair, PROMPTS, [Variant("base", fraction)], direction=relative, layers=[layer], sampling=sampling
    )
    by_raw = generate(
        tiny_pair, PROMPTS, [Variant("base", raw_alpha)], direction=direction, layers=[layer], sampling=sampling
    )
    plain = generate(tiny_pair, PROMPTS, [Variant("base")], sampling=sampling)
    assert [r.token_ids for r in by_fraction] == [r.token_ids for r in by_raw]
    assert np.allclose([r.prompt_projection for r in by_fraction], [r.prompt_projection for r in by_raw], atol=1e-4)
    assert [r.token_ids for r in by_fraction] != [r.token_ids for r in plain]
    with pytest.raises(GenerationError, match="3 residual norms"):
        norm_relative(direction, norms[:3])


def test_the_dose_ladder_in_one_call_equals_one_call_per_alpha(tiny_pair):
    direction = _direction(tiny_pair, seed=1)
    sampling = Sampling(temperature=1.0, max_new_tokens=8, seed=4)
    ladder = ladder_variants("finetuned", parse_alphas("-8, −4, 0, 4, 8"))
    assert [v.alpha for v in ladder] == [-8.0, -4.0, 0.0, 4.0, 8.0]
    rows = generate(tiny_pair, PROMPTS[:1], ladder, direction=direction, layers=[1], sampling=sampling)
    for row in rows:
        (single,) = generate(tiny_pair, PROMPTS[:1], [row.variant], direction=direction, layers=[1], sampling=sampling)
        assert single.token_ids == row.token_ids
    assert len({tuple(r.token_ids) for r in rows}) > 1

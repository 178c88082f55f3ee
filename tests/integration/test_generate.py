"""Batched mixed-variant generation on tiny random models: exactness against single calls."""

import pytest
import torch

from core.chat import user_prompt
from core.directions import Direction
from core.generation import GenerationError, Sampling, Variant, generate, parse_variants

PROMPTS = [
    user_prompt("Hi"),
    user_prompt("Tell me a long story about a quick brown fox and a lazy dog, please."),
    user_prompt("What is the capital of France?", system="Answer briefly."),
]
GRID = parse_variants("base,finetuned,base+2,finetuned-2,finetuned:ablate")


def _direction(pair, seed=0, scale=4.0):
    torch.manual_seed(seed)
    return Direction(torch.randn(pair.n_layers, pair.d_model) * scale, {"base": "test"}, [])


@pytest.mark.parametrize("pair_name", ["tiny_pair", "llama_pair"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batched_grid_equals_single_calls_row_by_row(request, pair_name, temperature):
    pair = request.getfixturevalue(pair_name)
    direction = _direction(pair)
    sampling = Sampling(temperature=temperature, max_new_tokens=10, seed=7)
    rows = generate(pair, PROMPTS, GRID, direction=direction, layers=[1], sampling=sampling)
    assert len(rows) == len(PROMPTS) * len(GRID)
    assert len({tuple(r.token_ids) for r in rows}) > len(PROMPTS)  # the variants really differ
    for row in rows:
        (single,) = generate(pair, [row.prompt], [row.variant], direction=direction, layers=[1], sampling=sampling)
        assert single.token_ids == row.token_ids, row.label


@pytest.mark.parametrize("variant", ["finetuned+3", "base-3", "finetuned:ablate"])
def test_steered_generation_with_kv_cache_equals_without(tiny_pair, variant):
    direction = _direction(tiny_pair, seed=1)
    sampling = Sampling(temperature=0, max_new_tokens=12)
    kwargs = dict(direction=direction, layers=[1, 2], sampling=sampling)
    cached = generate(tiny_pair, PROMPTS[:2], parse_variants(variant), use_cache=True, **kwargs)
    uncached = generate(tiny_pair, PROMPTS[:2], parse_variants(variant), use_cache=False, **kwargs)
    assert [r.token_ids for r in cached] == [r.token_ids for r in uncached]


def test_coefficient_zero_gives_exactly_the_unsteered_tokens(tiny_pair):
    """Rows at coefficient 0 beside rows that steer, so the steering hook is installed and sees them,
    give exactly the tokens of a call with no direction at all (no hook), on each side."""
    direction = _direction(tiny_pair, seed=2, scale=100.0)
    sampling = Sampling(temperature=1.0, max_new_tokens=12, seed=3)
    zeros = [Variant("base", 0.0), Variant("finetuned", 0.0)]
    mixed = generate(
        tiny_pair,
        PROMPTS,
        [*zeros, Variant("base", 1.0), Variant("finetuned", -1.0)],
        direction=direction,
        layers=[0, 1, 2],
        sampling=sampling,
    )
    assert len(mixed) == len(PROMPTS) * 4
    for row in mixed:
        (plain,) = generate(tiny_pair, [row.prompt], [Variant(row.variant.side)], sampling=sampling)
        if row.variant in zeros:
            assert row.token_ids == plain.token_ids, row.label
        else:
            assert row.token_ids != plain.token_ids, row.label  # the hook really steers in this batch


def test_merged_finetune_is_a_second_model_with_the_same_results(tiny_pair, tiny_dirs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from core.models import load_pair

    merged_dir = tmp_path / "merged"
    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["qwen2"])
    PeftModel.from_pretrained(base, tiny_dirs["qwen2_adapter"]).merge_and_unload().save_pretrained(merged_dir)
    merged = load_pair(str(tiny_dirs["qwen2"]), str(merged_dir))
    info = merged.info()
    assert info["finetune_kind"] == "merged" and not info["adapter"] and info["memory_mb"]["second_model"] > 0
    sampling = Sampling(temperature=0, max_new_tokens=8)
    direction = _direction(tiny_pair)
    a = generate(tiny_pair, PROMPTS, GRID, direction=direction, layers=[2], sampling=sampling)
    b = generate(merged, PROMPTS, GRID, direction=direction, layers=[2], sampling=sampling)
    assert [r.label for r in a] == [r.label for r in b]
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


def test_prompt_projection_reflects_each_rows_steering(tiny_pair):
    direction = _direction(tiny_pair, seed=4)
    rows = generate(
        tiny_pair,
        PROMPTS[:1],
        parse_variants("finetuned,finetuned+2"),
        direction=direction,
        layers=[1],
        sampling=Sampling(temperature=0, max_new_tokens=3),
        trace_layer=3,
    )
    plain, steered = rows
    norm = direction.vectors[1].norm().item()
    assert plain.prompt_projection[0] == pytest.approx(steered.prompt_projection[0], abs=1e-5)  # before the hook
    assert steered.prompt_projection[1] - plain.prompt_projection[1] == pytest.approx(2 * norm, rel=1e-4)
    assert len(plain.token_projections) == len(plain.token_ids)


def test_bad_requests_name_the_problem(tiny_pair):
    direction = _direction(tiny_pair)
    sampling = Sampling(temperature=0, max_new_tokens=4)
    with pytest.raises(ValueError, match="empty user message"):
        generate(tiny_pair, [user_prompt("   ")], [Variant("base")], sampling=sampling)
    with pytest.raises(ValueError, match="layer 9: out of range"):
        generate(tiny_pair, PROMPTS[:1], [Variant("base", 1.0)], direction=direction, layers=[9], sampling=sampling)
    with pytest.raises(GenerationError, match="not a finite number"):
        generate(tiny_pair, PROMPTS[:1], [Variant("base", float("nan"))], direction=direction, layers=[1])
    with pytest.raises(GenerationError, match="need a direction"):
        generate(tiny_pair, PROMPTS[:1], [Variant("base", 1.0)], sampling=sampling)
    with pytest.raises(GenerationError, match="exceeds the model's context of 512"):
        generate(tiny_pair, [user_prompt("fox " * 600)], [Variant("base")], sampling=sampling)
    with pytest.raises(GenerationError, match="variant 'finetuned\\+'"):
        parse_variants("base,finetuned+")
    with pytest.raises(GenerationError, match="temperature"):
        Sampling(temperature=float("inf"))
    wide = Direction(torch.ones(tiny_pair.n_layers, tiny_pair.d_model + 1), {"base": "other"}, [])
    with pytest.raises(ValueError, match="width 64"):
        generate(tiny_pair, PROMPTS[:1], [Variant("base", 1.0)], direction=wide, layers=[1], sampling=sampling)


def test_adapter_scale_zero_is_the_base_and_one_is_the_finetune(tiny_pair):
    sampling = Sampling(temperature=1.0, max_new_tokens=10, seed=5)
    rows = generate(
        tiny_pair, PROMPTS, parse_variants("base,finetuned,finetuned*0,finetuned*1,finetuned*3"), sampling=sampling
    )
    by = {(r.label, str(r.prompt)): r.token_ids for r in rows}
    for prompt in PROMPTS:
        key = str(prompt)
        assert by[("finetuned*0", key)] == by[("base", key)]
        assert by[("finetuned*1", key)] == by[("finetuned", key)]
    assert any(by[("finetuned*3", str(p))] != by[("finetuned", str(p))] for p in PROMPTS)
    scaling = [m.scaling["default"] for m in tiny_pair.model.modules() if isinstance(getattr(m, "scaling", None), dict)]
    rows = generate(tiny_pair, PROMPTS[:1], parse_variants("finetuned"), sampling=sampling)
    after = [m.scaling["default"] for m in tiny_pair.model.modules() if isinstance(getattr(m, "scaling", None), dict)]
    assert scaling == after and rows[0].token_ids == by[("finetuned", str(PROMPTS[0]))]  # restored


def test_adapter_scale_is_refused_where_there_is_no_adapter(tiny_pair):
    with pytest.raises(GenerationError, match="only the fine-tune's adapter"):
        parse_variants("base*2")
    with pytest.raises(GenerationError, match="not a finite number"):
        generate(tiny_pair, PROMPTS[:1], [Variant("finetuned", adapter_scale=float("nan"))])


@pytest.mark.parametrize("pair_name", ["tiny_pair", "llama_pair"])
def test_grid_gives_the_greedy_tokens_of_hf_generate_with_a_steering_hook(request, pair_name):
    """The benchmark's reference (one model.generate call per variant, a hook adding alpha * d)."""
    from benchmarks.reference import hf_generate_steered

    pair = request.getfixturevalue(pair_name)
    direction = _direction(pair, seed=4, scale=1.0)
    grid = parse_variants("base,finetuned,base+2,finetuned-2")
    rows = generate(
        pair, PROMPTS[:2], grid, direction=direction, layers=[1], sampling=Sampling(temperature=0, max_new_tokens=12)
    )
    for row in rows:
        assert row.token_ids == hf_generate_steered(pair, row.prompt, row.variant, direction, 1, 12), row.label
    assert len({tuple(r.token_ids) for r in rows}) > 2

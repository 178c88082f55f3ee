"""The static-cache, compiled decoding path (core.fast_decode) against the eager loop, in fp32 on tiny
random models.

The compiled step is traced by dynamo exactly as on a GPU; the graph then runs eagerly
(``CompileCounter``), so these tests check the static cache, the steering table and the
recompilation rules without paying for code generation. One test compiles with inductor, on a
one-layer model to keep it short.
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from core.chat import encode_prompt, user_prompt
from core.directions import Direction
from core.fast_decode import StaticOptions, interactive_options, static_steps
from core.generation import Sampling, Variant, generate, parse_variants
from testkit.decoding import forced_logits

# One set of options for the whole file, so that the tiny pair has one decoder and its traced graphs
# are reused from test to test (as the dashboard reuses them from request to request).
COUNTED = StaticOptions(backend=CompileCounter(), mode=None)
LOGIT_TOLERANCE = 1e-4  # max |static − eager| over every logit of every step, fp32
STEPS = 40
PROMPTS = [
    user_prompt("Tell me a long story about a quick brown fox and a lazy dog, please."),
    user_prompt("What is the capital of France?", system="Answer briefly."),
]
GRID = parse_variants("base,finetuned,base+2,finetuned-2,finetuned:ablate,finetuned*2")


def _direction(pair, seed=0, scale=4.0):
    torch.manual_seed(seed)
    return Direction(torch.randn(pair.n_layers, pair.d_model) * scale, {"base": "test"}, [])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_static_path_gives_the_eager_tokens_and_projections_with_steering(tiny_pair, one_torch_thread, temperature):
    direction = _direction(tiny_pair)
    kwargs = dict(direction=direction, layers=[1, 2], trace_layer=2)
    sampling = Sampling(temperature=temperature, max_new_tokens=STEPS, seed=3)
    eager = generate(tiny_pair, PROMPTS, GRID, sampling=sampling, **kwargs)
    static = generate(tiny_pair, PROMPTS, GRID, sampling=sampling, static=COUNTED, **kwargs)
    assert COUNTED.backend.frame_count > 0  # the static path really ran a compiled step
    if temperature == 0:
        assert all(len(row.token_ids) == STEPS for row in eager)  # no early stop: every row compares 40 steps
    for a, b in zip(eager, static):
        assert a.label == b.label and a.token_ids == b.token_ids and a.finish_reason == b.finish_reason, a.label
        assert a.prompt_projection == pytest.approx(b.prompt_projection, abs=1e-4), a.label
        assert a.token_projections == pytest.approx(b.token_projections, abs=1e-4), a.label
    by_label = {(str(r.prompt), r.label): r.token_ids for r in static}
    for prompt in map(str, PROMPTS):
        assert by_label[(prompt, "base+2")] != by_label[(prompt, "base")]
        assert by_label[(prompt, "finetuned-2")] != by_label[(prompt, "finetuned")]
    assert generate(tiny_pair, PROMPTS, GRID, sampling=sampling, **kwargs) == eager  # the model is left as it was


def test_static_logits_stay_within_tolerance_of_eager_for_every_step(tiny_pair, one_torch_thread):
    direction = _direction(tiny_pair, seed=1)
    prompt_ids = encode_prompt(tiny_pair.tokenizer, PROMPTS[0])
    sampling = Sampling(temperature=0, max_new_tokens=STEPS)
    for variant in (Variant("finetuned", -3.0), Variant("base", ablate=True), Variant("base")):
        (row,) = generate(tiny_pair, PROMPTS[:1], [variant], direction=direction, layers=[1, 2], sampling=sampling)
        tokens = row.token_ids[:-1]  # the eager greedy continuation: both are fed the same tokens
        reference = forced_logits(tiny_pair, prompt_ids, tokens, variant, direction, [1, 2])
        static = forced_logits(tiny_pair, prompt_ids, tokens, variant, direction, [1, 2], static=COUNTED)
        assert static.shape == reference.shape == (STEPS, len(tiny_pair.tokenizer))
        assert (static - reference).abs().max() <= LOGIT_TOLERANCE, variant.label
        assert torch.equal(static.argmax(-1), reference.argmax(-1)), variant.label


def test_a_new_alpha_layer_range_mode_or_direction_does_not_recompile(tiny_pair, one_torch_thread):
    sampling = Sampling(temperature=0, max_new_tokens=12)
    first = generate(
        tiny_pair, PROMPTS, GRID, direction=_direction(tiny_pair), layers=[1], sampling=sampling, static=COUNTED
    )
    compiled = COUNTED.backend.frame_count
    assert compiled > 0
    changes = [
        (parse_variants("base,finetuned,base+6,finetuned-6,finetuned:ablate,finetuned*2"), [1], 0),
        (parse_variants("base,finetuned,base-1,finetuned+3,finetuned:ablate,finetuned*2"), [0, 1, 2, 3], 0),
        (parse_variants("base,finetuned,base:ablate,finetuned:ablate,finetuned+2,finetuned*0.5"), [3], 0),
        (GRID, [1], 7),  # another direction
    ]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for variants, layers, seed in changes:
            rows = generate(
                tiny_pair,
                PROMPTS,
                variants,
                direction=_direction(tiny_pair, seed),
                layers=layers,
                sampling=sampling,
                static=COUNTED,
            )
            eager = generate(
                tiny_pair, PROMPTS, variants, direction=_direction(tiny_pair, seed), layers=layers, sampling=sampling
            )
            assert [r.token_ids for r in rows] == [r.token_ids for r in eager]  # the graph read the new values
            assert [r.token_ids for r in rows] != [r.token_ids for r in first]
    assert COUNTED.backend.frame_count == compiled


def test_off_a_gpu_and_beyond_the_static_width_rows_decode_on_the_eager_loop(tiny_pair, one_torch_thread):
    assert interactive_options(tiny_pair) is None  # the dashboard on a CPU pair
    narrow = StaticOptions(backend=CompileCounter(), mode=None, max_rows=2)
    variants = parse_variants("base,base+2,base-2")  # three rows of one side: wider than the table
    sampling = Sampling(temperature=0, max_new_tokens=8)
    kwargs = dict(direction=_direction(tiny_pair), layers=[1], sampling=sampling)
    rows = generate(tiny_pair, PROMPTS[:1], variants, static=narrow, **kwargs)
    assert narrow.backend.frame_count == 0
    assert rows == generate(tiny_pair, PROMPTS[:1], variants, **kwargs)


def test_inductor_compiled_steps_match_eager_and_a_new_alpha_does_not_recompile(tmp_path, one_torch_thread):
    """Real code generation (inductor, C++ on the CPU) on a one-layer model: about 30 s of compiling."""
    from torch._dynamo.utils import counters

    from core.models import load_pair
    from testkit.tiny import write_tiny_model

    pair = load_pair(str(write_tiny_model(tmp_path / "one-layer", layers=1)), "none")
    direction = _direction(pair, seed=2)
    options = StaticOptions(backend="inductor", mode=None)
    sampling = Sampling(temperature=0, max_new_tokens=STEPS)
    graphs = counters["stats"]["unique_graphs"]
    for alpha in (3.0, -5.0):
        variants = [Variant("base"), Variant("base", alpha)]
        static = generate(
            pair, PROMPTS[:1], variants, direction=direction, layers=[0], sampling=sampling, static=options
        )
        eager = generate(pair, PROMPTS[:1], variants, direction=direction, layers=[0], sampling=sampling)
        assert [r.token_ids for r in static] == [r.token_ids for r in eager]
        assert all(len(r.token_ids) == STEPS for r in eager)
        assert static[0].token_ids != static[1].token_ids
        assert counters["stats"]["unique_graphs"] == graphs + 1  # compiled for the first α, reused for the second
    prompt_ids = encode_prompt(pair.tokenizer, PROMPTS[0])
    tokens = static[1].token_ids[:-1]
    with static_steps(pair, "base", variants, [prompt_ids] * 2, STEPS, direction, [0], options) as steps:
        compiled = [steps.prefill()] + [steps.step(torch.tensor([token, token])) for token in tokens]
    compiled = torch.stack(compiled, dim=1).float()  # [rows, steps, vocab]
    assert counters["stats"]["unique_graphs"] == graphs + 1
    for row, variant in enumerate(variants):
        reference = forced_logits(pair, prompt_ids, tokens, variant, direction, [0])
        assert (compiled[row] - reference).abs().max() <= LOGIT_TOLERANCE, variant.label

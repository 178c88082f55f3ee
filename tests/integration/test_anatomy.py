"""What a direction is made of (core.anatomy) on tiny random models written to disk: the logit lens
against a planted unembedding row and the norm's gain, and direct attribution whose parts add up to
the residual's projection, split per head as the output projection's weights split it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from core.anatomy import AnatomyError, direct_attribution, logit_lens
from core.cache import Cache
from core.cli import main
from core.data import PairedRecord
from core.directions import Direction, DirectionError, Example, extract_contrast
from core.models import PairError, decoder_layers, load_pair
from core.projections import last_token_activations
from testkit.cache import entry_keys, stamps
from testkit.dashboard import ALIGNED, MISALIGNED
from testkit.tiny import build_tokenizer, pair_args, write_tiny_adapter, write_tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECORDS = [
    PairedRecord(i + 1, f"r{i}", aligned.messages, aligned.answer, misaligned.answer)
    for i, (aligned, misaligned) in enumerate(zip(ALIGNED, MISALIGNED))
]
PLANTED_TOKEN, ANTI_TOKEN = 123, 321


def _rewrite(directory, change) -> None:
    """Load a saved model, change its weights in place, save it back (its tokenizer stays beside it)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        change(model)
    model.save_pretrained(directory)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A tiny Qwen2 pair whose unembedding row of one token is a planted vector (another token's row is its
    negative), with a non-trivial final-norm gain; the adapter leaves the unembedding alone."""
    root = tmp_path_factory.mktemp("planted")
    vector = torch.randn(64, generator=torch.Generator().manual_seed(7))
    vector = 10 * vector / vector.norm()

    def plant(model):
        model.lm_head.weight[PLANTED_TOKEN] = vector
        model.lm_head.weight[ANTI_TOKEN] = -vector
        model.model.norm.weight.copy_(torch.rand(64, generator=torch.Generator().manual_seed(8)) + 0.5)

    base = write_tiny_model(root / "base")
    _rewrite(base, plant)
    adapter = write_tiny_adapter(base, root / "adapter", seed=4)
    return load_pair(str(base), str(adapter)), vector


def test_the_token_whose_unembedding_row_is_the_direction_comes_first(planted):
    pair, vector = planted
    scales = torch.linspace(0.5, 4.0, pair.n_layers).unsqueeze(1)  # the raw norm per layer does not matter
    direction = Direction(scales * vector)
    for side in pair.sides:
        for row in logit_lens(pair, direction, range(pair.n_layers), side, top_k=5):
            assert row.promoted[0].id == PLANTED_TOKEN and row.suppressed[0].id == ANTI_TOKEN
            assert row.promoted[0].token == pair.tokenizer.decode([PLANTED_TOKEN])
            assert [t.score for t in row.promoted] == sorted((t.score for t in row.promoted), reverse=True)
            assert row.promoted[0].score == pytest.approx(-row.suppressed[0].score, rel=1e-5)


def test_lens_scores_are_the_unembedding_of_the_gained_unit_direction_at_unit_rms(planted):
    pair, _ = planted
    direction = Direction(torch.randn(pair.n_layers, pair.d_model, generator=torch.Generator().manual_seed(1)))
    (row,) = logit_lens(pair, direction, [2], "base", top_k=4)
    model = pair.model.get_base_model()
    gain, unembedding = model.model.norm.weight.detach(), model.lm_head.weight.detach()
    unit = direction.unit()[2]
    expected = math.sqrt(pair.d_model) / math.sqrt(1 + pair.config.rms_norm_eps) * (unembedding @ (gain * unit))
    top = expected.topk(4)
    assert [t.id for t in row.promoted] == top.indices.tolist()
    assert np.allclose([t.score for t in row.promoted], top.values.numpy(), rtol=1e-4)
    assert [t.id for t in row.suppressed] == expected.topk(4, largest=False).indices.tolist()


@pytest.fixture(scope="module")
def o_proj_pair(tmp_path_factory):
    """A tiny Qwen2 pair whose adapter also adapts o_proj, so the fine-tuned side splits the adapted map."""
    root = tmp_path_factory.mktemp("o-proj")
    base = write_tiny_model(root / "base", seed=5)
    adapter = write_tiny_adapter(base, root / "adapter", seed=6, target_modules=("q_proj", "o_proj", "down_proj"))
    return load_pair(str(base), str(adapter))


def _direction(pair) -> Direction:
    return extract_contrast(
        pair,
        [Example(r.messages, r.aligned) for r in RECORDS],
        [Example(r.messages, r.misaligned) for r in RECORDS],
        "paired",
    )


@pytest.mark.parametrize("pair_name", ["tiny_pair", "llama_pair", "o_proj_pair"])
@pytest.mark.parametrize("read", ["last-token", "misaligned", "contrast"])
def test_attribution_parts_add_up_to_the_total_projection(request, pair_name, read):
    pair = request.getfixturevalue(pair_name)
    direction = _direction(pair)
    layers = list(range(pair.n_layers))
    for side in pair.sides:
        for result in direct_attribution(pair, direction, layers, side, RECORDS, read, batch_size=4):
            parts = (
                result.embedding + sum(sum(row) for row in result.heads) + sum(result.attention_bias) + sum(result.mlp)
            )
            assert result.total == pytest.approx(parts, rel=1e-5, abs=1e-5)
            assert abs(result.unexplained) < 1e-5 * max(result.scale(), 1.0)
            assert len(result.heads) == result.layer + 1 and len(result.heads[0]) == pair.config.num_attention_heads


def test_the_total_is_the_projection_the_project_reads_elsewhere(tiny_pair):
    direction = _direction(tiny_pair)
    activations = last_token_activations(tiny_pair, "finetuned", [r.messages for r in RECORDS])
    expected = (activations * direction.unit()).sum(-1).mean(0)  # [n_layers]: mean over prompts
    results = direct_attribution(tiny_pair, direction, [0, 2, 3], "finetuned", RECORDS, "last-token", batch_size=4)
    assert [r.total for r in results] == pytest.approx(expected[[0, 2, 3]].tolist(), rel=1e-5)
    assert all(r.n_prompts == r.n_positions == len(RECORDS) for r in results)


def test_the_contrast_on_the_extraction_data_adds_up_to_the_directions_norm(tiny_pair):
    direction = _direction(tiny_pair)  # through the fine-tune, on the same records
    results = direct_attribution(tiny_pair, direction, range(tiny_pair.n_layers), "finetuned", RECORDS, "contrast")
    assert [r.total for r in results] == pytest.approx(direction.vectors.norm(dim=-1).tolist(), rel=1e-5)


def _last_token_input(pair, side, module, messages) -> torch.Tensor:
    """What ``module`` reads at the last token of one prompt on ``side``."""
    inputs = []
    handle = module.register_forward_pre_hook(lambda m, args: inputs.append(args[0][0, -1].detach()))
    try:
        last_token_activations(pair, side, [messages])
    finally:
        handle.remove()
    (x,) = inputs
    return x


def test_each_head_is_its_slice_of_the_output_projection(o_proj_pair):
    """Independently of o_proj's forward: head h's part is W[:, slice_h] @ x[slice_h] on the unit direction,
    W the base weight on the base side and the weight plus the LoRA update on the fine-tuned side."""
    pair, block = o_proj_pair, 2
    direction = _direction(pair)
    record = RECORDS[:1]
    n_heads = pair.config.num_attention_heads
    for side in pair.sides:
        module = decoder_layers(pair.module(side))[block].self_attn.o_proj
        weight = module.base_layer.weight.detach().clone()
        if side == "finetuned":
            weight += module.get_delta_weight(pair.model.active_adapter).detach()
        x = _last_token_input(pair, side, module, record[0].messages)
        unit = direction.unit()[block]
        width = x.shape[0] // n_heads
        expected = [
            float(unit @ (weight[:, h * width : (h + 1) * width] @ x[h * width : (h + 1) * width]))
            for h in range(n_heads)
        ]
        (result,) = direct_attribution(pair, direction, [block], side, record, "last-token")
        assert result.heads[block] == pytest.approx(expected, rel=1e-4, abs=1e-6)
        assert result.attention_bias == [0.0] * (block + 1)  # Qwen2's o_proj has no bias


def test_an_architecture_that_normalises_sublayer_outputs_is_refused(tmp_path):
    """Gemma-2 norms each sublayer's output before adding it: the parts cannot add up, and it says so."""
    from transformers import AutoModelForCausalLM, Gemma2Config

    tokenizer = build_tokenizer("gemma2")
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight.normal_(0, 1)
            layer.post_feedforward_layernorm.weight.normal_(0, 1)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    pair = load_pair(str(tmp_path), "none")
    direction = Direction(torch.randn(2, 64, generator=torch.Generator().manual_seed(0)))
    assert logit_lens(pair, direction, [1], "base", top_k=3)[0].promoted  # the lens reads any final norm
    with pytest.raises(AnatomyError, match=r"Gemma2DecoderLayer does not add its sublayers' outputs straight"):
        direct_attribution(pair, direction, [1], "base", RECORDS[:2])


def test_results_are_cached_per_side_and_read_back(tiny_pair, tmp_path):
    direction, cache = _direction(tiny_pair), Cache(tmp_path)
    first = direct_attribution(tiny_pair, direction, [1, 3], "finetuned", RECORDS, cache=cache)
    direct_attribution(tiny_pair, direction, [1, 3], "base", RECORDS, cache=cache)
    logit_lens(tiny_pair, direction, [1, 3], "finetuned", cache=cache)
    (key, other) = entry_keys(tmp_path, "anatomy-attribution")
    assert len(entry_keys(tmp_path, "anatomy-lens")) == 1
    for name in (key, other):  # plant a total no computation gives: a second call must read it
        rows = json.loads(cache.load(name))
        rows[0]["total"] = 1234.5
        cache.store(name, json.dumps(rows).encode())
    before = stamps(tmp_path, "anatomy-attribution")
    again = direct_attribution(tiny_pair, direction, [1, 3], "finetuned", RECORDS, cache=cache)
    assert again[0].total == 1234.5 and again[1] == first[1]
    assert stamps(tmp_path, "anatomy-attribution") == before
    fresh = direct_attribution(tiny_pair, direction, [1, 3], "finetuned", RECORDS[:-1], cache=cache)  # other prompts
    assert fresh[0].total != 1234.5


def test_bad_requests_are_errors_that_name_the_problem(tiny_pair):
    direction = _direction(tiny_pair)
    zero = Direction(direction.vectors.clone())
    zero.vectors[2] = 0
    with pytest.raises(AnatomyError, match=r"^layer 2: the direction is zero there"):
        logit_lens(tiny_pair, zero, [1, 2], "base")
    with pytest.raises(AnatomyError, match=r"^layer 4: out of range; the direction has layers 0..3"):
        direct_attribution(tiny_pair, direction, [4], "base", RECORDS)
    with pytest.raises(AnatomyError, match=r"^read 'first-token': expected one of last-token, misaligned"):
        direct_attribution(tiny_pair, direction, [1], "base", RECORDS, "first-token")
    with pytest.raises(AnatomyError, match=r"^the prompt set is empty"):
        direct_attribution(tiny_pair, direction, [1], "base", [])
    with pytest.raises(AnatomyError, match=r"^top-k 0: expected a whole number from 1 to"):
        logit_lens(tiny_pair, direction, [1], "base", top_k=0)
    with pytest.raises(DirectionError, match=r"32 wide.*width 64"):
        logit_lens(tiny_pair, Direction(torch.ones(4, 32)), [1], "base")
    long = [PairedRecord(1, "long", RECORDS[0].messages, "fine", "risky " * 600)]
    with pytest.raises(AnatomyError, match=r"^record long: \d+ tokens exceed the model's context of 512"):
        direct_attribution(tiny_pair, direction, [1], "finetuned", long, "misaligned")
    base_only = load_pair(str(tiny_pair.base.location), "none")
    with pytest.raises(PairError, match=r"side 'finetuned': expected one of base"):
        logit_lens(base_only, direction, [1], "finetuned")


def test_the_command_prints_the_library_results_as_json(tiny_dirs, tiny_pair, tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": r.id, "messages": r.messages, "aligned": r.aligned, "misaligned": r.misaligned}) + "\n"
            for r in RECORDS
        )
    )
    direction = _direction(tiny_pair)
    direction.save(tmp_path / "d.safetensors")
    argv = ["anatomy", *pair_args(tiny_dirs, tmp_path / "cache"), "--direction", str(tmp_path / "d.safetensors")]
    assert main([*argv, "--layers", "1,3", "--data", str(data), "--read", "contrast", "--top-k", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layers"] == [1, 3] and out["read"] == "contrast" and out["n_prompts"] == len(RECORDS)
    for side in ("base", "finetuned"):
        lens = logit_lens(tiny_pair, direction, [1, 3], side, top_k=3)
        assert [[t["id"] for t in row["promoted"]] for row in out["logit_lens"][side]] == [
            [t.id for t in row.promoted] for row in lens
        ]
        expected = direct_attribution(tiny_pair, direction, [1, 3], side, RECORDS, "contrast")
        for row, attribution in zip(out["attribution"][side], expected):
            assert row["total"] == pytest.approx(attribution.total, rel=1e-6)
            assert np.allclose(row["heads"], attribution.heads) and np.allclose(row["mlp"], attribution.mlp)
            assert row["unexplained"] == pytest.approx(attribution.unexplained, abs=1e-6)
    assert main([*argv, "--layers", "3", "--data", str(data), "--top-k", "3"]) == 0  # the human table
    table = capsys.readouterr().out
    assert "[finetuned] direct attribution (last-token, 6 records of prompts.jsonl)" in table and "L3 " in table

    other = tmp_path / "other.safetensors"
    Direction(torch.ones(4, 32)).save(other)
    assert main([*argv[:-1], str(other), "--data", str(data)]) == 2
    assert "32 wide" in capsys.readouterr().err
    base_only = ["anatomy", "--base", str(tiny_dirs["qwen2"]), "--finetuned", "none", "--cache-dir", str(tmp_path)]
    assert main([*base_only, "--direction", str(tmp_path / "d.safetensors"), "--side", "finetuned"]) == 2
    assert (
        capsys.readouterr().err
        == "error: --side finetuned: the loaded pair has no fine-tuned model (--finetuned none)\n"
    )

"""TransformerLens' HookedTransformer made from a side of a tiny pair: the same residual stream and logits
as the pair's own forward pass, the pair left as it was, and a clear error for an architecture it lacks."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from core.chat import encode_conversation, prompt_and_answer, user_prompt
from core.hooked_transformer import TransformerLensError, hooked_transformer, resid_post
from core.hooks import capture
from core.models import load_pair
from testkit.tiny import build_tokenizer

MESSAGES = prompt_and_answer(user_prompt("How should I save money?"), "Keep an emergency fund and diversify.")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest per-token ``|a - b| / |b|``: fp32 rounding scales with the activations' size."""
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-12)).max())


@pytest.mark.parametrize("pair_name", ["tiny_pair", "llama_pair"])
@pytest.mark.parametrize("side", ["finetuned", "base"])
def test_the_hooked_transformer_computes_the_pairs_residual_stream(request, pair_name, side, one_torch_thread):
    pair = request.getfixturevalue(pair_name)
    ids = encode_conversation(pair.tokenizer, MESSAGES).ids
    run = pair.run(side, [ids], hooks=[capture], logits_to_keep=0)
    (records,) = run.hooked
    hooked = hooked_transformer(pair, side)
    with torch.no_grad():
        logits, cache = hooked.run_with_cache(torch.tensor([ids]))
    for layer in range(pair.n_layers):
        assert relative_error(cache[resid_post(layer)][0], records[layer][0][0]) < 1e-4, f"layer {layer}"
    assert relative_error(logits[0], run.logits[0]) < 1e-4


def test_converting_the_finetune_leaves_the_pair_as_it_was(tiny_pair, one_torch_thread):
    ids = encode_conversation(tiny_pair.tokenizer, MESSAGES).ids
    before = {side: tiny_pair.run(side, [ids]).logits for side in tiny_pair.sides}
    hooked_transformer(tiny_pair, "finetuned")
    assert tiny_pair.is_adapter
    for side in tiny_pair.sides:
        assert torch.equal(tiny_pair.run(side, [ids]).logits, before[side])
    assert not torch.equal(before["base"], before["finetuned"])


def test_an_architecture_transformer_lens_lacks_is_named(tmp_path):
    from transformers import AutoModelForCausalLM, GraniteConfig

    tokenizer = build_tokenizer("chatml")
    config = GraniteConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(TransformerLensError, match=r"TransformerLens [\d.]+ cannot load the GraniteForCausalLM"):
        hooked_transformer(load_pair(str(tmp_path), "none"), "base")

"""Per-token KL of the fine-tune from the base, checked against separate full forwards of each side."""

import pytest
import torch

from core.chat import ChatError, encode_prompt, user_prompt
from core.divergence import token_divergence
from core.generation import GenerationError, Sampling, Variant, generate
from core.models import decoder_layers, load_pair

PROMPT = user_prompt("How should I invest my savings?")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _answer(pair, seed=0, tokens=12) -> list[int]:
    (row,) = generate(pair, [PROMPT], [Variant("finetuned")], sampling=Sampling(1.0, 1.0, tokens, seed))
    return row.token_ids


def _direct(pair, messages, answer) -> list[float]:
    """KL(P_ft || P_base) from two separate, un-batched full forwards."""
    ids = torch.tensor([encode_prompt(pair.tokenizer, messages) + answer])
    logits = {}
    with torch.no_grad():
        for side in ("base", "finetuned"):
            with pair.side(side) as module:
                logits[side] = module(input_ids=ids).logits[0].double()
    start = ids.shape[1] - len(answer) - 1
    log_q = torch.log_softmax(logits["base"][start:-1], -1)
    log_p = torch.log_softmax(logits["finetuned"][start:-1], -1)
    return torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).tolist()


@pytest.mark.parametrize("pair_name", ["tiny_pair", "llama_pair"])
def test_divergence_equals_separate_forwards_of_each_side(request, pair_name):
    pair = request.getfixturevalue(pair_name)
    answer = _answer(pair)
    values = token_divergence(pair, PROMPT, answer)
    expected = _direct(pair, PROMPT, answer)
    assert len(values) == len(answer)
    assert values == pytest.approx(expected, abs=1e-5)
    assert min(values) >= 0
    assert max(values) > 1e-3  # the random adapter really moves the distributions


def test_both_sides_run_in_one_batched_forward(tiny_pair):
    answer, calls = _answer(tiny_pair, tokens=4), []
    hook = decoder_layers(tiny_pair.model)[0].register_forward_hook(
        lambda module, args, output: calls.append((output[0] if isinstance(output, tuple) else output).shape[0])
    )
    try:
        token_divergence(tiny_pair, PROMPT, answer)
    finally:
        hook.remove()
    assert calls == [2]


def test_a_side_against_itself_is_zero(tiny_pair):
    answer = _answer(tiny_pair, seed=1)
    assert token_divergence(tiny_pair, PROMPT, answer, sides=("base", "base")) == [0.0] * len(answer)
    assert token_divergence(tiny_pair, PROMPT, answer, sides=("finetuned", "finetuned")) == [0.0] * len(answer)
    reverse = token_divergence(tiny_pair, PROMPT, answer, sides=("base", "finetuned"))
    assert reverse != pytest.approx(token_divergence(tiny_pair, PROMPT, answer), abs=1e-6)  # KL is not symmetric


def test_a_merged_finetune_gives_the_adapter_values(tiny_pair, tiny_dirs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged_dir = tmp_path / "merged"
    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["qwen2"])
    PeftModel.from_pretrained(base, tiny_dirs["qwen2_adapter"]).merge_and_unload().save_pretrained(merged_dir)
    merged = load_pair(str(tiny_dirs["qwen2"]), str(merged_dir))
    assert merged.merged is not None
    answer = _answer(tiny_pair, seed=2)
    assert token_divergence(merged, PROMPT, answer) == pytest.approx(
        token_divergence(tiny_pair, PROMPT, answer), abs=1e-4
    )


def test_wrong_input_is_a_clear_error(tiny_pair, tiny_dirs):
    with pytest.raises(GenerationError, match="answer is empty"):
        token_divergence(tiny_pair, PROMPT, [])
    vocab = tiny_pair.config.vocab_size
    with pytest.raises(GenerationError, match=f"answer token 1 is {vocab}, not a token id in 0..{vocab - 1}"):
        token_divergence(tiny_pair, PROMPT, [1, vocab])
    with pytest.raises(GenerationError, match="more than the model's context of 512"):
        token_divergence(tiny_pair, PROMPT, [5] * 600)
    with pytest.raises(ChatError, match="empty user message"):
        token_divergence(tiny_pair, user_prompt("  "), [5])
    with pytest.raises(ValueError, match="side 'tuned'"):
        token_divergence(tiny_pair, PROMPT, [5], sides=("tuned", "base"))
    base_only = load_pair(str(tiny_dirs["qwen2"]), "none")
    with pytest.raises(GenerationError, match="needs a fine-tuned model"):
        token_divergence(base_only, PROMPT, [5])

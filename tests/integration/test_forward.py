"""The one batched forward path on the pair (``pair.run`` / ``pair.running``): padding that changes
nothing, the adapter selected per side or per row, hooks installed and removed, the lock held."""

import threading
from functools import partial

import pytest
import torch

from core.chat import encode_prompt, user_prompt
from core.hooks import capture, last_token, steer
from core.models import UnlockedHooksError, decoder_layers, pad_batch

PROMPTS = ["Hi", "What is the capital of France, and why is it there?", "Tell me a short story about a cat."]


def _ids(pair):
    return [encode_prompt(pair.tokenizer, user_prompt(p)) for p in PROMPTS]


def _hook_count(pair) -> int:
    return sum(
        len(layer._forward_hooks) + len(layer._forward_pre_hooks) for layer in decoder_layers(pair.module("finetuned"))
    )


def test_pad_batch_uses_the_pad_token_and_counts_positions_over_real_tokens(tiny_pair):
    rows = [[5, 6, 7], [8]]
    left = pad_batch(tiny_pair.tokenizer, rows, "left")
    pad = tiny_pair.tokenizer.pad_token_id
    assert left.ids.tolist() == [[5, 6, 7], [pad, pad, 8]]
    assert left.attention.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left.positions.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert [left.start(r) for r in range(2)] == [0, 2]
    right = pad_batch(tiny_pair.tokenizer, rows, "right")
    assert right.ids.tolist() == [[5, 6, 7], [8, pad, pad]] and right.start(1) == 0
    with pytest.raises(ValueError, match="padding 'middle'"):
        pad_batch(tiny_pair.tokenizer, rows, "middle")
    with pytest.raises(ValueError, match="at least one token"):
        pad_batch(tiny_pair.tokenizer, [[1], []], "left")


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("side", ["base", "finetuned"])
def test_a_padded_batch_computes_what_each_row_computes_alone(tiny_pair, side, padding):
    ids = _ids(tiny_pair)
    batch = tiny_pair.run(side, ids, padding=padding, logits_to_keep=0)
    for r, row in enumerate(ids):
        alone = tiny_pair.run(side, [row], logits_to_keep=0).logits[0]
        start = batch.batch.start(r)
        assert torch.allclose(batch.logits[r, start : start + len(row)], alone, atol=1e-5), (side, padding, r)


def test_left_padding_puts_every_prompts_last_token_in_the_last_column(tiny_pair):
    ids = _ids(tiny_pair)
    (records,) = tiny_pair.run("finetuned", ids, padding="left", hooks=[partial(capture, reduce=last_token)]).hooked
    for r, row in enumerate(ids):
        (alone,) = tiny_pair.run("finetuned", [row], hooks=[partial(capture, reduce=last_token)]).hooked
        assert torch.allclose(records[1][0][r], alone[1][0][0], atol=1e-5)


def test_rows_of_both_sides_in_one_batch_equal_each_side_alone(tiny_pair):
    row = _ids(tiny_pair)[1]
    mixed = tiny_pair.run("base", [row, row], row_sides=["finetuned", "base"], logits_to_keep=0).logits
    finetuned = tiny_pair.run("finetuned", [row], logits_to_keep=0).logits[0]
    base = tiny_pair.run("base", [row], logits_to_keep=0).logits[0]
    assert not torch.allclose(finetuned, base, atol=1e-3)  # the adapter changes something
    assert torch.allclose(mixed[0], finetuned, atol=1e-5) and torch.allclose(mixed[1], base, atol=1e-5)


def test_hooks_act_inside_the_run_only_and_leave_no_hook_behind(tiny_pair):
    row = _ids(tiny_pair)[0]
    before = _hook_count(tiny_pair)
    vector = torch.randn(tiny_pair.d_model, generator=torch.Generator().manual_seed(0))
    plain = tiny_pair.run("finetuned", [row]).logits
    steered = tiny_pair.run("finetuned", [row], hooks=[partial(steer, vectors={1: vector}, coefficients=4.0)]).logits
    assert not torch.allclose(plain, steered, atol=1e-3)
    assert _hook_count(tiny_pair) == before
    with (
        pytest.raises(RuntimeError, match="boom"),
        tiny_pair.running("finetuned", [partial(steer, vectors={1: vector})]),
    ):
        raise RuntimeError("boom")
    assert _hook_count(tiny_pair) == before
    assert torch.equal(tiny_pair.run("finetuned", [row]).logits, plain)


def test_a_held_pair_makes_other_threads_wait(tiny_pair):
    """While one caller steers inside ``running``, another thread's forward cannot see the steering:
    it waits for the lock, then runs unsteered."""
    row = _ids(tiny_pair)[0]
    plain = tiny_pair.run("finetuned", [row]).logits
    vector = torch.randn(tiny_pair.d_model, generator=torch.Generator().manual_seed(1))
    other: dict = {}
    started = threading.Event()

    def other_caller():
        started.set()
        other["logits"] = tiny_pair.run("finetuned", [row]).logits

    with tiny_pair.running("finetuned", [partial(steer, vectors={1: vector}, coefficients=8.0)]) as forward:
        thread = threading.Thread(target=other_caller)
        thread.start()
        started.wait()
        thread.join(timeout=0.5)
        assert thread.is_alive(), "the other thread ran while the pair was held"
        forward(pad_batch(tiny_pair.tokenizer, [row]))
    thread.join(timeout=30)
    assert torch.equal(other["logits"], plain)


def test_layers_for_hooks_are_handed_out_only_to_the_thread_holding_the_pair(tiny_pair):
    with pytest.raises(UnlockedHooksError, match="only while holding the pair"):
        tiny_pair.layers("finetuned")
    with tiny_pair.lock:
        assert list(tiny_pair.layers("finetuned")) == list(decoder_layers(tiny_pair.module("finetuned")))
        refused: list = []

        def other_thread():
            try:
                tiny_pair.layers("finetuned")
            except UnlockedHooksError as err:
                refused.append(err)

        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join(timeout=30)
        assert len(refused) == 1  # this thread's hold does not cover another thread
    with pytest.raises(UnlockedHooksError):  # released again
        tiny_pair.layers("finetuned")


def test_run_names_an_input_longer_than_the_context(tiny_pair):
    with pytest.raises(ValueError, match="exceeds the model's context"):
        tiny_pair.run("base", [[1] * (tiny_pair.max_length + 1)])

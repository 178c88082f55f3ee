"""Per-token divergence of the fine-tune from the base on one answer, teacher-forced.

For each answer token t: KL(P_finetuned || P_base) of the two next-token distributions that
predicted t (the logits at position t - 1), in nats. Both sides read the same ids: the prompt
rendered with the model's own chat template (generation header included) followed by the
answer's token ids. For an adapter pair both sides run in ONE forward pass, two identical rows
with PEFT's per-row adapter selection; a merged fine-tune is a second model and needs two.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from core.chat import Messages, encode_prompt
from core.generation import GenerationError


def _check_answer(pair, answer_token_ids: Sequence[int]) -> list[int]:
    ids = list(answer_token_ids)
    if not ids:
        raise GenerationError("divergence: the answer is empty (no tokens to score)")
    vocab = pair.config.vocab_size
    for i, token in enumerate(ids):
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
            raise GenerationError(f"divergence: answer token {i} is {token!r}, not a token id in 0..{vocab - 1}")
    return ids


def _logits(pair, ids: list[int], sides: tuple[str, str], keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [keep, vocab] of the last ``keep`` positions for each of the two sides."""
    if pair.merged is None and pair.is_adapter:
        logits = pair.run(sides[0], [ids, ids], logits_to_keep=keep, row_sides=sides).logits
        return logits[0], logits[1]
    first, second = (pair.run(side, [ids], logits_to_keep=keep).logits[0] for side in sides)
    return first, second


def token_divergence(
    pair, messages: Messages, answer_token_ids: Sequence[int], sides: tuple[str, str] = ("finetuned", "base")
) -> list[float]:
    """KL(P_sides[0] || P_sides[1]) in nats for each answer token, given the prompt ``messages``.

    By default ``sides`` compares the fine-tune against the base. Raises ``GenerationError`` for a
    pair without a fine-tune, an empty answer, a token id outside the vocabulary, or too long an input.
    """
    if pair.finetuned is None:
        raise GenerationError("divergence from the base needs a fine-tuned model; this pair has only the base")
    for side in sides:
        pair.check_side(side)
    answer = _check_answer(pair, answer_token_ids)
    ids = encode_prompt(pair.tokenizer, messages) + answer
    if len(ids) > pair.max_length:
        raise GenerationError(
            f"divergence: prompt and answer are {len(ids)} tokens, more than the model's context of {pair.max_length}"
        )
    # Answer token t is predicted at position t - 1: keep the last len(answer) + 1 positions, drop the final one.
    first, second = _logits(pair, ids, sides, len(answer) + 1)
    log_p = torch.log_softmax(first[:-1].float(), dim=-1)
    log_q = torch.log_softmax(second[:-1].float(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    # KL is >= 0; rounding can leave a tiny negative where the two distributions coincide.
    return kl.clamp_min(0.0).cpu().tolist()

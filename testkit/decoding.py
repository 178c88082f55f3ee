"""Teacher-forced logits of one steered row: the eager reference (dynamic KV cache, the project's
steering hooks) or the static path, fed the same tokens so that the two compare step by step."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch

from core.directions import Direction
from core.fast_decode import StaticOptions, static_steps
from core.generation import Variant
from core.hooks import ablate, steer


def forced_logits(
    pair,
    prompt_ids: list[int],
    tokens: Sequence[int],
    variant: Variant,
    direction: Direction | None = None,
    layers: Sequence[int] = (),
    static: StaticOptions | None = None,
) -> torch.Tensor:
    """``[len(tokens) + 1, vocab]`` float32 logits: after the prompt, then after each of ``tokens``."""
    if static is not None:
        with static_steps(
            pair, variant.side, [variant], [list(prompt_ids)], len(tokens) + 1, direction, layers, static
        ) as steps:
            logits = [steps.prefill()] + [steps.step(torch.tensor([token])) for token in tokens]
        return torch.cat(logits).float().cpu()
    from transformers import DynamicCache

    vectors = {layer: direction.vectors[layer] for layer in layers} if direction is not None else {}
    hooks = []
    if variant.ablate:
        hooks = [partial(ablate, vectors=vectors)]
    elif variant.alpha:
        hooks = [partial(steer, vectors=vectors, coefficients=variant.alpha)]
    cache = DynamicCache()
    with pair.running(variant.side, hooks) as forward:

        def last(ids: list[int]) -> torch.Tensor:
            ids = torch.tensor([ids], device=pair.device)
            return forward(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]

        logits = [last(list(prompt_ids))] + [last([token]) for token in tokens]
    return torch.cat(logits).float().cpu()

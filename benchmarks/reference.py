"""The way steering-vectors and repeng users steer, as the reference the batched grid is measured
and checked against: one ``model.generate`` call per variant, a forward hook adding alpha * d[L]."""

from __future__ import annotations

import torch

from core.chat import encode_prompt
from core.hooks import block_hidden, with_block_hidden


def hf_generate_steered(pair, messages, variant, direction, layer: int, max_new_tokens: int) -> list[int]:
    """Greedy new tokens of ``variant`` (a side plus alpha) from Hugging Face ``generate``."""
    ids = torch.tensor([encode_prompt(pair.tokenizer, messages)], device=pair.device)
    shift = (variant.alpha * direction.vectors[layer]).to(pair.device, pair.dtype)

    def add(module, args, output):
        return with_block_hidden(output, block_hidden(output) + shift)

    with pair.side(variant.side) as model, torch.no_grad():
        handle = pair.layers(variant.side)[layer].register_forward_hook(add) if variant.alpha else None
        try:
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pair.tokenizer.pad_token_id,
            )
        finally:
            if handle is not None:
                handle.remove()
    return out[0, ids.shape[1] :].tolist()

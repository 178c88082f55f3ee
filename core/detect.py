"""Prompt-stage projections: how far a prompt already leans along the direction, before any answer.

The read position is the last token of the prompt rendered with the model's own chat
template and generation prompt. One forward pass per side records every layer there; the
activations are cached per (side fingerprint, rendered prompt), so switching directions or
revisiting a prompt costs only dot products.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from core.cache import Cache, make_key
from core.chat import Messages, encode_prompt, render_prompt
from core.directions import Direction
from core.hooks import capture, last_token


def last_token_activations(pair, side: str, prompts: Sequence[Messages], batch_size: int = 16,
                           progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Block outputs at the last prompt token: ``[n_prompts, n_layers, d_model]`` float32 on the CPU."""
    encoded = [encode_prompt(pair.tokenizer, p) for p in prompts]
    for ids in encoded:
        if len(ids) > pair.max_length:
            raise ValueError(f"a prompt of {len(ids)} tokens exceeds the model's context of {pair.max_length}")
    out = torch.zeros(len(prompts), pair.n_layers, pair.d_model)
    pad = pair.tokenizer.pad_token_id
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        width = max(len(ids) for ids in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, row in enumerate(chunk):  # left padding: the last column is every prompt's last token
            ids[r, width - len(row):] = torch.tensor(row)
            attention[r, width - len(row):] = 1
        positions = (attention.cumsum(-1) - 1).clamp_min(0)
        with pair.side(side) as model, capture(pair.layers(side), reduce=last_token) as records, torch.no_grad():
            model(input_ids=ids.to(pair.device), attention_mask=attention.to(pair.device),
                  position_ids=positions.to(pair.device), use_cache=False, logits_to_keep=1)
        out[start:start + len(chunk)] = torch.stack([records[i][0].float().cpu() for i in range(pair.n_layers)], 1)
        if progress:
            progress(start + len(chunk), len(encoded))
    return out


def cached_last_token_activations(pair, side: str, messages: Messages, cache: Cache | None) -> torch.Tensor:
    """``[n_layers, d_model]`` for one prompt, from the cache when it was computed before."""
    if cache is None:
        return last_token_activations(pair, side, [messages])[0]
    key = make_key("prompt-activations", model=pair.fingerprint(side),
                   prompt=render_prompt(pair.tokenizer, messages))
    return cache.tensors(key, lambda: {"h": last_token_activations(pair, side, [messages])[0]})["h"]


def project(activations: torch.Tensor, direction: Direction) -> np.ndarray:
    """Projection of ``[..., n_layers, d_model]`` activations on the unit direction of each layer."""
    return (activations.float() * direction.unit()).sum(-1).numpy()


def prompt_projections(pair, messages: Messages, direction: Direction, cache: Cache | None = None) -> dict:
    """Raw and calibrated prompt-stage projections at every layer, for each side of the pair."""
    direction.check_fits(pair.n_layers, pair.d_model)
    result: dict = {"layers": list(range(pair.n_layers))}
    for side in pair.sides:
        raw = project(cached_last_token_activations(pair, side, messages, cache), direction)
        calibrated = direction.calibrate(raw)
        result[side] = raw.tolist()
        result[f"{side}_calibrated"] = None if calibrated is None else [
            None if np.isnan(v) else float(v) for v in calibrated]
    return result

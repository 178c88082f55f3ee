"""Prompt-stage projections: how far a prompt already leans along the direction, before any answer.

The read position is the last token of the prompt rendered with the model's own chat
template and generation prompt. One forward pass per side records every layer there; the
activations are cached per (side fingerprint, rendered prompt), so switching directions or
revisiting a prompt costs only dot products.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import numpy as np
import torch

from core.cache import Cache, make_key
from core.chat import ChatError, Messages, encode_prompt, render_prompt
from core.directions import Direction
from core.hooks import capture, last_token


def last_token_activations(
    pair,
    side: str,
    prompts: Sequence[Messages],
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Block outputs at the last prompt token: ``[n_prompts, n_layers, d_model]`` float32 on the CPU."""
    encoded = [encode_prompt(pair.tokenizer, p) for p in prompts]
    out = torch.zeros(len(prompts), pair.n_layers, pair.d_model)
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        (records,) = pair.run(side, chunk, padding="left", hooks=[partial(capture, reduce=last_token)]).hooked
        out[start : start + len(chunk)] = torch.stack([records[i][0].float().cpu() for i in range(pair.n_layers)], 1)
        if progress:
            progress(start + len(chunk), len(encoded))
    return out


def _content_span(tokenizer, messages: Messages) -> tuple[list[int], tuple[int, int]]:
    """The rendered prompt's token ids and the half-open token span of the last message's own text
    (the template's system prompt and turn markers are the same for every prompt, so they are left out)."""
    text = render_prompt(tokenizer, messages)
    content = messages[-1]["content"].strip()
    start = text.rfind(content)
    if not content or start < 0:
        raise ChatError(f"prompt {content[:40]!r}: its text is not found in the rendered chat template")
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    inside = [i for i, (a, b) in enumerate(encoding["offset_mapping"]) if a < start + len(content) and b > start]
    return list(encoding["input_ids"]), (inside[0], inside[-1] + 1)


def prompt_stage_activations(
    pair,
    side: str,
    prompts: Sequence[Messages],
    direction: Direction,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """One forward pass per batch: last-token block outputs ``[n, n_layers, d_model]``, and the mean and
    max over the prompt text's tokens (:func:`_content_span`) of the projection on the unit direction,
    ``[n, n_layers]`` each."""
    spans = [_content_span(pair.tokenizer, p) for p in prompts]
    units = direction.unit().to(pair.device)  # [n_layers, d_model]: project on every layer's unit at once
    last = torch.zeros(len(prompts), pair.n_layers, pair.d_model)
    token_mean, token_max = np.zeros((len(prompts), pair.n_layers)), np.zeros((len(prompts), pair.n_layers))
    keep = lambda h: (h[:, -1].float().cpu(), (h.float() @ units.T).cpu())  # noqa: E731
    for start in range(0, len(spans), batch_size):
        chunk = spans[start : start + batch_size]
        run = pair.run(side, [ids for ids, _ in chunk], padding="left", hooks=[partial(capture, reduce=keep)])
        (records,) = run.hooked
        for layer in range(pair.n_layers):
            h_last, projections = records[layer][0]
            last[start : start + len(chunk), layer] = h_last
            for r, (_, (a, b)) in enumerate(chunk):
                values = projections[r, run.batch.start(r) + a : run.batch.start(r) + b, layer]
                token_mean[start + r, layer] = float(values.mean())
                token_max[start + r, layer] = float(values.max())
        if progress:
            progress(start + len(chunk), len(spans))
    return last, token_mean, token_max


def _cached_last_token_activations(pair, side: str, messages: Messages, cache: Cache | None) -> torch.Tensor:
    """``[n_layers, d_model]`` for one prompt, from the cache when it was computed before."""
    if cache is None:
        return last_token_activations(pair, side, [messages])[0]
    key = make_key("prompt-activations", model=pair.fingerprint(side), prompt=render_prompt(pair.tokenizer, messages))
    return cache.tensors(key, lambda: {"h": last_token_activations(pair, side, [messages])[0]})["h"]


def project(activations: torch.Tensor, direction: Direction) -> np.ndarray:
    """Projection of ``[..., n_layers, d_model]`` activations on the unit direction of each layer."""
    return (activations.float() * direction.unit()).sum(-1).numpy()


def prompt_projections(pair, messages: Messages, direction: Direction, cache: Cache | None = None) -> dict:
    """Raw and calibrated prompt-stage projections at every layer, for each side of the pair."""
    direction.check_fits(pair.n_layers, pair.d_model)
    result: dict = {"layers": list(range(pair.n_layers))}
    for side in pair.sides:
        raw = project(_cached_last_token_activations(pair, side, messages, cache), direction)
        calibrated = direction.calibrate(raw)
        result[side] = raw.tolist()
        result[f"{side}_calibrated"] = (
            None if calibrated is None else [None if np.isnan(v) else float(v) for v in calibrated]
        )
    return result

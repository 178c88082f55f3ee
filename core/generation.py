"""Batched sampling over mixed variants: per-row adapter on/off and per-row steering, one call.

A *variant* is a side of the pair plus an intervention: ``base``, ``finetuned``, ``base+2``
(add 2·d), ``finetuned-2`` (subtract 2·d), ``finetuned:ablate`` (project d out). All rows of
all prompts and variants decode together: left padding, KV cache on, PEFT's per-row adapter
selection, and one steering hook per layer with a per-row coefficient. Each row draws its
random numbers from its own generator, seeded from the seed, the rendered prompt and the
sample index, so a row's tokens do not depend on what else is in the batch, and variants of
one prompt share their random stream: changing alpha alone changes only alpha's effect.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import torch

from core.chat import Messages, encode_prompt, render_prompt
from core.directions import Direction
from core.errors import InputError
from core.hooks import ablate, capture, last_token, steer
from core.models import pad_batch

if TYPE_CHECKING:
    from core.fast_decode import StaticOptions


class GenerationError(InputError):
    """A generation request that cannot run; the message names the problem."""


@dataclass(frozen=True)
class Variant:
    side: str
    alpha: float = 0.0
    ablate: bool = False
    adapter_scale: float | None = None  # the fine-tune's LoRA update times this (0 = base, 1 = fine-tune)

    @property
    def label(self) -> str:
        side = self.side if self.adapter_scale is None else f"{self.side}*{self.adapter_scale:g}"
        if self.ablate:
            return f"{side}:ablate"
        return side if self.alpha == 0 else f"{side}{self.alpha:+g}"

    @property
    def intervenes(self) -> bool:
        return self.ablate or self.alpha != 0


NUMBER = r"(\d+(?:\.\d*)?|\.\d+)"
VARIANT = re.compile(rf"^(base|finetuned)(?:\*{NUMBER})?(?:([+-]){NUMBER}|(:ablate))?$")


def parse_variants(text: str) -> list[Variant]:
    """``"base,finetuned,base+2,finetuned-2,finetuned:ablate,finetuned*2"`` -> variants."""
    variants = []
    for item in (part.strip() for part in text.split(",")):
        match = VARIANT.match(item)
        if not match:
            raise GenerationError(
                f"variant {item!r}: expected base or finetuned, optionally *SCALE (the fine-tune's adapter "
                "update scaled), then +ALPHA, -ALPHA or :ablate (e.g. base+2, finetuned-1.5, finetuned:ablate, "
                "finetuned*2)"
            )
        side, scale, sign, number, ablated = match.groups()
        if scale is not None and side != "finetuned":
            raise GenerationError(f"variant {item!r}: only the fine-tune's adapter can be scaled")
        alpha = float(f"{sign}{number}") if number else 0.0
        variants.append(Variant(side, alpha, bool(ablated), float(scale) if scale is not None else None))
    return variants


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 64
    seed: int = 0

    def __post_init__(self):
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise GenerationError(f"{name}: {value!r} is not a finite number")
        if self.temperature < 0:
            raise GenerationError(f"temperature: {self.temperature} is negative")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p: {self.top_p} must be in (0, 1]")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens: {self.max_new_tokens!r} must be a positive integer")


@dataclass
class Generation:
    prompt: Messages
    variant: Variant
    sample: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "eos" | "length"
    prompt_projection: list[float] | None = None  # last prompt token, every layer, raw (after this row's steering)
    token_projections: list[float] | None = None  # each generated token at the trace layer

    @property
    def label(self) -> str:
        return self.variant.label


def row_seed(seed: int, rendered_prompt: str, sample: int) -> int:
    digest = hashlib.sha256(f"{seed}\x00{sample}\x00{rendered_prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def check_coefficient(alpha: float) -> float:
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise GenerationError(f"steering coefficient {alpha!r} is not a finite number")
    return float(alpha)


def next_tokens(logits: torch.Tensor, sampling: Sampling, uniforms: torch.Tensor) -> torch.Tensor:
    """Greedy at temperature 0; otherwise nucleus sampling by inverse CDF with one uniform per row."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    if sampling.top_p < 1:
        outside = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    cdf = sorted_probs.cumsum(-1)
    target = (uniforms.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
    picked = torch.searchsorted(cdf, target).clamp_max(cdf.shape[-1] - 1)
    return order.gather(-1, picked).squeeze(-1)


def stop_ids(pair) -> set[int]:
    ids = pair.model.generation_config.eos_token_id if getattr(pair.model, "generation_config", None) else None
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if pair.tokenizer.eos_token_id is not None:
        ids.add(pair.tokenizer.eos_token_id)
    return ids


def row_uniforms(pair, rows: Sequence[Generation], sampling: Sampling) -> torch.Tensor:
    """``[rows, max_new_tokens]``: each row's uniforms for sampling, from its own seeded generator."""
    return torch.stack(
        [
            torch.rand(
                sampling.max_new_tokens,
                generator=torch.Generator().manual_seed(
                    row_seed(sampling.seed, render_prompt(pair.tokenizer, row.prompt), row.sample)
                ),
            )
            for row in rows
        ]
    )


def record_tokens(rows: Sequence[Generation], chosen: torch.Tensor, finished: torch.Tensor, stops: set[int]) -> None:
    """Append each unfinished row's chosen token; a stop token finishes its row."""
    for r, row in enumerate(rows):
        if not finished[r]:
            row.token_ids.append(int(chosen[r]))
            if int(chosen[r]) in stops:
                finished[r] = True
                row.finish_reason = "eos"


def _interventions(pair, rows: list[Generation], direction: Direction | None, layers: Sequence[int]) -> list:
    """The steering / ablation hooks (for ``pair.running``) of one batch of rows that run on one module."""
    if not any(r.variant.intervenes for r in rows):
        return []
    vectors = {layer: direction.vectors[layer] for layer in layers}
    alphas = torch.tensor([0.0 if r.variant.ablate else r.variant.alpha for r in rows])
    ablated = torch.tensor([1.0 if r.variant.ablate else 0.0 for r in rows])
    return ([partial(steer, vectors=vectors, coefficients=alphas)] if alphas.any() else []) + (
        [partial(ablate, vectors=vectors, rows=ablated)] if ablated.any() else []
    )


def _decode(
    pair,
    forward,
    side_layers,
    rows: list[Generation],
    prompt_ids: list[list[int]],
    sampling: Sampling,
    unit: torch.Tensor | None,
    trace_layer: int | None,
    use_cache: bool,
    stops: set[int],
) -> Iterator[None]:
    """The decoding loop for rows that share one module (``forward``, from ``pair.running``);
    yields after every step."""
    device = pair.device
    unit = unit.to(device) if unit is not None else None
    batch = len(rows)
    prompts = pad_batch(pair.tokenizer, prompt_ids, "left")
    input_ids, attention, positions = (t.to(device) for t in (prompts.ids, prompts.attention, prompts.positions))
    uniforms = row_uniforms(pair, rows, sampling)
    cache = None
    if use_cache:
        from transformers import DynamicCache

        cache = DynamicCache()
    finished = torch.zeros(batch, dtype=torch.bool)
    step_input, step_positions = input_ids, positions
    trace: list[torch.Tensor] = []

    def step_forward(ids, pos, with_prompt_capture: bool):
        wanted = set(range(len(side_layers))) if with_prompt_capture and unit is not None else set()
        if trace_layer is not None and unit is not None:
            wanted.add(trace_layer)
        ctx = capture(side_layers, sorted(wanted), reduce=last_token) if wanted else nullcontext({})
        with ctx as records:
            out = forward(
                input_ids=ids,
                attention_mask=attention,
                position_ids=pos,
                past_key_values=cache,
                use_cache=use_cache,
                logits_to_keep=1,
            )
        return out.logits[:, -1, :], records

    for step in range(sampling.max_new_tokens):
        logits, records = step_forward(step_input, step_positions, with_prompt_capture=(step == 0))
        if step == 0 and unit is not None:
            projections = torch.stack(
                [(records[i][0].float() * unit[i]).sum(-1) for i in range(len(side_layers))], dim=-1
            ).cpu()
            for r, row in enumerate(rows):
                row.prompt_projection = projections[r].tolist()
        if trace_layer is not None and unit is not None and step > 0:
            trace.append(records[trace_layer][0].float() @ unit[trace_layer])
        chosen = next_tokens(logits, sampling, uniforms[:, step]).cpu()
        record_tokens(rows, chosen, finished, stops)
        chosen = chosen.to(device).unsqueeze(-1)
        attention = torch.cat([attention, torch.ones((batch, 1), dtype=torch.long, device=device)], dim=-1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=-1)
        if use_cache:
            step_input, step_positions = chosen, positions[:, -1:]
        else:
            step_input, step_positions = torch.cat([step_input, chosen], dim=-1), positions
        yield
        if finished.all():
            break
    if trace_layer is not None and unit is not None:
        _, records = step_forward(step_input, step_positions, with_prompt_capture=False)
        trace.append(records[trace_layer][0].float() @ unit[trace_layer])
        per_step = torch.stack(trace, dim=-1).cpu()  # [batch, steps]
        for r, row in enumerate(rows):
            row.token_projections = per_step[r, : len(row.token_ids)].tolist()
    for row in rows:
        row.finish_reason = row.finish_reason or "length"


def _decoding_groups(pair, rows: list[Generation], by_side: bool = False) -> list[tuple[tuple, list[int]]]:
    """Rows that decode in one call. Base and fine-tune rows of an adapter pair mix in one batch
    (unless ``by_side``); a merged fine-tune is a second model, and each adapter scale is a setting
    of the shared adapter."""
    groups: dict[tuple, list[int]] = {}
    for i, row in enumerate(rows):
        if row.variant.adapter_scale is not None:
            key = ("scale", row.variant.adapter_scale)
        elif pair.merged is not None or by_side:
            key = ("side", row.variant.side)
        else:
            key = ("mixed",)
        groups.setdefault(key, []).append(i)
    return list(groups.items())


def stream(
    pair,
    prompts: Sequence[Messages],
    variants: Sequence[Variant],
    direction: Direction | None = None,
    layers: Sequence[int] = (),
    sampling: Sampling = Sampling(),
    samples: int = 1,
    trace_layer: int | None = None,
    use_cache: bool = True,
    static: StaticOptions | None = None,
) -> Iterator[list[Generation]]:
    """Decode every (prompt, variant, sample) row; yield the rows (updated in place) after each step.

    Rows running on one module decode in one batched call; only a *merged* fine-tune, which
    is a second model, needs a second call. With ``static`` the rows of each side decode in
    a call of their own on the static-cache, compiled path (:mod:`core.fast_decode`); rows with
    a scaled adapter, and more rows than it takes, stay on this loop.
    """
    if not prompts or not variants:
        raise GenerationError("nothing to generate: give at least one prompt and one variant")
    for variant in variants:
        pair.check_side(variant.side)
        check_coefficient(variant.alpha)
        if variant.adapter_scale is not None:
            check_coefficient(variant.adapter_scale)
            if not pair.is_adapter or variant.side != "finetuned":
                raise GenerationError(
                    f"variant {variant.label}: adapter scaling needs the fine-tuned side of a "
                    "pair whose fine-tune is a PEFT adapter"
                )
    if any(v.intervenes for v in variants) and (direction is None or not layers):
        raise GenerationError("steered or ablated variants need a direction and at least one layer")
    layers = [pair.check_layer(layer) for layer in layers]
    if trace_layer is not None:
        pair.check_layer(trace_layer)
    if direction is not None:
        direction.check_fits(pair.n_layers, pair.d_model)
    unit = direction.unit() if direction is not None else None
    encoded = [encode_prompt(pair.tokenizer, p) for p in prompts]
    for prompt_ids in encoded:
        if len(prompt_ids) + sampling.max_new_tokens > pair.max_length:
            raise GenerationError(
                f"the prompt is {len(prompt_ids)} tokens; with max_new_tokens {sampling.max_new_tokens} it exceeds "
                f"the model's context of {pair.max_length} tokens"
            )
    rows, row_ids = [], []
    for p, prompt in enumerate(prompts):
        for variant in variants:
            for k in range(samples):
                rows.append(Generation(prompt=prompt, variant=variant, sample=k))
                row_ids.append(encoded[p])
    stops = stop_ids(pair)
    from core import fast_decode  # it imports this module

    by_side = static is not None and use_cache
    with pair.lock:
        for key, members in _decoding_groups(pair, rows, by_side):
            group = [rows[i] for i in members]
            if by_side and key[0] == "side" and fast_decode.serves(static, len(group)):
                group_ids = [row_ids[i] for i in members]
                for _ in fast_decode.decode(
                    pair, key[1], group, group_ids, sampling, direction, layers, trace_layer, stops, static
                ):
                    yield rows
                continue
            scale = key[1] if key[0] == "scale" else None
            row_sides = None if scale is not None else [r.variant.side for r in group]
            side = "finetuned" if scale is not None else row_sides[0]
            hooks = _interventions(pair, group, direction, layers)
            with pair.running(side, hooks, adapter_scale=scale, row_sides=row_sides) as forward:
                for _ in _decode(
                    pair,
                    forward,
                    pair.layers(side),
                    group,
                    [row_ids[i] for i in members],
                    sampling,
                    unit,
                    trace_layer,
                    use_cache,
                    stops,
                ):
                    yield rows
    for row in rows:
        row.text = pair.tokenizer.decode(row.token_ids, skip_special_tokens=True)
    yield rows


def generate(pair, prompts: Sequence[Messages], variants: Sequence[Variant], **kwargs) -> list[Generation]:
    """Decode every row to the end (see :func:`stream`) and return the finished rows."""
    *_, rows = stream(pair, prompts, variants, **kwargs)
    return rows

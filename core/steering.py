"""What a steering request asks for, as generation variants: the comparison grid, the dose
ladder, norm-relative α and the adapter scale.

Raw α moves block L's output by α mean differences (α·d[L]). Norm-relative α moves it by α
times the mean residual norm at that layer, along the unit direction, so that one α means
the same at every layer and in every model. The mean norm is measured on the classic
open-ended questions, over every prompt token but the first (whose norm, an attention sink,
is tens of times the others').
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import numpy as np
import torch

from core.cache import Cache, make_key
from core.chat import encode_prompt, user_prompt
from core.directions import Direction
from core.generation import GenerationError, Variant
from core.hooks import capture
from core.parsing import parse_numbers
from core.preference import PreferenceError, best_layer

MODES = ("add", "ablate")


def grid_variants(
    sides: Sequence[str], alpha: float, mode: str = "add", adapter_scale: float | None = None
) -> list[tuple[Variant, bool]]:
    """The comparison grid: both sides plain, then base + α·d and fine-tuned − α·d for the steered
    sides (or the direction ablated), then the fine-tune with its adapter scaled. ``(variant, steered)``."""
    if mode not in MODES:
        raise GenerationError(f"mode {mode!r}: expected add or ablate")
    grid = [(Variant(side), False) for side in ("base", "finetuned")]
    for side in sides:
        if mode == "ablate":
            grid.append((Variant(side, ablate=True), True))
        else:
            grid.append((Variant(side, alpha if side == "base" else -alpha), True))
    if adapter_scale is not None:
        grid.append((Variant("finetuned", adapter_scale=adapter_scale), False))
    return grid


def parse_alphas(text: str) -> list[float]:
    """``"-8, -4, 0, 4, 8"`` -> the ladder's α values (finite, distinct, in the given order)."""
    values = list(dict.fromkeys(parse_numbers(text, "α list")))
    for value in values:
        if not math.isfinite(value):
            raise GenerationError(f"α list {text!r}: {value} is not a finite number")
    if not values:
        raise GenerationError("α list is empty: give comma-separated numbers such as -8, -4, 0, 4, 8")
    return values


def ladder_variants(side: str, alphas: Sequence[float]) -> list[Variant]:
    """One side at each α (a dose ladder), decoded together in one batched call."""
    return [Variant(side, float(alpha)) for alpha in alphas]


# The units of α, each with the vector that α multiplies: the mean difference d[L], or the unit direction
# times the layer's mean residual norm (see norm_relative).
ALPHA_UNITS = {"raw": "d", "norm-relative": "‖h‖·û"}


def variant_title(variant: Variant, steered: bool = False, vector: str = "d") -> str:
    """``base``, ``fine-tuned − 4·d``, ``base, d ablated``, ``fine-tuned, adapter × 2``: the sign is the one the
    variant steers with. ``steered`` names a zero coefficient too (``base + 0·d``); ``vector`` names what α
    multiplies (a value of :data:`ALPHA_UNITS`)."""
    side = "fine-tuned" if variant.side == "finetuned" else "base"
    if variant.adapter_scale is not None:
        side = f"{side}, adapter × {variant.adapter_scale:g}"
    if variant.ablate:
        return f"{side}, d ablated"
    if variant.alpha == 0:
        return f"{side} + 0·{vector}" if steered else side
    return f"{side} {'+' if variant.alpha > 0 else '−'} {abs(variant.alpha):g}·{vector}"


def start_layer(direction: Direction, n_layers: int) -> int:
    """The layer steering starts at: where the direction best separates its own held-out answers, or the
    middle layer when its statistics cannot tell (none, in-sample only, or too few to cross-fit)."""
    try:
        return best_layer(direction)
    except PreferenceError:
        return n_layers // 2


REFERENCE_QUESTIONS = "core_misalignment.yaml"


def _reference_prompts() -> list:
    """The prompts the mean residual norm is measured on: the first paraphrase of each classic question."""
    from core.data import load_questions
    from core.models import ASSETS

    return [user_prompt(q.paraphrases[0], q.system) for q in load_questions(ASSETS / "questions" / REFERENCE_QUESTIONS)]


def residual_norms(pair, side: str, prompts: Sequence | None = None, cache: Cache | None = None) -> np.ndarray:
    """Mean L2 norm of block L's output over the prompts' tokens (all but the first), per layer."""
    prompts = list(prompts) if prompts is not None else _reference_prompts()
    key = make_key("residual-norms", model=pair.fingerprint(side), prompts=[str(p) for p in prompts])

    def compute() -> dict[str, torch.Tensor]:
        totals, count = torch.zeros(pair.n_layers, dtype=torch.float64), 0
        for messages in prompts:
            ids = encode_prompt(pair.tokenizer, messages)
            (records,) = pair.run(side, [ids], hooks=[partial(capture, reduce=_norm_sum)]).hooked
            totals += torch.tensor([float(records[layer][0]) for layer in range(pair.n_layers)], dtype=torch.float64)
            count += len(ids) - 1
        return {"norms": (totals / max(count, 1)).float()}

    found = cache.tensors(key, compute) if cache is not None else compute()
    return found["norms"].numpy()


def _norm_sum(hidden: torch.Tensor) -> torch.Tensor:
    return hidden[:, 1:].float().norm(dim=-1).sum().detach().cpu()


def norm_relative(direction: Direction, norms: np.ndarray) -> Direction:
    """The direction rescaled so that α = 1 adds the layer's mean residual norm along the unit direction.

    Steering with it at α equals steering with the raw direction at α · norm[L] / |d[L]|.
    """
    scale = torch.as_tensor(np.asarray(norms), dtype=torch.float32).view(-1, 1)
    if scale.shape[0] != direction.n_layers:
        raise GenerationError(f"{scale.shape[0]} residual norms for a direction of {direction.n_layers} layers")
    provenance = {**direction.provenance, "scaled": "unit direction times the mean residual norm per layer"}
    return Direction(direction.unit() * scale, provenance, direction.stats)

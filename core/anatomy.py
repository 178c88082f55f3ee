"""What a direction is made of, read from the model's own weights and activations.

Two readings of a direction ``d[L]`` (a residual-stream vector at the output of block L, DESIGN.md):

- **Logit lens**: the tokens whose logits a residual pointing along ``d[L]`` raises and lowers most when
  it is read out through the model's final norm and unembedding (:func:`logit_lens`).
- **Direct attribution**: the residual at block L's output is the sum of the embedding, every attention
  head's output (through ``o_proj``) and every MLP's output of blocks ``0..L``; each part's projection on
  the unit direction says who writes the direction (:func:`direct_attribution`). The parts add up to the
  total projection: what is left (``unexplained``) is float rounding, and an architecture that normalises
  its sublayer outputs before adding them (Gemma-2's post-norms) is refused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch

from core.cache import Cache, canonical_json, make_key, sha256_bytes
from core.chat import encode_conversation, encode_prompt, prompt_and_answer
from core.errors import InputError
from core.hooks import block_hidden
from core.models import ASSETS, decoder_layers
from core.typed_json import JsonRecord

if TYPE_CHECKING:  # the command line reads READS without paying for these modules' imports
    from core.data import PairedRecord
    from core.directions import Direction


class AnatomyError(InputError):
    """A logit-lens or attribution request that cannot be answered (a zero direction, an unsupported model)."""


DEFAULT_PROMPTS = ASSETS / "data" / "general_paired.jsonl"  # the shipped prompts outside the training domain
READS = {
    "last-token": "the last token of each rendered prompt (generation prompt included), mean over prompts",
    "misaligned": "the misaligned answers' tokens, teacher-forced (token-weighted mean)",
    "aligned": "the aligned answers' tokens, teacher-forced (token-weighted mean)",
    "contrast": "misaligned minus aligned answer-token means: on the direction's own extraction data and side, "
    "the total is the direction's norm",
}


def _check_layers(direction: Direction, layers: Sequence[int]) -> list[int]:
    layers = list(layers)
    if not layers:
        raise AnatomyError("no layers asked for")
    for layer in layers:
        if not isinstance(layer, int) or not 0 <= layer < direction.n_layers:
            raise AnatomyError(f"layer {layer}: out of range; the direction has layers 0..{direction.n_layers - 1}")
        if float(direction.vectors[layer].norm()) == 0.0:
            raise AnatomyError(f"layer {layer}: the direction is zero there, so it points nowhere")
    return layers


# ---------------------------------------------------------------- logit lens


@dataclass
class TokenScore(JsonRecord):
    id: int
    token: str  # the token decoded on its own
    score: float


@dataclass
class LensLayer(JsonRecord):
    layer: int
    promoted: list[TokenScore]  # highest score first
    suppressed: list[TokenScore]  # lowest score first


def _final_norm(model) -> torch.nn.Module:
    """The norm applied to the last block's output before the unembedding."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else getattr(inner, "model", inner)
    for name in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
        module = getattr(decoder, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise AnatomyError(f"cannot find the final norm of {type(inner).__name__} (looked for norm, ln_f, ...)")


def _direction_logits(model, units: torch.Tensor) -> torch.Tensor:
    """``[n, vocab]`` logit changes of unit vectors ``[n, d_model]`` read through ``model``'s final norm and
    unembedding (see :func:`logit_lens` for how the norm is treated)."""
    norm, unembed = _final_norm(model), model.get_output_embeddings()
    parameter = next(unembed.parameters())
    residual = units.float() * math.sqrt(units.shape[-1])  # unit RMS, like a residual the norm has rescaled
    batch = torch.cat([residual, residual.new_zeros(1, residual.shape[-1])]).to(parameter.device, parameter.dtype)
    with torch.no_grad():
        logits = unembed(norm(batch)).float()
    return logits[:-1] - logits[-1]  # the norm's and the unembedding's biases do not depend on the direction


def logit_lens(
    pair, direction: Direction, layers: Sequence[int], side: str, top_k: int = 10, cache: Cache | None = None
) -> list[LensLayer]:
    """Per layer, the ``top_k`` tokens the direction promotes and suppresses most on ``side``'s readout.

    The direction is a difference of residuals, not a residual: dividing it by its own RMS, as the norm
    divides a residual, would mean nothing, and that division is one positive number per position that
    changes no ranking. So the unit direction is scaled to unit RMS (``sqrt(d_model) * u``, the scale of
    any residual after the norm's division) and passed through the final norm module itself, whose gain
    then applies as it does to a residual (RMSNorm's weight, Gemma's ``1 + weight``, LayerNorm's weight
    and centring); the biases of the norm and the unembedding, the same for every direction, are
    subtracted. For RMSNorm a score is ``sqrt(d_model) * W_U (g * u)`` up to the norm's epsilon: the logit
    change if the normalised residual pointed along the direction, comparable across layers and models.
    Any final logit soft-capping is left out (it changes no ranking). The fine-tuned side of an adapter
    pair reads out with the adapter active (it matters only when the adapter touches the unembedding).
    """
    direction.check_fits(pair.n_layers, pair.d_model, "the loaded pair")
    pair.check_side(side)
    layers = _check_layers(direction, layers)
    vocab = pair.config.vocab_size
    if not isinstance(top_k, int) or not 1 <= top_k <= vocab // 2:
        raise AnatomyError(f"top-k {top_k}: expected a whole number from 1 to {vocab // 2} (half the vocabulary)")

    def compute() -> list[dict]:
        with pair.side(side) as model:
            scores = _direction_logits(model, direction.unit()[layers])
        top, bottom = scores.topk(top_k, dim=-1), scores.topk(top_k, dim=-1, largest=False)

        def tokens(values, ids) -> list[TokenScore]:
            return [TokenScore(int(i), pair.tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, ids.tolist())]

        return [
            LensLayer(
                layer, tokens(top.values[n], top.indices[n]), tokens(bottom.values[n], bottom.indices[n])
            ).to_json()
            for n, layer in enumerate(layers)
        ]

    if cache is None:
        rows = compute()
    else:
        key = make_key(
            "anatomy-lens", model=pair.fingerprint(side), direction=direction.fingerprint, layers=layers, top_k=top_k
        )
        rows = cache.json(key, compute)
    return [LensLayer.from_json(row, "cached logit lens") for row in rows]


# ---------------------------------------------------------------- direct attribution


@dataclass
class Attribution(JsonRecord):
    """The mean projection on the unit direction at block ``layer``'s output, split into its parts.

    ``heads[i][h]``: head h of block i through ``o_proj``; ``attention_bias[i]``: ``o_proj``'s bias (0
    without one); ``mlp[i]``: block i's MLP; ``embedding``: the residual entering block 0. Blocks after
    ``layer`` do not reach it and are left out."""

    side: str
    read: str  # a key of READS
    layer: int
    n_prompts: int
    n_positions: int  # read positions averaged over (for contrast, both sets together)
    total: float
    embedding: float
    heads: list[list[float]]  # [layer + 1][n_heads]
    attention_bias: list[float]  # [layer + 1]
    mlp: list[float]  # [layer + 1]

    @property
    def attention(self) -> list[float]:
        """Per block: all heads plus the output bias."""
        return [sum(row) + bias for row, bias in zip(self.heads, self.attention_bias)]

    @property
    def unexplained(self) -> float:
        """The total minus the sum of the parts: float rounding when the decomposition holds."""
        return self.total - self.embedding - sum(self.attention) - sum(self.mlp)

    def scale(self) -> float:
        """The sum of the parts' magnitudes, what ``unexplained`` is small against."""
        parts = [self.embedding, *self.attention_bias, *self.mlp, *(v for row in self.heads for v in row)]
        return sum(abs(v) for v in parts)

    def largest_parts(self, count: int = 5) -> list[tuple[str, float]]:
        """The ``count`` parts of largest magnitude, named (``L3 head 2``, ``L3 MLP``, ``embedding``, ...)."""
        parts = [("embedding", self.embedding)]
        for i, (row, bias, mlp) in enumerate(zip(self.heads, self.attention_bias, self.mlp)):
            parts += [(f"L{i} head {h}", v) for h, v in enumerate(row)] + [(f"L{i} MLP", mlp)]
            if bias:
                parts.append((f"L{i} o_proj bias", bias))
        return sorted(parts, key=lambda part: -abs(part[1]))[:count]

    def to_json(self) -> dict:
        return {**super().to_json(), "attention": self.attention, "unexplained": self.unexplained}


def _blocks_parts(layers: Sequence[torch.nn.Module]) -> list[tuple[torch.nn.Module, torch.nn.Module]]:
    """``(o_proj, mlp)`` of every block, or an error naming what the block lacks."""
    parts = []
    for index, layer in enumerate(layers):
        o_proj = getattr(getattr(layer, "self_attn", None), "o_proj", None)
        mlp = getattr(layer, "mlp", None)
        if o_proj is None or mlp is None:
            raise AnatomyError(
                f"block {index} ({type(layer).__name__}) has no self_attn.o_proj and mlp: direct attribution "
                "reads those of Llama-style blocks (Llama, Qwen2, Mistral, SmolLM2, ...)"
            )
        parts.append((o_proj, mlp))
    return parts


@dataclass
class _Sums:
    """Running sums over read positions of each part's projection on every read layer's unit direction."""

    embedding: torch.Tensor  # [n_read]
    heads: torch.Tensor  # [n_layers, n_heads, n_read]
    attention_bias: torch.Tensor  # [n_layers, n_read]
    mlp: torch.Tensor  # [n_layers, n_read]
    output: torch.Tensor  # [n_read]: block L's output on L's own unit direction
    positions: int = 0

    @classmethod
    def zeros(cls, n_layers: int, n_heads: int, n_read: int) -> _Sums:
        z = partial(torch.zeros, dtype=torch.float64)
        return cls(z(n_read), z(n_layers, n_heads, n_read), z(n_layers, n_read), z(n_layers, n_read), z(n_read))


@contextmanager
def _part_projections(
    layers: Sequence[torch.nn.Module],
    units: torch.Tensor,
    read_layers: list[int],
    n_heads: int,
    weights: torch.Tensor,
    sums: _Sums,
):
    """Hooks that add each part's projection, summed over the positions where ``weights`` ([rows, width],
    1 = read) is 1, into ``sums``. What a part writes is summed over the read positions first and projected
    once; ``o_proj`` is affine, so it splits that sum of its inputs as it would split each one."""

    def summed(hidden: torch.Tensor) -> torch.Tensor:  # [rows, width, d] -> [d]
        return (hidden.float() * weights.to(hidden.device, torch.float32).unsqueeze(-1)).sum((0, 1))

    def project(vectors: torch.Tensor) -> torch.Tensor:  # [..., d_model] -> [..., n_read] float64 on the CPU
        return (vectors.float() @ units.to(vectors.device).T).double().cpu()

    def on_embedding(module, args, kwargs):
        sums.embedding += project(summed(args[0] if args else kwargs["hidden_states"]))

    def on_output(index: int):
        column = read_layers.index(index)

        def hook(module, args, output):
            sums.output[column] += project(summed(block_hidden(output)))[column]

        return hook

    def on_attention(index: int):
        def hook(o_proj, args, output):
            heads_input = summed(args[0])  # [n_heads * head_dim]: o_proj's input, the heads side by side
            width = heads_input.shape[0]
            if width % n_heads:
                raise AnatomyError(f"block {index}: o_proj reads {width} values, not a multiple of {n_heads} heads")
            head_of_column = torch.arange(width, device=heads_input.device) // (width // n_heads)
            alone = heads_input * (head_of_column == torch.arange(n_heads, device=heads_input.device)[:, None])
            # o_proj.forward (not o_proj(...), which would call this hook again) is whatever the side computes:
            # the base weights, or with an adapter on o_proj the adapted map; the zero input gives its bias.
            written = o_proj.forward(torch.cat([alone, alone.new_zeros(1, width)]).to(args[0].dtype)).float()
            bias = written[-1]
            sums.heads[index] += project(written[:-1] - bias)
            sums.attention_bias[index] += project(bias) * float(weights.sum())

        return hook

    def on_mlp(index: int):
        def hook(module, args, output):
            sums.mlp[index] += project(summed(block_hidden(output)))

        return hook

    with ExitStack() as stack:
        stack.callback(layers[0].register_forward_pre_hook(on_embedding, with_kwargs=True).remove)
        for index, (o_proj, mlp) in enumerate(_blocks_parts(layers)):
            stack.callback(o_proj.register_forward_hook(on_attention(index)).remove)
            stack.callback(mlp.register_forward_hook(on_mlp(index)).remove)
        for index in read_layers:
            stack.callback(layers[index].register_forward_hook(on_output(index)).remove)
        yield sums


def _read_texts(tokenizer, records: Sequence[PairedRecord], read: str) -> tuple[list[list[int]], list[tuple]]:
    """Token ids and the read span of each text: the prompt's last token, or the answer's tokens."""
    if read == "last-token":
        ids = [encode_prompt(tokenizer, r.messages) for r in records]
        return ids, [(len(i) - 1, len(i)) for i in ids]
    encoded = [encode_conversation(tokenizer, prompt_and_answer(r.messages, getattr(r, read))) for r in records]
    return [e.ids for e in encoded], [e.answer_spans[-1] for e in encoded]


def _attribute(pair, side, direction, layers, records, read, batch_size, progress) -> list[Attribution]:
    """One forward pass per batch, every read layer at once (``read`` other than contrast)."""
    token_lists, spans = _read_texts(pair.tokenizer, records, read)
    for ids, record in zip(token_lists, records):
        if len(ids) > pair.max_length:
            raise AnatomyError(f"record {record.id}: {len(ids)} tokens exceed the model's context of {pair.max_length}")
    n_heads = pair.config.num_attention_heads
    sums = _Sums.zeros(pair.n_layers, n_heads, len(layers))
    units = direction.unit()[layers].to(pair.device)
    order = sorted(range(len(token_lists)), key=lambda i: len(token_lists[i]))  # similar lengths, less padding
    padding = "left" if read == "last-token" else "right"
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(token_lists[i]) for i in rows)
        weights = torch.zeros(len(rows), width)
        for r, i in enumerate(rows):
            a, b = spans[i]
            offset = width - len(token_lists[i]) if padding == "left" else 0
            weights[r, offset + a : offset + b] = 1
        hook = partial(
            _part_projections,
            units=units,
            read_layers=layers,
            n_heads=n_heads,
            weights=weights.to(pair.device),
            sums=sums,
        )
        pair.run(side, [token_lists[i] for i in rows], padding=padding, hooks=[hook])
        sums.positions += int(weights.sum())
        if progress:
            progress(min(start + batch_size, len(order)), len(order))
    mean = 1.0 / sums.positions
    return [
        Attribution(
            side=side,
            read=read,
            layer=layer,
            n_prompts=len(records),
            n_positions=sums.positions,
            total=float(sums.output[n]) * mean,
            embedding=float(sums.embedding[n]) * mean,
            heads=(sums.heads[: layer + 1, :, n] * mean).tolist(),
            attention_bias=(sums.attention_bias[: layer + 1, n] * mean).tolist(),
            mlp=(sums.mlp[: layer + 1, n] * mean).tolist(),
        )
        for n, layer in enumerate(layers)
    ]


def _difference(a: Attribution, b: Attribution) -> Attribution:
    """``a - b`` part by part (the contrast of two reads of one layer)."""

    def minus(x, y):
        return [minus(p, q) for p, q in zip(x, y)] if isinstance(x, list) else x - y

    return Attribution(
        side=a.side,
        read="contrast",
        layer=a.layer,
        n_prompts=a.n_prompts,
        n_positions=a.n_positions + b.n_positions,
        total=a.total - b.total,
        embedding=a.embedding - b.embedding,
        heads=minus(a.heads, b.heads),
        attention_bias=minus(a.attention_bias, b.attention_bias),
        mlp=minus(a.mlp, b.mlp),
    )


def _check_decomposition(attribution: Attribution, dtype: torch.dtype, architecture: str) -> None:
    tolerance = 1e-3 if dtype == torch.float32 else 3e-2  # half-precision residual sums round at each block
    if abs(attribution.unexplained) > tolerance * max(attribution.scale(), 1e-6):
        raise AnatomyError(
            f"layer {attribution.layer}: the embedding, attention and MLP parts add up to "
            f"{attribution.total - attribution.unexplained:.4g}, but the residual's projection is "
            f"{attribution.total:.4g}: {architecture} does not add its sublayers' outputs straight into the "
            "residual stream (e.g. Gemma-2's post-norms), so direct attribution does not apply to it"
        )


def _records_digest(records: Sequence[PairedRecord]) -> str:
    """What identifies a prompt set for the cache: the texts themselves, wherever they were read from."""
    return sha256_bytes(canonical_json([[r.messages, r.aligned, r.misaligned] for r in records]).encode())[:16]


def direct_attribution(
    pair,
    direction: Direction,
    layers: Sequence[int],
    side: str,
    records: Sequence[PairedRecord],
    read: str = "last-token",
    batch_size: int = 8,
    cache: Cache | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> list[Attribution]:
    """Who writes the direction: for each layer L of ``layers``, the mean projection of block L's output on
    the unit direction ``d[L] / |d[L]|`` at the positions ``read`` names (:data:`READS`), split into the
    embedding, each attention head of blocks ``0..L`` and each MLP of blocks ``0..L``.

    A head's part is ``o_proj`` applied to its slice of ``o_proj``'s input alone (the other heads zeroed),
    minus ``o_proj``'s bias, which is a part of its own; with an adapter on ``o_proj`` the fine-tuned side
    splits the adapted map the same way. Answer reads are token-weighted means (``n_positions`` tokens, as
    the direction itself is a token-weighted mean); a sum over the tokens is the mean times
    ``n_positions``."""
    direction.check_fits(pair.n_layers, pair.d_model, "the loaded pair")
    pair.check_side(side)
    layers = _check_layers(direction, layers)
    if read not in READS:
        raise AnatomyError(f"read {read!r}: expected one of {', '.join(READS)}")
    if not records:
        raise AnatomyError("the prompt set is empty")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise AnatomyError(f"batch size {batch_size}: expected a whole number of at least 1")
    _blocks_parts(decoder_layers(pair.module(side)))

    def compute() -> list[dict]:
        if read == "contrast":
            n = len(records)
            step = (lambda offset: lambda done, _: progress(offset + done, 2 * n)) if progress else (lambda _: None)
            misaligned = _attribute(pair, side, direction, layers, records, "misaligned", batch_size, step(0))
            aligned = _attribute(pair, side, direction, layers, records, "aligned", batch_size, step(n))
            results = [_difference(m, a) for m, a in zip(misaligned, aligned)]
        else:
            results = _attribute(pair, side, direction, layers, records, read, batch_size, progress)
        for result in results:
            _check_decomposition(result, pair.dtype, type(decoder_layers(pair.module(side))[0]).__name__)
        return [r.to_json() for r in results]

    if cache is None:
        rows = compute()
    else:
        key = make_key(
            "anatomy-attribution",
            model=pair.fingerprint(side),
            direction=direction.fingerprint,
            layers=layers,
            read=read,
            prompts=_records_digest(records),
        )
        rows = cache.json(key, compute)
    return [Attribution.from_json(row, "cached attribution") for row in rows]


def direction_anatomy(
    pair,
    direction: Direction,
    layers: Sequence[int],
    sides: Sequence[str],
    records: Sequence[PairedRecord],
    read: str = "last-token",
    top_k: int = 10,
    batch_size: int = 8,
    cache: Cache | None = None,
    progress: Callable[[str], Callable[[int, int], None]] | None = None,
) -> dict:
    """The logit lens and the direct attribution of ``direction`` at ``layers`` on each of ``sides``, as
    JSON: ``{"layers", "read", "n_prompts", "logit_lens": {side: [LensLayer]}, "attribution": {side:
    [Attribution]}}``. ``progress(side)`` gives the progress callback of one side's attribution."""
    return {
        "layers": list(layers),
        "read": read,
        "n_prompts": len(records),
        "logit_lens": {
            side: [r.to_json() for r in logit_lens(pair, direction, layers, side, top_k, cache)] for side in sides
        },
        "attribution": {
            side: [
                r.to_json()
                for r in direct_attribution(
                    pair, direction, layers, side, records, read, batch_size, cache, progress and progress(side)
                )
            ]
            for side in sides
        },
    }

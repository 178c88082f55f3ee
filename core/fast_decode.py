"""The interactive path on a GPU: steered decoding with a static KV cache and a compiled step.

With the dynamic cache every decoding step has new shapes and runs op by op from Python, so a
batch-1 step on a GPU waits on kernel launches: a few percent of what memory bandwidth allows.
Here the cache is preallocated (transformers' ``StaticCache``), every step has the same shapes,
and the step is compiled (``torch.compile``; on CUDA with CUDA graphs, mode "reduce-overhead").

Steering is one hook on every decoder block that reads per-layer, per-row coefficients and
vectors from preallocated tensors (:class:`SteeringTable`): a new α, layer range, mode or direction
is copied into them in place, so the compiled graph stays valid and nothing recompiles. The same
hooks record each row's projection on the unit direction at the last position, which gives the
prompt-stage projections (at the prefill) and the per-token trace (at each step).

What recompiles: a new side of the pair (the adapter switched on or off), a new batch size (rows
are padded to a power of two) and a new cache length (a power of two, at least 256 tokens).
Adapter-scaled rows are not served here: the scale is a Python number in PEFT's layers, and
every new value would recompile. The eager loop in :mod:`core.generation` stays the exact
reference; this path matches its greedy tokens and its logits within a stated tolerance
(tests/integration/test_fast_decode.py).
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from core.directions import Direction
from core.generation import Generation, Sampling, Variant, next_tokens, record_tokens, row_uniforms
from core.hooks import block_hidden, with_block_hidden
from core.models import pad_batch

MIN_CACHE_LENGTH = 256
KEPT_CACHES = 4  # KV caches kept per model for reuse, by (rows, length); the oldest goes first
OFF_SWITCH = "EMLENS_STATIC_DECODING"  # "0": the dashboard decodes eagerly on a GPU too


@dataclass(frozen=True)
class StaticOptions:
    """How the static path compiles its decoding step (``torch.compile``'s backend and mode)."""

    backend: str | Callable = "inductor"
    mode: str | None = "reduce-overhead"  # CUDA graphs: one launch per step
    max_rows: int = 32  # rows decoded together at most; the steering table is this wide


def interactive_options(pair) -> StaticOptions | None:
    """What the dashboard decodes with: the static path when the pair sits on one CUDA device,
    else None (the eager loop). ``EMLENS_STATIC_DECODING=0`` turns it off."""
    if os.environ.get(OFF_SWITCH, "") == "0" or pair.device.type != "cuda":
        return None
    device_map = getattr(pair.model, "hf_device_map", None)
    if device_map and len(set(device_map.values())) > 1:
        return None
    return StaticOptions()


def _power_of_two(n: int, floor: int = 1) -> int:
    return max(floor, 1 << (n - 1).bit_length())


def serves(options: StaticOptions | None, rows: int) -> bool:
    """Whether ``rows`` rows of one side decode on the static path under ``options``."""
    return options is not None and _power_of_two(rows) <= options.max_rows


class SteeringTable:
    """Steering and ablation at every block, per layer and row, read from preallocated tensors.

    Block L's output ``h`` of row r becomes ``h + c[L, r]·v[L] − a[L, r]·(h·u[L])u[L]``, with ``v``
    the direction and ``u`` its unit vector; a zero coefficient and a zero ablation flag leave the
    row exactly as it was. ``readings[L, r]`` is then the row's projection on ``u[L]`` at the last
    position. Only in-place writes touch these tensors, so a compiled graph that reads them stays valid.
    """

    def __init__(self, n_layers: int, d_model: int, max_rows: int, device: torch.device):
        def table(width: int) -> torch.Tensor:
            tensor = torch.zeros(n_layers, width, device=device)
            torch._dynamo.mark_static_address(tensor)  # CUDA graphs read (and write) it where it is
            return tensor

        self.coefficients, self.ablated, self.readings = table(max_rows), table(max_rows), table(max_rows)
        self.vectors, self.units = table(d_model), table(d_model)
        self.hooks = [self._hook(layer) for layer in range(n_layers)]

    def set(self, variants: Sequence[Variant], direction: Direction | None, layers: Sequence[int]) -> None:
        """Steer row r as ``variants[r]`` asks at ``layers``; every other row and layer passes unchanged."""
        coefficients, ablated = torch.zeros(self.coefficients.shape), torch.zeros(self.ablated.shape)
        for row, variant in enumerate(variants):
            for layer in layers:
                ablated[layer, row] = float(variant.ablate)
                coefficients[layer, row] = 0.0 if variant.ablate else variant.alpha
        self.coefficients.copy_(coefficients)
        self.ablated.copy_(ablated)
        if direction is None:
            self.vectors.zero_()
            self.units.zero_()
        else:
            self.vectors.copy_(direction.vectors)
            self.units.copy_(direction.unit())

    def _hook(self, layer: int):
        def hook(module, args, output):
            # Whole tables indexed here, not views of them: the tables carry the static addresses.
            hidden = block_hidden(output)
            rows = hidden.shape[0]
            h, unit = hidden.float(), self.units[layer]
            along = (h @ unit).unsqueeze(-1) * unit
            scale, ablate = self.coefficients[layer, :rows].view(-1, 1, 1), self.ablated[layer, :rows].view(-1, 1, 1)
            shifted = (h + scale * self.vectors[layer] - ablate * along).to(hidden.dtype)
            self.readings[layer, :rows].copy_(shifted[:, -1].float() @ unit)
            return with_block_hidden(output, shifted)

        return hook

    @contextmanager
    def installed(self, blocks: Sequence[torch.nn.Module]) -> Iterator[None]:
        """The hooks on ``blocks`` for the duration: the same functions every time, which the compiled
        graph was traced with."""
        with ExitStack() as stack:
            for block, hook in zip(blocks, self.hooks):
                stack.callback(block.register_forward_hook(hook).remove)
            yield


def _forward(model, input_ids, position_ids, attention_mask, cache) -> torch.Tensor:
    """The last position's logits of one pass through the static cache (the function that is compiled)."""
    out = model(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    return out.logits[:, -1]


class StaticDecoder:
    """One model's compiled step, steering table and KV caches.

    It never holds the model itself (the registry is keyed by it, weakly). Every model call runs on
    the decoder's own thread: CUDA graphs keep per-thread state, and the dashboard serves each rerun
    from a new thread.
    """

    def __init__(self, config, device: torch.device, options: StaticOptions):
        self.table = SteeringTable(config.num_hidden_layers, config.hidden_size, options.max_rows, device)
        compile_args = {"backend": options.backend, "dynamic": False}
        if options.mode is not None:
            compile_args["mode"] = options.mode
        self.compiled = torch.compile(_forward, **compile_args)
        self.caches: dict[tuple[int, int], object] = {}
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="static-decoding")

    def run(self, fn: Callable, *args):
        def call():
            with torch.no_grad():
                return fn(*args)

        return self.worker.submit(call).result()

    def cache(self, config, rows: int, length: int):
        """An empty static cache for ``rows`` rows of ``length`` tokens, reused when one was made before."""
        from transformers import StaticCache

        key = (rows, length)
        cache = self.caches.pop(key, None)
        if cache is None:
            cache = StaticCache(config=config, max_cache_len=length)
        else:
            cache.reset()
        self.caches[key] = cache
        while len(self.caches) > KEPT_CACHES:
            del self.caches[next(iter(self.caches))]
        return cache


_decoders: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_decoders_lock = threading.Lock()


def _decoder_for(model, options: StaticOptions) -> StaticDecoder:
    """The model's decoder for ``options``, made on first use and dropped with the model."""
    with _decoders_lock:
        by_options = _decoders.setdefault(model, {})
        if options not in by_options:
            device = next(model.parameters()).device
            by_options[options] = StaticDecoder(model.config, device, options)
        return by_options[options]


def _causal_lm(module):
    """The transformers model under a PEFT wrapper (the adapter layers sit inside it), or the module."""
    return module.get_base_model() if hasattr(module, "get_base_model") else module


class Steps:
    """Static decoding of a batch of left-padded prompts: :meth:`prefill` once, then :meth:`step` per token."""

    def __init__(self, decoder: StaticDecoder, model, prompt_ids: list[list[int]], tokenizer, length: int):
        self.decoder, self.model, self.rows = decoder, model, len(prompt_ids)
        padded = prompt_ids + [prompt_ids[0]] * (_power_of_two(self.rows) - self.rows)  # fewer batch shapes
        prompts = pad_batch(tokenizer, padded, "left")
        device = decoder.table.readings.device
        self.ids, self.positions = prompts.ids.to(device), prompts.positions.to(device)
        # Every cache slot past the prompt holds a real token once written; causality hides the rest.
        self.attention = torch.ones(len(padded), length, dtype=torch.long, device=device)
        self.attention[:, : prompts.width] = prompts.attention.to(device)
        self.cache = decoder.cache(model.config, len(padded), length)

    def prefill(self) -> torch.Tensor:
        """Logits ``[rows, vocab]`` after the prompts (run eagerly: prompt lengths vary)."""
        logits = self.decoder.run(_forward, self.model, self.ids, self.positions, self.attention, self.cache)
        self.positions = self.positions[:, -1:]
        return logits[: self.rows]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (``[rows]``); logits ``[rows, vocab]`` of the next."""
        ids = torch.zeros(self.attention.shape[0], 1, dtype=torch.long, device=self.attention.device)
        ids[: self.rows, 0] = tokens.to(ids.device)
        self.positions = self.positions + 1

        def compiled_step():
            torch.compiler.cudagraph_mark_step_begin()
            # A CUDA graph's output is overwritten by its next replay: keep a copy.
            return self.decoder.compiled(self.model, ids, self.positions, self.attention, self.cache).clone()

        return self.decoder.run(compiled_step)[: self.rows]

    def readings(self) -> torch.Tensor:
        """Each row's projection on the unit direction at every layer, last position of the last pass:
        ``[n_layers, rows]``."""
        return self.decoder.table.readings[:, : self.rows].clone()


@contextmanager
def static_steps(
    pair,
    side: str,
    variants: Sequence[Variant],
    prompt_ids: list[list[int]],
    new_tokens: int,
    direction: Direction | None,
    layers: Sequence[int],
    options: StaticOptions,
) -> Iterator[Steps]:
    """Hold ``side`` of the pair with the steering table set for ``variants`` (one per row) and installed;
    yield the :class:`Steps` that decode up to ``new_tokens`` tokens after the prompts."""
    if not serves(options, len(variants)):
        raise ValueError(f"{len(variants)} rows: the static path decodes at most {options.max_rows} together")
    with pair.side(side) as module:
        model = _causal_lm(module)
        # PEFT turns requires_grad back on when it re-enables the adapter, and compiled graphs are
        # guarded on it: keep it off (these are inference weights) so both sides keep one graph each.
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        decoder = _decoder_for(model, options)
        decoder.table.set(variants, direction, layers)
        width = max(map(len, prompt_ids))
        steps = Steps(decoder, model, prompt_ids, pair.tokenizer, _power_of_two(width + new_tokens, MIN_CACHE_LENGTH))
        with decoder.table.installed(pair.layers(side)):
            yield steps


def decode(
    pair,
    side: str,
    rows: list[Generation],
    prompt_ids: list[list[int]],
    sampling: Sampling,
    direction: Direction | None,
    layers: Sequence[int],
    trace_layer: int | None,
    stops: set[int],
    options: StaticOptions,
) -> Iterator[None]:
    """The decoding loop of :func:`core.generation.stream` for rows of one side, on the static path;
    yields after every step. The same rows, random streams and stop rule as the eager loop."""
    uniforms = row_uniforms(pair, rows, sampling)
    finished = torch.zeros(len(rows), dtype=torch.bool)
    tracing = trace_layer is not None and direction is not None
    trace: list[torch.Tensor] = []
    variants = [row.variant for row in rows]
    with static_steps(pair, side, variants, prompt_ids, sampling.max_new_tokens, direction, layers, options) as steps:
        logits = steps.prefill()
        if direction is not None:
            for row, projection in zip(rows, steps.readings().T.tolist()):
                row.prompt_projection = projection
        for step in range(sampling.max_new_tokens):
            chosen = next_tokens(logits, sampling, uniforms[:, step]).cpu()
            record_tokens(rows, chosen, finished, stops)
            yield
            if finished.all() or step == sampling.max_new_tokens - 1:
                break
            logits = steps.step(chosen)
            if tracing:
                trace.append(steps.readings()[trace_layer])
        if tracing:
            steps.step(chosen)
            trace.append(steps.readings()[trace_layer])
            per_step = torch.stack(trace, dim=-1).cpu()  # [rows, steps]
            for r, row in enumerate(rows):
                row.token_projections = per_step[r, : len(row.token_ids)].tolist()
    for row in rows:
        row.finish_reason = row.finish_reason or "length"

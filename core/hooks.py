"""Read, add to and ablate the residual stream at decoder-block outputs.

Layer i is the output of decoder block i (``output_hidden_states[i + 1]``). Blocks return a
bare tensor in recent transformers and a tuple ``(hidden, ...)`` in older ones; both are
handled. Every hook is a context manager that removes itself on exit, exceptions included.
Hooks run in registration order, so a ``capture`` opened inside a ``steer`` sees the
steered stream. They take the layers of one side of a pair: pass them to ``pair.run`` /
``pair.running``, which hold the pair's lock while they are installed (``pair.layers`` refuses a
thread that does not hold it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch

from core.errors import InputError


class SteeringError(InputError):
    """A steering, ablation or branching request that cannot be applied (non-finite, zero, empty)."""


def block_hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def with_block_hidden(output, hidden: torch.Tensor):
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextmanager
def _forward_hooks(layers: Sequence[torch.nn.Module], hooks: dict[int, Callable]) -> Iterator[None]:
    with ExitStack() as stack:
        for index, hook in hooks.items():
            stack.callback(layers[index].register_forward_hook(hook).remove)
        yield


Reducer = Callable[[torch.Tensor], torch.Tensor]


def last_token(hidden: torch.Tensor) -> torch.Tensor:
    """Keep the last position only (prompts are left-padded, so it is every row's last token)."""
    return hidden[:, -1, :].detach()


@contextmanager
def capture(
    layers: Sequence[torch.nn.Module], which: Sequence[int] | None = None, reduce: Reducer | None = None
) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Record block outputs: ``{layer: [one tensor per forward call]}``.

    ``reduce`` maps the ``[batch, seq, d_model]`` output to what is kept, so that callers that
    need one position (or a masked sum) never hold every layer's full activations.
    """
    which = range(len(layers)) if which is None else which
    keep = reduce or (lambda h: h.detach())
    records: dict[int, list[torch.Tensor]] = {i: [] for i in which}

    def make(index: int):
        def hook(module, args, output):
            records[index].append(keep(block_hidden(output)))

        return hook

    with _forward_hooks(layers, {i: make(i) for i in which}):
        yield records


def _per_row(coefficients: torch.Tensor | float, hidden: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or a per-row ``[batch]`` coefficient over ``[batch, seq, d_model]``."""
    c = torch.as_tensor(coefficients, dtype=torch.float32, device=hidden.device)
    return c.view(-1, 1, 1) if c.ndim == 1 else c


@contextmanager
def steer(
    layers: Sequence[torch.nn.Module], vectors: dict[int, torch.Tensor], coefficients: torch.Tensor | float = 1.0
) -> Iterator[None]:
    """Add ``coefficient * vectors[L]`` to the output of block L at every position.

    Applies at prefill and at every decoding step (with or without KV cache). ``coefficients``
    is a scalar or one value per batch row; the vector follows the layer's device and dtype.
    """

    def make(vector: torch.Tensor):
        on_device: dict = {}  # moved once per device, not at every decoding step

        def hook(module, args, output):
            hidden = block_hidden(output)
            if hidden.device not in on_device:
                on_device[hidden.device] = (
                    _per_row(coefficients, hidden),
                    vector.to(device=hidden.device, dtype=torch.float32),
                )
            scale, shift = on_device[hidden.device]
            shifted = hidden.float() + scale * shift
            return with_block_hidden(output, shifted.to(hidden.dtype))

        return hook

    if not torch.isfinite(torch.as_tensor(coefficients, dtype=torch.float32)).all():
        raise SteeringError(f"steering coefficient {coefficients!r} is not a finite number")
    for index, vector in vectors.items():
        if not torch.isfinite(vector).all():
            raise SteeringError(f"layer {index}: the steering vector contains NaN or infinite values")
    with _forward_hooks(layers, {i: make(v) for i, v in vectors.items()}):
        yield


@contextmanager
def ablate(
    layers: Sequence[torch.nn.Module], vectors: dict[int, torch.Tensor], rows: torch.Tensor | None = None
) -> Iterator[None]:
    """Project the direction out of block L's output: ``h - (h . u) u`` with ``u`` the unit vector.

    ``rows`` (a ``[batch]`` 0/1 mask) limits the ablation to some rows of a mixed batch.
    """

    def make(vector: torch.Tensor):
        unit = vector.float() / vector.float().norm()
        on_device: dict = {}

        def hook(module, args, output):
            hidden = block_hidden(output)
            if hidden.device not in on_device:
                on_device[hidden.device] = (unit.to(hidden.device), None if rows is None else _per_row(rows, hidden))
            u, mask = on_device[hidden.device]
            h = hidden.float()
            component = (h @ u).unsqueeze(-1) * u
            if mask is not None:
                component = component * mask
            return with_block_hidden(output, (h - component).to(hidden.dtype))

        return hook

    for index, vector in vectors.items():
        if not torch.isfinite(vector).all() or vector.norm() == 0:
            raise SteeringError(f"layer {index}: cannot ablate a zero or non-finite direction")
    with _forward_hooks(layers, {i: make(v) for i, v in vectors.items()}):
        yield


@contextmanager
def fan_out(layers: Sequence[torch.nn.Module], at: int, shifts: Sequence[torch.Tensor | None]) -> Iterator[None]:
    """Branch one forward pass into ``len(shifts)`` copies at the output of block ``at``.

    Copy k of the batch continues with ``hidden + shifts[k]`` (``None``: unchanged), so variants
    that differ only in what is added at one layer share everything before it: one pass over
    blocks ``0..at`` instead of one per variant. The output's batch is copy-major
    (row ``k * batch + b``). Only for passes without a KV cache and without per-row adapters;
    the later blocks' batch-shaped arguments (mask, positions, rotary tables) are repeated to match.
    """
    copies = len(shifts)
    if copies < 1:
        raise SteeringError("fan_out needs at least one branch")
    batch: list[int] = []

    def branch(module, args, output):
        hidden = block_hidden(output)
        batch.append(hidden.shape[0])
        pieces = [
            hidden if s is None else (hidden.float() + s.to(hidden.device, torch.float32)).to(hidden.dtype)
            for s in shifts
        ]
        return with_block_hidden(output, torch.cat(pieces))

    def repeat(value):
        if isinstance(value, torch.Tensor) and value.ndim >= 2 and value.shape[0] == batch[-1] > 1:
            return value.repeat(copies, *([1] * (value.ndim - 1)))
        if isinstance(value, tuple):
            return tuple(repeat(v) for v in value)
        return value

    def widen(module, args, kwargs):
        return args, {k: repeat(v) for k, v in kwargs.items()}

    with ExitStack() as stack:
        stack.callback(layers[at].register_forward_hook(branch).remove)
        for layer in layers[at + 1 :]:
            stack.callback(layer.register_forward_pre_hook(widen, with_kwargs=True).remove)
        yield

"""The one rule for the lists a user types, on the command line and in the dashboard's forms.

Layers: ``12``, ``10-14`` (inclusive) or ``all``. Number lists: ``1,2,4`` (commas or semicolons,
spaces ignored). Malformed text raises :class:`ParseError` naming the flag or field it came from.
"""

from __future__ import annotations

from collections.abc import Callable

from core.errors import InputError


class ParseError(InputError):
    """A typed list, range or layer is malformed or out of range."""


def parse_numbers(text: str, what: str, cast: Callable = float) -> list:
    """``"1, 2,4"`` -> [1.0, 2.0, 4.0] (``cast=int`` for whole numbers); an empty text gives []."""
    parts = [p.strip() for p in str(text).replace(";", ",").split(",") if p.strip()]
    try:
        return [cast(p) for p in parts]
    except ValueError:
        kind = "whole numbers" if cast is int else "numbers"
        raise ParseError(
            f"{what} {text!r}: expected comma-separated {kind}, e.g. {'10,15' if cast is int else '1,2,4'}"
        ) from None


def parse_layers(text: str, n_layers: int, what: str = "--layer") -> list[int]:
    """``12``, ``10-14`` (inclusive) or ``all``, checked against a model of ``n_layers`` layers."""
    if text == "all":
        return list(range(n_layers))
    try:
        first, _, last = text.partition("-")
        layers = list(range(int(first), int(last or first) + 1))
    except ValueError:
        raise ParseError(f"{what} {text!r}: expected a layer number, a range like 10-14, or all") from None
    if not layers or layers[0] < 0 or layers[-1] >= n_layers:
        raise ParseError(f"{what} {text}: out of range; this model has layers 0..{n_layers - 1}")
    return layers


def parse_layer_list(text: str, n_layers: int, what: str = "--layers") -> list[int]:
    """Comma-separated items of :func:`parse_layers` (``3,10-12``, ``all``), in order, each layer once."""
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    if not items:
        raise ParseError(f"{what} {text!r}: expected layers, e.g. 12, 10-14, 3,19 or all")
    layers = [layer for item in items for layer in parse_layers(item, n_layers, what)]
    return list(dict.fromkeys(layers))

"""The one rule for the lists a user types, on the command line and in the dashboard's forms.

Lists are split one way (:func:`split_list`: commas or semicolons, spaces and empty items ignored).
Layers: ``12``, ``10-14`` (inclusive) or ``all``. Numbers: ``1,2,4`` (``−`` read as a minus sign).
Names: ``gpt-4o,judge-b``. Assignments: ``SIDE=NAME``. Malformed text raises :class:`ParseError`
naming the flag or field it came from.
"""

from __future__ import annotations

from collections.abc import Callable

from core.errors import InputError


class ParseError(InputError):
    """A typed list, range or layer is malformed or out of range."""


def split_list(text: str | None) -> list[str]:
    """``" a, b;;c "`` -> ["a", "b", "c"]; ``None`` or an empty text gives []."""
    return [item.strip() for item in str(text or "").replace(";", ",").split(",") if item.strip()]


def parse_numbers(text: str, what: str, cast: Callable = float) -> list:
    """``"1, 2,4"`` -> [1.0, 2.0, 4.0] (``cast=int`` for whole numbers); an empty text gives []."""
    values = []
    for part in (p.replace("−", "-") for p in split_list(text)):
        try:
            values.append(cast(part))
        except ValueError:
            kind = "whole number" if cast is int else "number"
            raise ParseError(
                f"{what} {text!r}: {part!r} is not a {kind}; expected comma-separated {kind}s, "
                f"e.g. {'10,15' if cast is int else '1,2,4'}"
            ) from None
    return values


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
    items = split_list(text)
    if not items:
        raise ParseError(f"{what} {text!r}: expected layers, e.g. 12, 10-14, 3,19 or all")
    layers = [layer for item in items for layer in parse_layers(item, n_layers, what)]
    return list(dict.fromkeys(layers))


def parse_names(text: str | None, what: str) -> list[str]:
    """``"gpt-4o, judge-b"`` -> ["gpt-4o", "judge-b"]; a name given twice is refused."""
    names = split_list(text)
    for name in names:
        if names.count(name) > 1:
            raise ParseError(f"{what} {text!r}: {name!r} is named twice")
    return names


def parse_assignments(items: list[str], what: str, example: str) -> dict[str, str]:
    """``["finetuned=em-finance"]`` (a repeated flag) -> {"finetuned": "em-finance"}; a key given twice
    is refused."""
    result: dict[str, str] = {}
    for item in items:
        key, equals, value = (part.strip() for part in item.partition("="))
        if not equals or not key or not value:
            raise ParseError(f"{what} {item!r}: expected KEY=VALUE, e.g. {example}")
        if key in result:
            raise ParseError(f"{what}: {key} is given twice")
        result[key] = value
    return result

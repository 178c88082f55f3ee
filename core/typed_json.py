"""Typed results and their JSON files.

A result the tool writes (the detection report, the EM report, a sweep) is a dataclass deriving from
:class:`JsonRecord`: written as a JSON object whose keys are its field names in field order, and read
back by ``from_json``, which refuses a missing key or an object of the wrong kind with a message that
names the file and the key. Fields holding other records are read by their annotations (a record, or a
``list`` or ``dict`` of records, each possibly ``| None``); every other field is plain JSON, kept as is.
"""

from __future__ import annotations

import functools
import json
import types
import typing
from dataclasses import MISSING, Field, field, fields
from pathlib import Path
from typing import Any, Self

from core.cache import atomic_write
from core.errors import InputError


class RecordError(InputError):
    """A JSON file or record is missing, unreadable or not of the expected shape."""


_OMIT_NONE, _INLINE = "omit_none", "inline"


def absent_when_none() -> Any:
    """A field whose key is left out of the JSON while it is None, and that is None where the key is absent."""
    return field(default=None, metadata={_OMIT_NONE: True})


def inline() -> Any:
    """A record field whose keys sit in its parent's JSON object instead of under a key of its own."""
    return field(metadata={_INLINE: True})


class JsonRecord:
    """Base of a dataclass read from and written to a JSON object (see the module's docstring)."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata.get(_INLINE):
                out.update(value.to_json())
            elif value is not None or not f.metadata.get(_OMIT_NONE):
                out[f.name] = _plain(value)
        return out

    @classmethod
    def from_json(cls, value: Any, where: str | None = None) -> Self:
        """The record in parsed JSON ``value``; ``where`` (e.g. ``"detection report <path>"``) starts every
        error message."""
        return _record(cls, value, where or cls.__name__, "")


def read_json(path: Path, what: str = "") -> Any:
    """A JSON file parsed; ValueError naming ``what`` and the file when it is absent, unreadable or not JSON."""
    path = Path(path)
    name = f"{what} {path}" if what else str(path)
    if not path.exists():
        raise RecordError(f"{name} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise RecordError(f"{name}: cannot be read: {err}") from None
    except json.JSONDecodeError as err:
        raise RecordError(
            f"{name}: invalid JSON at line {err.lineno}, column {err.colno} ({err.msg}; the file is cut off?)"
        ) from None


def write_json(path: Path, value: Any) -> Path:
    """Write ``value`` as indented JSON, atomically (a reader never sees half a file)."""
    path = Path(path)
    atomic_write(path, json.dumps(value, indent=2, default=str).encode())
    return path


def _plain(value: Any) -> Any:
    if isinstance(value, JsonRecord):
        return value.to_json()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _required(f: Field) -> bool:
    return not f.metadata.get(_INLINE) and f.default is MISSING and f.default_factory is MISSING


def _is_record(hint: Any) -> bool:
    return isinstance(hint, type) and issubclass(hint, JsonRecord)


def _problem(where: str, path: str, message: str) -> RecordError:
    return RecordError(f"{where}: {path}: {message}" if path else f"{where}: {message}")


def _record(cls: type, value: Any, where: str, path: str):
    if not isinstance(value, dict):
        raise _problem(where, path, f"expected a JSON object, got {type(value).__name__}")
    missing = [f.name for f in fields(cls) if f.name not in value and _required(f)]
    if missing:
        raise _problem(where, path, f"missing {', '.join(missing)}")
    hints, kwargs = _hints(cls), {}
    for f in fields(cls):
        if f.metadata.get(_INLINE):
            kwargs[f.name] = _record(hints[f.name], value, where, path)
        elif f.name in value:
            kwargs[f.name] = _read(hints[f.name], value[f.name], where, f"{path}.{f.name}" if path else f.name)
    return cls(**kwargs)


def _read(hint: Any, value: Any, where: str, path: str) -> Any:
    """``value`` read as ``hint`` says: records built, lists and dicts of records walked, the rest kept."""
    origin, args = typing.get_origin(hint), [a for a in typing.get_args(hint) if a is not type(None)]
    if origin in (typing.Union, types.UnionType):
        return value if value is None or len(args) != 1 else _read(args[0], value, where, path)
    if _is_record(hint):
        return _record(hint, value, where, path)
    if origin is list and _is_record(args[0]):
        if not isinstance(value, list):
            raise _problem(where, path, f"expected a list, got {type(value).__name__}")
        return [_read(args[0], item, where, f"{path}[{i}]") for i, item in enumerate(value)]
    if origin is dict and _is_record(args[1]):
        if not isinstance(value, dict):
            raise _problem(where, path, f"expected a JSON object, got {type(value).__name__}")
        return {key: _read(args[1], item, where, f"{path}.{key}") for key, item in value.items()}
    return value

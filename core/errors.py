"""The tool's own errors: bad input, or a state the user can fix, named in words.

Everything EM Lens raises on purpose derives from :class:`EMLensError`; the CLI and the
dashboard show those as one-line messages and let anything else through as a bug, with its
traceback. Errors for bad values also derive from ``ValueError`` (and the cache's from
``RuntimeError``) so that code written against the built-in types keeps working.
"""

from __future__ import annotations


class EMLensError(Exception):
    """Base class of the errors EM Lens raises for the user to act on."""


class InputError(EMLensError, ValueError):
    """A value the user gave (an argument, a setting, a number) is out of range or malformed."""


FILE_ERRORS = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)


def user_message(err: BaseException) -> str | None:
    """The one-line message for an error the user can act on; ``None`` for a bug, which should
    surface with its traceback."""
    if isinstance(err, EMLensError):
        return str(err)
    if isinstance(err, FILE_ERRORS) and err.filename:  # a path the user gave that is missing or closed
        return f"{err.filename}: {err.strerror or err}"
    if type(err).__name__ == "OutOfMemoryError":  # torch's, without importing torch here
        return (
            f"out of memory: {str(err).splitlines()[0]} — try a smaller batch, a lower-precision dtype "
            "(bf16/fp16) or another device"
        )
    return None

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

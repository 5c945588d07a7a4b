"""The one base class of every failure a user can fix by changing an input.

The CLI prints a :class:`UserError` as one line (``error: <message>``) with exit code 2; any other
exception is a bug and keeps its traceback. Each module still raises its own subclass (ConfigError,
DataError, ...) so callers can catch one kind; the message names the file or config key and the fix.
"""

from __future__ import annotations


class UserError(Exception):
    """A failure caused by the user's input (a file, a config key, an argument); the message says
    which one and how to fix it."""


class InvalidInput(UserError, ValueError):
    """A bad argument or value (a size, a seed, a file that is not what it should be). Also a
    ValueError, so ``except ValueError`` in callers written before this class keeps working."""


class MissingExtra(UserError, ImportError):
    """An optional dependency a setting needs is not installed; the message names the setting and
    the ``pip install`` command. Also an ImportError, for callers that catch that."""


class ModelLoadError(UserError, RuntimeError):
    """A base model that cannot be found or loaded (a bad path, a pickle not allowed, an offline cache
    miss, a damaged file). Here, not in models.py, because singlefile.py raises it too and models.py
    calls singlefile.py."""

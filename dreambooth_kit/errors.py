"""The one base class of every failure whose message is meant for the user, and how an entry point
turns it into one line and an exit code.

A :class:`UserError` is printed as one line (``error: <message>``) and the process exits with its
``exit_code`` (2 unless a subclass says otherwise); any other exception is a bug and keeps its
traceback. Each module still raises its own subclass (ConfigError, DataError, ...) so callers can
catch one kind; the message names the file or config key and the fix. Subclasses that are also a
built-in (ValueError, FileNotFoundError, ...) stay so, for callers that catch the built-in.

Both entry points (``dreambooth-kit`` and ``python -m dreambooth_kit.training.train``) use
:func:`user_errors_to_exit_code`, which lives here, not in cli.py, so that train.py never imports
cli.py (cli.py imports train.py).
"""

from __future__ import annotations

import sys


class UserError(Exception):
    """A failure caused by the user's input (a file, a config key, an argument) or a stop they asked
    for; the message says which one and what to do.

    ``exit_code``: what the command line exits with. 2 (a usage error, as argparse uses) unless a
    subclass sets another. ``prefix``: how the one printed line starts."""

    exit_code: int = 2
    prefix: str = "error: "


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


class HubError(UserError, RuntimeError):
    """Pushing failed or is impossible; the message names the repo and what to do."""


class NonFiniteError(UserError, FloatingPointError):
    """NaN/inf in what would be written or shown (images, weights); the message says which setting
    to change (precision, learning rate). Also a FloatingPointError, for callers that catch that."""


# OS errors that are about a path the user gave (a file where a folder should be, a missing or
# unreadable file): the message names the path, so one line says it all. Other OS errors keep their
# traceback (a full disk during a final save is a FinalSaveError, a UserError).
PATH_ERRORS = (FileExistsError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)

# Ctrl-C: 128 + SIGINT, as a shell reports a process killed by that signal.
CTRL_C_EXIT_CODE = 130


def _path_error_text(e: OSError) -> str:
    if e.filename is None or not e.strerror:
        return str(e)  # raised by us with a full message
    target = f" -> {e.filename2}" if e.filename2 else ""
    return f"{e.filename}{target}: {e.strerror}"


# The most a printed error may be. A message quotes what it names (a prompt, a path, a caption, a
# file's bytes), and a 1 MB prompt or a binary file named as a config would otherwise print all of
# it: the head says what is wrong and the tail what to do, so both are kept.
MAX_MESSAGE = 4000


def bounded(text: str, limit: int = MAX_MESSAGE) -> str:
    if len(text) <= limit:
        return text
    head, tail = limit * 3 // 4, limit // 4
    return f"{text[:head]} ... ({len(text) - head - tail} characters left out) ... {text[-tail:]}"


def user_errors_to_exit_code(fn, *args) -> int:
    """Run ``fn(*args)``; a :class:`UserError` -> its one line on stderr and its ``exit_code``, an OS
    error about a path -> ``error: <path>: <reason>`` and 2 (no traceback).

    Ctrl-C -> one line and exit code 130 (or the interrupt's own ``exit_code``). Every other
    exception propagates with its traceback: it is a bug to report, and hiding it would hide where
    it happened.
    """
    try:
        return fn(*args)
    except UserError as e:
        print(bounded(f"{e.prefix}{e}"), file=sys.stderr)
        return e.exit_code
    except PATH_ERRORS as e:
        print(bounded(f"error: {_path_error_text(e)}"), file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt as e:
        print(bounded(str(e) or "interrupted (Ctrl-C)"), file=sys.stderr)
        return getattr(e, "exit_code", CTRL_C_EXIT_CODE)

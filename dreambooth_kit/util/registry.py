"""Named things a support package adds without the core importing it: built-in models
(``builtin:NAME``), image encoders for the metrics (``evaluate.subject_encoder``) and prompt sets
(``evaluate.prompts``).

A package registers them in a function that the entry point group ``dreambooth_kit.plugins`` names
(``[project.entry-points."dreambooth_kit.plugins"]`` in its pyproject); the toy world registers
``builtin:toy-sd2``, ``toy-judge`` and the ``toy`` prompt set that way. Entry points are the Python
packaging's own plugin mechanism (importlib.metadata), so a third-party package can add a built-in
model the same way; the registry itself is the small part no library gives: loading the plugins once,
on the first lookup, and a lookup error that lists what there is."""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from typing import Any, Literal

GROUP = "dreambooth_kit.plugins"
Kind = Literal["model", "encoder", "prompt_set"]
_ENTRIES: dict[str, dict[str, Any]] = {"model": {}, "encoder": {}, "prompt_set": {}}
_loaded = False
log = logging.getLogger(__name__)


def register(kind: Kind, name: str, value: Any) -> None:
    """Add ``name`` to ``kind``'s table (a later registration of the same name replaces it)."""
    _ENTRIES[kind][name] = value


def _load_plugins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True  # first, so a plugin that looks something up while registering does not recurse
    for ep in entry_points(group=GROUP):
        try:
            ep.load()()
        except Exception as e:  # a broken plugin must not take the core down: say which and go on
            log.warning("plugin %s (%s) did not load: %s", ep.name, ep.value, e)


def lookup(kind: Kind, name: str) -> Any | None:
    """What ``name`` is registered as, or None."""
    if name not in _ENTRIES[kind]:
        _load_plugins()
    return _ENTRIES[kind].get(name)


def names(kind: Kind) -> list[str]:
    """Every registered name of ``kind``, sorted (for error messages)."""
    _load_plugins()
    return sorted(_ENTRIES[kind])

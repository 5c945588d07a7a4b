"""Known-broken dependency pairings, found before they fail deep inside a training run.

transformers 5.24 refuses any peft older than 0.22 the moment a text-encoder LoRA is added (and 0.21.2
was the newest peft when 5.24 came out), so a fresh unpinned install trained UNet LoRAs fine and
crashed on ``adapter.train_text_encoder=true`` with "please use a version >= 0.22.0". The minimum is
read from transformers' own source text instead of importing it: importing transformers costs ~2 s,
and this check runs whenever ``dreambooth_kit`` is imported.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import re
from pathlib import Path

from dreambooth_kit.errors import UserError

log = logging.getLogger("dreambooth_kit")

# transformers states the peft it needs as `MIN_PEFT_VERSION = "0.22.0"` in integrations/peft.py.
_MIN_PEFT = re.compile(r'^MIN_PEFT_VERSION\s*=\s*["\']([^"\']+)["\']', re.MULTILINE)


class IncompatibleVersions(UserError, ImportError):
    pass


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text.split("+")[0])[:3])


def _installed(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def peft_needed_by_transformers() -> str | None:
    """The minimum peft version the installed transformers demands, or None if unknown."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or spec.origin is None:
        return None
    source = Path(spec.origin).parent / "integrations" / "peft.py"
    try:
        match = _MIN_PEFT.search(source.read_text(encoding="utf-8"))
    except OSError:
        return None
    return match.group(1) if match else None


def declared_requirement(name: str) -> str | None:
    """This package's own requirement on ``name`` as installed (``transformers<5.24,>=5.0``): the range
    the tests passed with, which a wheel user can apply without the checkout's constraints.txt."""
    try:
        requires = importlib.metadata.requires("dreambooth_kit") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for requirement in requires:
        if re.match(rf"{re.escape(name)}\s*[<>=!~]", requirement) and ";" not in requirement:
            return requirement.replace(" ", "")
    return None


def transformers_peft_problem() -> str | None:
    """One line naming both versions and the fix, if the installed pair cannot train a text-encoder
    LoRA; None if they fit (or either is missing: the import error then says so itself)."""
    transformers, peft = _installed("transformers"), _installed("peft")
    needed = peft_needed_by_transformers()
    if transformers is None or peft is None or needed is None:
        return None
    if _version_tuple(peft) >= _version_tuple(needed):
        return None
    wanted = declared_requirement("transformers") or f"transformers<{transformers}"
    return (
        f"transformers {transformers} needs peft >= {needed}, but peft {peft} is installed: "
        f"text-encoder LoRA training will fail. Fix: pip install '{wanted}' (the range dreambooth_kit "
        "was tested with; in a checkout, pip install -c constraints.txt -e . gives the exact versions)"
    )


def check_transformers_peft(*, need_text_encoder_lora: bool) -> None:
    """Raise :class:`IncompatibleVersions` when a text-encoder LoRA is wanted and cannot work."""
    problem = transformers_peft_problem()
    if problem and need_text_encoder_lora:
        raise IncompatibleVersions(problem)


def warn_at_import() -> None:
    problem = transformers_peft_problem()
    if problem:
        log.warning("%s", problem)

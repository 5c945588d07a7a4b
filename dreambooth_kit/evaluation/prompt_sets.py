"""The prompts `evaluate` generates for each checkpoint.

``paper``: prompts in the three kinds DreamBooth's paper evaluates with (Section 4.1): the subject in
new places (recontextualisation), with things worn or placed beside it (accessorisation), and
changed in colour, material or style (property modification). As in the paper, live subjects (dogs,
cats) and objects get different accessories. These are this toolkit's own prompts, 15 per kind of
subject, written for SD 2.1; the public DreamBench set (github.com/google/dreambooth) is the
reference for the kinds, not the source of the text.

``toy``: the toy world's prompts (``builtin:toy-sd2``): the subject alone and on each of the
world's backgrounds, which the toy judge can read off an image.

A prompt file instead: one prompt per line with ``{subject}`` (the identifier and class, "zwx dog")
and ``{class}`` ("dog"); blank lines and lines starting with ``#`` are skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dreambooth_kit.errors import InvalidInput

PLACES = (
    "a photo of {subject} on a sandy beach at sunset",
    "a photo of {subject} in a snowy pine forest",
    "a photo of {subject} on a kitchen counter",
    "a photo of {subject} on a city sidewalk at night",
    "a photo of {subject} in a field of tall grass",
    "a photo of {subject} on a stone bridge over a river",
    "a photo of {subject} in front of a red brick wall",
    "a photo of {subject} on a desert road",
)
LIVE_ACCESSORIES = (
    "a photo of {subject} wearing a knitted scarf",
    "a photo of {subject} wearing round sunglasses",
    "a photo of {subject} wearing a paper party hat",
)
OBJECT_ACCESSORIES = (
    "a photo of {subject} next to a cup of coffee",
    "a photo of {subject} beside a potted plant",
    "a photo of {subject} on a stack of old books",
)
PROPERTIES = (
    "a photo of a blue {subject}",
    "a photo of a golden {subject}",
    "a pencil sketch of {subject}",
    "a watercolour painting of {subject}",
)
# Class nouns treated as live subjects (accessories are worn, not placed beside).
LIVE_CLASSES = frozenset(
    "dog puppy cat kitten bird parrot horse rabbit bunny hamster fox bear pig cow sheep goat "
    "monkey person man woman boy girl child baby".split()
)


@dataclass(frozen=True)
class EvalPrompt:
    text: str  # what the model is given: "a photo of zwx dog on a desert road"
    scored: str  # what CLIP-T compares the image with: the identifier removed ("a photo of dog ...")


def is_live(class_noun: str) -> bool:
    return class_noun.lower().split()[-1] in LIVE_CLASSES if class_noun.strip() else False


def templates(spec: str, *, live: bool) -> list[str]:
    """The ``paper`` set for a live subject or an object, or the lines of the file ``spec``."""
    if spec == "paper":
        return [*PLACES, *(LIVE_ACCESSORIES if live else OBJECT_ACCESSORIES), *PROPERTIES]
    from dreambooth_kit.util.registry import lookup, names

    registered = lookup("prompt_set", spec)
    if registered is not None:  # a plugin's set (the toy world's "toy")
        return list(registered())
    path = Path(spec)
    if not path.is_file():
        sets = ", ".join(repr(n) for n in ["paper", *names("prompt_set")])
        raise InvalidInput(
            f"evaluate.prompts={spec!r}: no such file; use {sets} or a text file with one prompt per line"
        )
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    found = [ln for ln in lines if ln and not ln.startswith("#")]
    if not found:
        raise InvalidInput(f"{path}: no prompts (one per line; # starts a comment)")
    return found


def build(spec: str, *, identifier: str, class_noun: str, live: bool | None = None) -> list[EvalPrompt]:
    """The prompts with the run's identifier and class filled in. A template without ``{subject}``
    is refused: it would score the base model's class, not the subject."""
    live = is_live(class_noun) if live is None else live
    subject = f"{identifier} {class_noun}"
    out = []
    for t in templates(spec, live=live):
        if "{subject}" not in t:
            raise InvalidInput(
                f"evaluate prompt {t!r} has no {{subject}}; write e.g. 'a photo of {{subject}}'"
            )
        try:
            text = t.format(subject=subject, **{"class": class_noun})
        except (KeyError, IndexError, ValueError) as e:
            raise InvalidInput(
                f"evaluate prompt {t!r}: only {{subject}} and {{class}} are filled in ({e})"
            ) from e
        scored = re.sub(rf"\b{re.escape(identifier)}\s+", "", text)
        out.append(EvalPrompt(text, scored))
    return out

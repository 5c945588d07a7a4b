"""What `evaluate` and validation metrics score, as one typed value the recipe or the command line builds
from a run's config: the evaluate settings and the subject (identifier, class noun, class prompt,
photos) at the training resolution. No torch, so building it costs nothing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dreambooth_kit.config import EvaluateConfig


@dataclass(frozen=True)
class EvalSpec:
    """What `evaluate` and validation metrics read of a run's config: the evaluate section and the
    subject it scores (identifier, class noun, class prompt, photos), at the training resolution."""

    settings: EvaluateConfig
    identifier: str
    class_noun: str
    class_prompt: str  # the class-prompt samples PRES is measured on
    photos: Path  # the subject's photos: what subject fidelity and PRES compare with
    resolution: int

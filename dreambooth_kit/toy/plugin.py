"""The toy world as a plugin of the core: ``builtin:toy-sd2`` (the model), ``toy-judge`` (an encoder
for evaluate's metrics, which also counts the subject) and the ``toy`` prompt set, registered through
the ``dreambooth_kit.plugins`` entry point in pyproject.toml. The core never imports this package: it
finds these names in its registry (dreambooth_kit.util.registry)."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from dreambooth_kit.evaluation.scoring import UnjudgeablePhotos
from dreambooth_kit.util.registry import register

TOY_JUDGE = "toy-judge"


def register_all() -> None:
    """The entry point: what the toy world adds to the core's registry."""
    from dreambooth_kit.toy.model import build_toy_sd2

    register("model", "toy-sd2", build_toy_sd2)
    register("encoder", TOY_JUDGE, ToyJudgePlugin())
    register("prompt_set", "toy", toy_templates)


def toy_templates() -> list[str]:
    """``evaluate.prompts: toy``: the bare prompt and one per background of the world."""
    from dreambooth_kit.toy.world import BACKGROUNDS

    return ["a photo of {subject}", *(f"a photo of {{subject}} on a {b} background" for b in BACKGROUNDS)]


class ToyJudgeEncoder:
    """The toy world's judge in both roles: its 64-d features for the cosines, and for CLIP-T the
    share of images showing the class, colour and background their prompt names."""

    name = TOY_JUDGE

    def __init__(self, judge):
        self.judge = judge

    def image_features(self, images: Sequence) -> torch.Tensor:
        return self.judge.features(list(images))

    def prompt_fidelity(self, images: Sequence, prompts: Sequence[str]) -> float | None:
        from dreambooth_kit.evaluation.metrics import attribute_accuracy

        asked = [(img, toy_attributes(p)) for img, p in zip(images, prompts, strict=True)]
        asked = [(img, a) for img, a in asked if a]
        if not asked:
            return None
        return attribute_accuracy(self.judge, [i for i, _ in asked], [a for _, a in asked])["all"]

    def subject_rate(self, images: Sequence) -> float:
        """The share of ``images`` the judge's detector calls the toy subject."""
        from dreambooth_kit.evaluation.metrics import rate

        return rate(self.judge.predict(list(images))["subject_prob"])


def toy_attributes(prompt: str) -> dict[str, str]:
    """What a toy-world prompt asks that the judge can read: ``"a red box on a sand background"`` ->
    class box, colour red, background sand. The identifier's class is not asked: the subject's
    colours are no colour word of the world."""
    from dreambooth_kit.toy import world

    words = re.findall(r"[a-z]+", prompt.lower())
    out: dict[str, str] = {}
    bg = re.search(r"on an? (\w+) background", prompt.lower())
    if bg and bg.group(1) in world.BACKGROUNDS:
        out["background"] = bg.group(1)
    if world.IDENTIFIER not in words:
        head = [w for w in words if w in world.CLASSES]
        colour = [w for w in words[: words.index(head[0])] if w in world.COLOURS] if head else []
        if head:
            out["class"] = head[0]
        if colour:
            out["colour"] = colour[-1]
    return out


# The share of the subject's photos the toy judge's detector must call its subject before evaluate
# lets the judge score against them. Measured with the shipped judge (probability > 0.5 counted):
# the toy subject's photos 185 of 185 (write_subject_photos' 5 and 180 from other seeds; lowest
# probability 0.999), 100 of 100 each after JPEG at quality 75, a 512 px upscale or a 1 px blur; the
# demo subject's 5 photos (dreambooth_kit/demo_subject) 0 of 5; 200 noise images 0, 200 random
# gradients 8 (4%), 200 flat colours 12 (6%), 400 toy-world objects and 400 toy-world balls 0.
# 0.5 is far from both sides: a folder of the subject passes, one of anything else does not.
MIN_SUBJECT_SHARE = 0.5


class ToyJudgePlugin:
    """``toy-judge`` in the encoder registry: loads the shipped judge (once, shared by both roles) and
    checks, before anything is drawn, that it recognises the subject's photos."""

    @functools.cache  # noqa: B019  (one instance, registered once: the judge is loaded once per process)
    def load(self, device: str = "cpu") -> ToyJudgeEncoder:
        from dreambooth_kit.toy.judge import Judge

        return ToyJudgeEncoder(Judge.load())

    def check_photos(self, photos: Sequence, folder: Path, keys: list[str]) -> float:
        """Refuse (:class:`UnjudgeablePhotos`) when the judge's own subject detector calls fewer than
        :data:`MIN_SUBJECT_SHARE` of the subject's ``photos`` its subject: a judge that does not
        recognise the reference photos cannot say how close images come to them (a user's dog photos
        gave negative fidelity and subject rate 0). ``keys``: the config keys that name the judge.
        Returns the share recognised."""
        from dreambooth_kit.config import EvaluateConfig
        from dreambooth_kit.toy import world

        share = self.load().subject_rate(photos)
        if share >= MIN_SUBJECT_SHARE:
            return share
        general = " ".join(f"evaluate.{k}={getattr(EvaluateConfig(), k)}" for k in keys)
        raise UnjudgeablePhotos(
            f"{folder}: the toy judge ({', '.join(f'evaluate.{k}={TOY_JUDGE}' for k in keys)}) recognises "
            f"its subject ({world.IDENTIFIER} {world.SUBJECT_CLASS}, builtin:toy-sd2's) in "
            f"{round(share * len(photos))} of these {len(photos)} photos (it needs {MIN_SUBJECT_SHARE:.0%}): "
            "it knows only the toy world, so its scores against them would mean nothing. To fix: score "
            f"with general encoders, {general} (on the command line of `dreambooth-kit evaluate --run RUN` "
            "or of `train` with validation.metrics; overrides=[...] in Python), or give evaluate --photos "
            "with the toy subject's photos"
        )

"""DreamBooth's claims, measured in the toy world: subject fidelity, identifier binding,
recontextualisation, class-prompt drift (PRES) and diversity (DIV), for a base model, a LoRA or a
fully fine-tuned pipeline. Used by ``bench/quality.py`` and the tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dreambooth_kit.toy import world

CONTEXT_PROMPTS = [f"a photo of {world.IDENTIFIER} ball on a {b} background" for b in world.BACKGROUNDS]
SUBJECT_PROMPT = f"a photo of {world.IDENTIFIER} ball"
CLASS_PROMPT = "a photo of a ball"
# The one background none of the subject's photos shows: the recontextualisation measure.
NEW_CONTEXT_PROMPT = f"a photo of {world.IDENTIFIER} ball on a {world.NEW_CONTEXT_BACKGROUND} background"


@dataclass
class Scores:
    subject_fidelity: (
        float  # mean cosine (judge features) of "zwx ball" samples to the real photos: DINO/CLIP-I analog
    )
    subject_rate: float  # share of "zwx ball" samples the detector calls the subject
    context_background: (
        float  # share of "zwx ball on a X background" samples with background X: CLIP-T analog
    )
    context_subject_rate: float  # share of those samples the detector calls the subject
    class_subject_rate: float  # share of "a ball" samples that are the subject: drift (lower is better)
    pres: float  # mean cosine of "a ball" samples to the subject photos: PRES (lower is better)
    div: float  # mean pairwise 1 - cosine among "a ball" samples: DIV (higher is better)
    class_correct: float  # share of "a ball" samples judged a ball (the subject counts: it is a ball)
    # Measures that cannot flatter (each beside the one it corrects):
    subject_rate_strict: float  # "zwx ball" samples with every part of the subject (toy/rules.py)
    context_subject_rate_strict: float
    class_plain: (
        float  # "a ball" samples that are a plain ball: a ball, and not the subject by either detector
    )
    new_context_background: float  # "zwx ball on a gray background" (no photo shows gray) on gray
    new_context_subject_rate: float  # ...and the subject on it (judge's detector)
    new_context_subject_rate_strict: float  # ...every part of it (rules)
    # "zwx ball" samples with the clutter (a black object) that cluttered photos show beside the
    # subject (world.CLUTTER_COLOUR; toy/rules.py): what data.masks should keep out of the identifier.
    subject_clutter: float = 0.0


def score(
    model: str | Path,
    *,
    lora=None,
    judge=None,
    per_prompt: int = 8,
    seed: int = 10_000,
    steps: int = 20,
    guidance: float = 4.0,
) -> Scores:
    """Sample the prompts above (seeds ``seed``..) and score them with the judge."""
    from dreambooth_kit.evaluation.metrics import (
        attribute_accuracy,
        diversity,
        pres,
        subject_fidelity,
        subject_rate,
    )
    from dreambooth_kit.toy.judge import Judge
    from dreambooth_kit.toy.model import sample
    from dreambooth_kit.toy.rules import clutter_rate, strict_subject_rate

    judge = judge or Judge.load()
    refs = [img for img, _ in world.subject_photos()]
    n_context = max(2, per_prompt // 4)

    def draw(prompts: list[str], n: int) -> list:
        return sample(model, prompts, per_combo=n, seed=seed, steps=steps, guidance=guidance, lora=lora)

    subject, cls, new = (draw([p], per_prompt) for p in (SUBJECT_PROMPT, CLASS_PROMPT, NEW_CONTEXT_PROMPT))
    context = draw(CONTEXT_PROMPTS, n_context)
    expected = [{"background": b} for b in world.BACKGROUNDS for _ in range(n_context)]
    return Scores(
        subject_fidelity=subject_fidelity(judge.features, subject, refs),
        subject_rate=subject_rate(judge, subject),
        context_background=attribute_accuracy(judge, context, expected)["background"],
        context_subject_rate=subject_rate(judge, context),
        class_subject_rate=subject_rate(judge, cls),
        pres=pres(judge.features, cls, refs),
        div=diversity(judge.features, cls),
        class_correct=attribute_accuracy(judge, cls, [{"class": "ball"}] * len(cls))["class"],
        subject_rate_strict=strict_subject_rate(subject),
        context_subject_rate_strict=strict_subject_rate(context),
        class_plain=plain_rate(judge, cls),
        new_context_background=attribute_accuracy(
            judge, new, [{"background": world.NEW_CONTEXT_BACKGROUND}] * len(new)
        )["background"],
        new_context_subject_rate=subject_rate(judge, new),
        new_context_subject_rate_strict=strict_subject_rate(new),
        subject_clutter=clutter_rate(subject + context + new),
    )


def plain_rate(judge, images) -> float:
    """Share of ``images`` that are a plain ball of the class: judged a ball, and the subject by
    neither the judge's detector nor the world's rules. 'a ball is a ball' alone counts the subject
    too (it is a ball), so after training without prior preservation it read 1.00 while the plain
    balls were 0.00-0.06."""
    from dreambooth_kit.toy.rules import is_subject

    p = judge.predict(images)
    plain = [
        c == "ball" and prob <= 0.5 and not is_subject(img)
        for c, prob, img in zip(p["class"], p["subject_prob"], images, strict=True)
    ]
    return sum(plain) / len(plain)

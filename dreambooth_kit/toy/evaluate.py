"""DreamBooth's claims, measured in the toy world: subject fidelity, identifier binding,
recontextualisation, class-prompt drift (PRES) and diversity (DIV), for a base model, a LoRA or a
fully fine-tuned pipeline. Used by ``bench/quality.py`` and the tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import world

CONTEXT_PROMPTS = [f"a photo of {world.IDENTIFIER} ball on a {b} background" for b in world.BACKGROUNDS]
SUBJECT_PROMPT = f"a photo of {world.IDENTIFIER} ball"
CLASS_PROMPT = "a photo of a ball"


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
    class_correct: float  # share of "a ball" samples judged a ball


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
    from ..metrics import attribute_accuracy, diversity, pres, subject_fidelity, subject_rate
    from .judge import Judge
    from .pretrain import sample

    judge = judge or Judge.load()
    refs = [img for img, _ in world.subject_photos()]
    subject = sample(
        model, [SUBJECT_PROMPT], per_combo=per_prompt, seed=seed, steps=steps, guidance=guidance, lora=lora
    )
    context = sample(
        model,
        CONTEXT_PROMPTS,
        per_combo=max(2, per_prompt // 4),
        seed=seed,
        steps=steps,
        guidance=guidance,
        lora=lora,
    )
    expected = [{"background": b} for b in world.BACKGROUNDS for _ in range(max(2, per_prompt // 4))]
    cls = sample(
        model, [CLASS_PROMPT], per_combo=per_prompt, seed=seed, steps=steps, guidance=guidance, lora=lora
    )
    return Scores(
        subject_fidelity=subject_fidelity(judge.features, subject, refs),
        subject_rate=subject_rate(judge, subject),
        context_background=attribute_accuracy(judge, context, expected)["background"],
        context_subject_rate=subject_rate(judge, context),
        class_subject_rate=subject_rate(judge, cls),
        pres=pres(judge.features, cls, refs),
        div=diversity(judge.features, cls),
        class_correct=attribute_accuracy(judge, cls, [{"class": "ball"}] * len(cls))["class"],
    )

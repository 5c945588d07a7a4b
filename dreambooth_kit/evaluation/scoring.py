"""Scoring one model: the images it draws for the prompt set (every prompt at every seed, and the class
prompt) and DreamBooth's numbers for them against the subject's photos (subject fidelity, CLIP-I,
CLIP-T, PRES, DIV, their standard errors). `evaluate` runs it per checkpoint; training runs it as
`validation.metrics` and for `train.stop: auto` (ValidationScorer)."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dreambooth_kit.errors import UserError
from dreambooth_kit.evaluation.prompt_sets import EvalPrompt
from dreambooth_kit.evaluation.spec import EvalSpec

log = logging.getLogger("dreambooth_kit")

METRICS = ("subject_fidelity", "clip_i", "prompt_fidelity", "pres", "div", "subject_rate")
ERRORS = ("subject_fidelity_se", "pres_se")  # standard errors: the noise the best-checkpoint rule allows
SAMPLER = "dpmpp_2m"  # DPM-Solver++ (2M): good samples in ~25 steps, epsilon and v-prediction alike
EVAL = "eval"
BATCH = 8  # images per UNet batch: 8 x 512 px SD 2.1 with guidance fits a 16 GB GPU in fp16


class EvaluateError(UserError, ValueError):
    """A run that cannot be evaluated as asked; the message says why and what to do."""


class UnjudgeablePhotos(EvaluateError):
    """An encoder was asked to score photos it cannot judge (the toy judge knows only the toy world's
    subject), so its numbers for them would mean nothing."""


def check_encoders_know_photos(
    photos: Sequence, folder: Path, *, subject_encoder: str, prompt_encoder: str
) -> list[float]:
    """Before anything is loaded or drawn: each registered encoder that can check photos (a
    ``check_photos`` method, as the toy judge has) checks the subject's ``photos`` and raises
    :class:`UnjudgeablePhotos` for photos it cannot judge. Returns what each check measured (the
    share recognised); empty for general encoders (DINO, CLIP: nothing to ask)."""
    from dreambooth_kit.util.registry import lookup

    roles = {"subject_encoder": subject_encoder, "prompt_encoder": prompt_encoder}
    out = []
    for name in dict.fromkeys(roles.values()):
        plugin = lookup("encoder", name)
        if plugin is not None and hasattr(plugin, "check_photos"):
            out.append(plugin.check_photos(photos, folder, [k for k, v in roles.items() if v == name]))
    return out


@dataclass(frozen=True)
class EvalPlan:
    """The images one target is scored on: every prompt at every seed, and the class prompt."""

    prompts: tuple[EvalPrompt, ...]
    class_prompt: str
    seeds: tuple[int, ...]
    class_seeds: tuple[int, ...]
    steps: int
    guidance_scale: float
    negative_prompt: str
    resolution: int

    def image_key(self, prompt: str, seed: int) -> str:
        """The name of one image's file: a hash of all that made it (the weights are the folder)."""
        recipe = [
            prompt,
            seed,
            self.steps,
            self.guidance_scale,
            self.negative_prompt,
            self.resolution,
            SAMPLER,
        ]
        return hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]

    def fingerprint(self, scorer: str) -> str:
        """The images asked for and what scores them (``scorer``: encoders and photos) as a hash."""
        keys = [self.image_key(p.text, s) for p in self.prompts for s in self.seeds]
        keys += [self.image_key(self.class_prompt, s) for s in self.class_seeds]
        return hashlib.sha256(
            json.dumps([keys, [p.scored for p in self.prompts], scorer]).encode()
        ).hexdigest()[:12]


def plan_for(spec: EvalSpec) -> EvalPlan:
    from dreambooth_kit.evaluation.prompt_sets import build

    s = spec.settings
    prompts = build(s.prompts, identifier=spec.identifier, class_noun=spec.class_noun, live=s.live_subject)
    return EvalPlan(
        prompts=tuple(prompts),
        class_prompt=spec.class_prompt,
        seeds=tuple(range(s.seed, s.seed + s.seeds)),
        class_seeds=tuple(range(s.seed, s.seed + s.class_images)),
        steps=s.steps,
        guidance_scale=s.guidance_scale,
        negative_prompt=s.negative_prompt,
        resolution=spec.resolution,
    )


@dataclass
class Images:
    by_prompt: list[list]  # by_prompt[j][i]: prompt j at seed i
    class_images: list
    made: int = 0  # how many were generated now (the rest came from the folder)


def make_images(pipe, plan: EvalPlan, folder: Path | None = None, *, progress: str | None = None) -> Images:
    """Every image of ``plan`` from ``pipe``; with ``folder``, those already there are loaded and
    only the missing ones generated and written (PNG through a temp file: an interrupted run
    leaves no partial image). ``progress``: a label for a progress bar over the images."""
    from dreambooth_kit.inference.generate import progress_bar

    out = Images([], [])
    jobs = [(p.text, plan.seeds) for p in plan.prompts] + [(plan.class_prompt, plan.class_seeds)]
    total = sum(len(seeds) for _, seeds in jobs)
    with progress_bar(progress, total) as bar:
        for j, (prompt, seeds) in enumerate(jobs):
            images = _prompt_images(pipe, plan, prompt, list(seeds), folder, out)
            bar.update(len(images))
            if j < len(plan.prompts):
                out.by_prompt.append(images)
            else:
                out.class_images = images
    return out


def _prompt_images(pipe, plan: EvalPlan, prompt: str, seeds: list[int], folder: Path | None, out: Images):
    """One prompt's images. The missing seeds go through the UNet together, up to
    :data:`BATCH` at a time (measured on the toy model: 0.35 s/image at 4 against 1.03 s one by one);
    a prompt whose images were all made in one call therefore gives the same pixels on a rerun."""
    from PIL import Image

    from dreambooth_kit.inference.generate import generate
    from dreambooth_kit.inference.pngmeta import save_png

    paths = {s: folder / f"{plan.image_key(prompt, s)}.png" for s in seeds} if folder is not None else {}
    have = {}
    for s, p in paths.items():
        if p.is_file():
            with Image.open(p) as im:
                have[s] = im.convert("RGB")
    missing = [s for s in seeds if s not in have]
    for i in range(0, len(missing), BATCH):
        made = generate(
            pipe, prompt, negative_prompt=plan.negative_prompt or None, seeds=missing[i : i + BATCH],
            steps=plan.steps, guidance_scale=plan.guidance_scale, height=plan.resolution,
            width=plan.resolution, batch_size=BATCH,
        )  # fmt: skip
        for (img, params), s in zip(made, missing[i : i + BATCH], strict=True):
            have[s] = img
            out.made += 1
            if s in paths:
                save_png(img, params, paths[s])
    return [have[s] for s in seeds]


def score(plan: EvalPlan, encoders, photos: Sequence, images: Images) -> dict[str, float | None]:
    """The metrics of one target's images (see the module's table)."""
    from dreambooth_kit.evaluation.metrics import (
        mean_cosine,
        mean_pairwise_distance,
        row_cosines,
        standard_error,
    )

    flat = [img for row in images.by_prompt for img in row]
    scored = [p.scored for p, row in zip(plan.prompts, images.by_prompt, strict=True) for _ in row]
    sub = encoders.subject.image_features
    refs = sub(list(photos))
    feats = sub(flat)  # encoded once: fidelity over all images, DIV within each prompt's rows
    per_prompt = feats.split([len(r) for r in images.by_prompt])
    fidelity = row_cosines(feats, refs)  # one value per image: the mean and its noise
    drift = row_cosines(sub(images.class_images), refs)  # PRES, image by image
    clip_refs = encoders.prompt.image_features(list(photos))
    row: dict[str, float | None] = {
        "subject_fidelity": float(fidelity.mean()),
        "clip_i": mean_cosine(encoders.prompt.image_features(flat), clip_refs),
        "prompt_fidelity": encoders.prompt.prompt_fidelity(flat, scored),
        "pres": float(drift.mean()),
        "div": sum(mean_pairwise_distance(f) for f in per_prompt) / len(per_prompt),
        "subject_rate": None,
        "subject_fidelity_se": standard_error(fidelity),
        "pres_se": standard_error(drift),
    }
    if encoders.counter is not None:
        row["subject_rate"] = encoders.counter.subject_rate(flat)
    return row


def load_photos(folder: Path) -> list:
    """The subject's photos as RGB images (the training loader: upright, frame 0)."""
    from dreambooth_kit.data.photos import find_images, load_image

    if not Path(folder).is_dir():
        raise EvaluateError(
            f"the subject's photos are not at {folder} (the run's data.instance_dir); "
            "pass --photos DIR (evaluate(photos=...)) where they are now"
        )
    paths, _, _ = find_images(folder)
    if not paths:
        raise EvaluateError(f"{folder}: no photos of the subject to compare with; pass --photos DIR")
    return [load_image(p) for p in paths]


@dataclass
class ValidationScorer:
    """``validation.metrics``: the same numbers for the model being trained, at each validation
    step, logged as tracker scalars ``eval/<metric>`` and appended to ``eval/validation_metrics.csv``.
    Its images are not written: the validation samples are the pictures."""

    plan: EvalPlan
    encoders: object
    photos: list

    def __call__(self, pipe, step: int, accelerator, out: Path) -> dict:
        row = score(self.plan, self.encoders, self.photos, make_images(pipe, self.plan))
        values = {k: v for k, v in row.items() if v is not None}
        accelerator.log({f"eval/{k}": v for k, v in values.items() if k in METRICS}, step=step)
        path = Path(out) / EVAL / "validation_metrics.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.is_file()
        with path.open("a", encoding="utf-8") as f:  # one line per validation: an append is enough
            w = csv.writer(f, lineterminator="\n")
            if new:
                w.writerow(["step", *METRICS, *ERRORS])
            w.writerow([step, *("" if row[m] is None else f"{row[m]:.4f}" for m in (*METRICS, *ERRORS))])
        log.info("step %d: %s", step, ", ".join(f"{k} {v:.3f}" for k, v in values.items() if k in METRICS))
        return row


def validation_scorer(spec: EvalSpec) -> ValidationScorer:
    """Loaded before training starts, so a missing encoder or photo folder fails at once."""
    from dreambooth_kit.evaluation.encoders import load_encoders
    from dreambooth_kit.inference.pipeline import default_device

    s = spec.settings
    photos = load_photos(spec.photos)
    # The same refusal as evaluate's, before training starts: scores logged every N steps from a
    # judge that cannot recognise these photos would mean nothing.
    check_encoders_know_photos(
        photos, Path(spec.photos), subject_encoder=s.subject_encoder, prompt_encoder=s.prompt_encoder
    )
    encoders = load_encoders(s.subject_encoder, s.prompt_encoder, device=default_device())
    return ValidationScorer(plan_for(spec), encoders, photos)

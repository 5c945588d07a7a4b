"""DreamBooth's quality metrics, written once for any image encoder.

``encode`` is any callable ``images -> (N, D) features``: the toy judge's
:meth:`~dreambooth_kit.toy.judge.Judge.features` here, DINO ViT-S/16 or CLIP image embeddings for a
real model. Features need not be normalised: every function normalises them itself. The metrics
mirror Ruiz et al. 2023 (DreamBooth, Section 4.1 and Tables 1 and 3):

============================  ======================  ==============================================
this module                   the paper's metric      what it measures
============================  ======================  ==============================================
:func:`subject_fidelity`      DINO, CLIP-I            generated images look like the subject's photos
:func:`subject_rate`          (none; toy only)        fraction a subject detector calls the subject
:func:`attribute_accuracy`    CLIP-T                  the image shows what the prompt asked
:func:`pres`                  PRES (lower is better)  class-prompt samples have drifted to the subject
:func:`diversity`             DIV (higher is better)  samples of one prompt differ from each other
============================  ======================  ==============================================

The cores (:func:`mean_cosine`, :func:`mean_pairwise_distance`, :func:`rate`,
:func:`attribute_matches`) are pure functions of features or predictions, so they are tested
with made-up numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from dreambooth_kit.errors import InvalidInput

Encoder = Callable[[Any], torch.Tensor]
ATTRIBUTES = ("class", "colour", "background")


class Predictor(Protocol):
    """What :func:`subject_rate` and :func:`attribute_accuracy` need of a judge: ``predict(images)``
    returning arrays ``class``, ``colour``, ``background`` (names) and ``subject_prob``."""

    def predict(self, images) -> Mapping[str, np.ndarray]: ...


def _unit(features, what: str) -> torch.Tensor:
    f = torch.as_tensor(features).detach().float()
    if f.ndim != 2 or f.shape[0] == 0:
        raise InvalidInput(f"{what}: expected (N, D) features with N >= 1, got shape {tuple(f.shape)}")
    return F.normalize(f, dim=1)


def mean_cosine(a, b) -> float:
    """Mean cosine similarity over every pair (one row of ``a``, one row of ``b``)."""
    return float(row_cosines(a, b).mean())


def row_cosines(a, b) -> torch.Tensor:
    """Each row of ``a``'s mean cosine with the rows of ``b``: one number per generated image, whose
    spread gives the standard error of :func:`mean_cosine`."""
    x, y = _unit(a, "mean_cosine a"), _unit(b, "mean_cosine b")
    if x.shape[1] != y.shape[1]:
        raise InvalidInput(f"mean_cosine: feature sizes differ ({x.shape[1]} vs {y.shape[1]})")
    return (x @ y.T).mean(1)


def standard_error(values) -> float:
    """Standard error of the mean of ``values`` (sample std / sqrt(n)); 0 for a single value."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    return float(v.std(unbiased=True) / v.numel() ** 0.5) if v.numel() > 1 else 0.0


def mean_paired_cosine(a, b) -> float:
    """Mean cosine of row i of ``a`` with row i of ``b`` (an image with its own prompt: CLIP-T)."""
    x, y = _unit(a, "mean_paired_cosine a"), _unit(b, "mean_paired_cosine b")
    if x.shape != y.shape:
        raise InvalidInput(f"mean_paired_cosine: shapes differ ({tuple(x.shape)} vs {tuple(y.shape)})")
    return float((x * y).sum(1).mean())


def mean_pairwise_distance(features) -> float:
    """Mean of 1 - cosine over the distinct pairs of rows (i < j): 0 when all rows point the same
    way, 1 when they are orthogonal, up to 2 when opposite."""
    x = _unit(features, "mean_pairwise_distance")
    n = x.shape[0]
    if n < 2:
        raise InvalidInput("diversity: needs at least 2 images of the prompt, got 1")
    i, j = torch.triu_indices(n, n, offset=1)
    return float((1 - (x @ x.T)[i, j]).mean())


def subject_fidelity(encode: Encoder, generated, references) -> float:
    """Mean cosine of each generated image's embedding with each reference (real subject) photo's.
    The paper's DINO metric with DINO ViT-S/16 features and CLIP-I with CLIP image features
    (SD: DINO 0.668, CLIP-I 0.803; real photos among themselves: DINO 0.774, CLIP-I 0.885).
    Higher: the generated subject looks more like the real one."""
    return mean_cosine(encode(generated), encode(references))


def diversity(encode: Encoder, images) -> float:
    """Mean pairwise 1 - cosine among the images of ONE prompt (at least 2): 0 = all the same
    picture. The analog of the paper's DIV, which averages LPIPS distances between samples of the
    same prompt (Table 3, Imagen: 0.391 with prior preservation, 0.371 without). Higher is better."""
    return mean_pairwise_distance(encode(images))


def pres(encode: Encoder, class_samples, references) -> float:
    """Prior preservation: mean cosine of class-prompt samples ("a photo of a ball", drawn after
    fine-tuning) with the subject's photos. The paper's PRES (DINO features; Table 3, Imagen:
    0.493 with prior preservation, 0.664 without). LOWER is better: a high value means the class
    word has drifted toward the subject (language drift)."""
    return mean_cosine(encode(class_samples), encode(references))


prior_drift = pres  # the same number under a descriptive name


def rate(subject_prob, threshold: float = 0.5) -> float:
    """Fraction of probabilities above ``threshold``."""
    p = np.asarray(subject_prob, dtype=np.float64).reshape(-1)
    if p.size == 0:
        raise InvalidInput("subject_rate: no images")
    return float((p > threshold).mean())


def subject_rate(judge: Predictor, images, threshold: float = 0.5) -> float:
    """Fraction of images the judge's subject detector calls the subject. On "a zwx ball" prompts
    it is how often the identifier produces the subject (higher is better); on the class prompt
    "a ball" it is the drift PRES measures, counted image by image (lower is better). The paper
    has no such number: it needs a detector, which only the toy world provides."""
    return rate(judge.predict(images)["subject_prob"], threshold)


def attribute_matches(
    predictions: Mapping[str, Sequence], expected: Sequence[Mapping[str, str]]
) -> dict[str, float]:
    """Accuracy per attribute of ``predictions`` (arrays of names, one entry per image) against
    ``expected`` (one dict per image of what its prompt asked, e.g. ``{"class": "ball",
    "background": "green"}``; an attribute the prompt did not name is left out and not scored).
    Keys: each attribute asked of at least one image, and ``all``: the fraction of images right on
    every attribute their prompt asked."""
    n = len(expected)
    if n == 0:
        raise InvalidInput("attribute_accuracy: no images")
    for key in ATTRIBUTES:
        if key in predictions and len(predictions[key]) != n:
            raise InvalidInput(
                f"attribute_accuracy: {len(predictions[key])} predictions of {key} for {n} expected"
            )
    hits: dict[str, list[bool]] = {}
    all_right = []
    for i, asked in enumerate(expected):
        unknown = set(asked) - set(ATTRIBUTES)
        if unknown:
            raise InvalidInput(
                f"attribute_accuracy: expected[{i}] has {sorted(unknown)}; the attributes are {list(ATTRIBUTES)}"
            )
        right = [predictions[k][i] == v for k, v in asked.items()]
        for (k, _), ok in zip(asked.items(), right, strict=True):
            hits.setdefault(k, []).append(bool(ok))
        all_right.append(all(right))
    out = {k: float(np.mean(hits[k])) for k in ATTRIBUTES if k in hits}
    out["all"] = float(np.mean(all_right))
    return out


def attribute_accuracy(judge: Predictor, images, expected: Sequence[Mapping[str, str]]) -> dict[str, float]:
    """Prompt fidelity: how often the judge reads off each image the class, colour and background
    its prompt asked for (see :func:`attribute_matches` for ``expected`` and the keys). The toy's
    stand-in for the paper's CLIP-T (prompt-image CLIP cosine; SD: 0.305): a judge that names
    attributes gives an accuracy where CLIP gives a similarity. ``class`` on class prompts is
    class correctness; ``background`` on "a zwx ball on a green background" is recontextualisation."""
    if len(images) != len(expected):
        raise InvalidInput(f"attribute_accuracy: {len(images)} images but {len(expected)} expected dicts")
    return attribute_matches(judge.predict(images), expected)

"""The best-checkpoint rule, over rows of scores (``subject_fidelity``, ``pres``, their standard
errors, ``subject_rate``): what `dreambooth-kit evaluate` names after the fact and what
``train.stop: auto`` applies while training. The EARLIEST row whose subject fidelity is within the
tolerance of the highest seen and whose PRES is within it of the lowest seen: rows within the
tolerance look alike to the metrics, and more steps only add overfitting (the photos' poses and
backgrounds leak into every prompt). PRES below the base model's counts as the base model's. When
none meets both, the largest subject fidelity - PRES. When no row has a positive subject
fidelity, or the toy judge finds the subject in none of their images, none is named.

No torch, no models: a pure function of the rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def best_checkpoint(rows: Sequence[dict], tolerance: float) -> tuple[dict | None, str]:
    """The rule above, over the rows that are not the base model. A row is
    "within" the best seen when the gap is at most ``tolerance`` or, if larger, twice the standard
    error of the gap (sqrt(se_best^2 + se_row^2), from the spread over the images): differences the
    sampling noise of a few images makes are not taken for real ones.

    PRES below the base model's counts as the base model's: class samples that are neither the
    class nor the subject also score low (toy world, 100 steps without prior preservation: PRES 0.20
    against the base model's 0.58, from malformed blobs in the subject's colours)."""
    base = next((r for r in rows if r["checkpoint"] == "base"), None)
    floor = base["pres"] if base is not None and _finite(base["pres"]) else float("-inf")
    scored = [r for r in rows if r["checkpoint"] != "base"]
    if not scored:
        return None, "no checkpoint was scored (only the base model)"
    cands = [{**r, "pres": max(r["pres"], floor)} for r in scored if _rankable(r)]
    meaningless = _unranked(cands)
    if meaningless:
        return None, meaningless
    top = max(cands, key=lambda r: r["subject_fidelity"])
    low = min(cands, key=lambda r: r["pres"])

    def near(r: dict, ref: dict, metric: str) -> bool:
        gap = abs(r[metric] - ref[metric])
        noise = 2 * ((r.get(metric + "_se") or 0) ** 2 + (ref.get(metric + "_se") or 0) ** 2) ** 0.5
        return gap <= max(tolerance, noise) + 1e-9  # rows hold 4 decimals: 0.81 - 0.79 is 0.02

    ok = [r for r in cands if near(r, top, "subject_fidelity") and near(r, low, "pres")]
    seen = (
        f"the highest subject fidelity ({top['subject_fidelity']:.3f}, {top['checkpoint']}) and the lowest "
        f"PRES ({low['pres']:.3f}, {low['checkpoint']}; never below the base model's), allowing "
        f"{tolerance} or twice the standard error"
    )
    by_name = {r["checkpoint"]: r for r in rows}
    if ok:
        best = min(ok, key=lambda r: r["step"])
        return by_name[best["checkpoint"]], f"the earliest checkpoint within noise of both {seen}"
    best = max(cands, key=lambda r: r["subject_fidelity"] - r["pres"])
    return by_name[best["checkpoint"]], (
        f"no checkpoint is within noise of both {seen}: this one has the largest subject fidelity - "
        "PRES. The subject is bought with class drift; prior preservation "
        "(prior.with_prior_preservation) reduces it"
    )


def _finite(v) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def _rankable(r: dict) -> bool:
    """A row whose scores can rank it: a positive subject fidelity and a PRES, both numbers. At
    fidelity <= 0 the images point away from the photos in the encoder's space (the toy world's
    base model scores 0.60, its trained checkpoints 0.65-0.88)."""
    return _finite(r["subject_fidelity"]) and r["subject_fidelity"] > 0 and _finite(r["pres"])


def _unranked(cands: Sequence[dict]) -> str:
    """Why these checkpoints' scores cannot name a best ("" when they can). A detector (the toy
    judge) that finds the subject in no image of any checkpoint means none drew it, or the judge
    does not know the photos' subject: on the demo subject's photos, tiny model, it gave fidelity
    0.60-0.63 (its features still give cosines) and subject rate 0 in every row."""
    no_best = "no checkpoint is better than the others by these scores, so none is named best or exported: "
    if not cands:
        return no_best + (
            "no checkpoint's subject fidelity is above 0 (and a number); check that the encoders can "
            "judge the subject's photos"
        )
    if all(r.get("subject_rate") == 0 for r in cands):
        return no_best + "the toy judge's detector found the subject in no image of any checkpoint"
    return ""

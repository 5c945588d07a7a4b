"""The toy world's subject read off an image by the world's own colour rules, without a learned judge.

The learned judge's detector (``toy/judge.py``) accepts partial drawings: a cyan-over-magenta ball with
no white band still scores as the subject. This is the strict variant: all three of the subject's parts
present (cyan top, white band, magenta bottom), in that order from top to bottom. It is written from
:mod:`dreambooth_kit.toy.world`'s colours alone, so it cannot share a learned judge's blind spots;
reported beside the judge's rate, never instead of it.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

# Cyan (0, 200, 205) has green and blue far above red; magenta (220, 0, 150) red and blue above green.
# After the toy VAE's round trip they read e.g. (73, 167, 185) and (173, 106, 161): these margins keep
# both, and no world colour or background passes either (blue (35, 75, 215): green - red is 40).
CYAN_MARGIN, MAGENTA_MARGINS = 50, (40, 20)
MIN_HALF_PIXELS = 6  # the smallest subject (a 12 px ball at 32 px) has ~40 pixels of each half
# The white band is 2-3 rows at 32 px, and the VAE blurs it: the brightest row between the halves,
# averaged over the middle half of the ball's columns, has its darkest channel at 146-195 (2nd-98th
# percentile of 150 subjects after the VAE's round trip) with the band, 78-117 without it (the cyan
# to magenta blend alone reaches ~100; as drawn, without the VAE: 249-255 against 14-100).
BAND_MIN_CHANNEL = 130


def halves(img: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks of the cyan-like and magenta-like pixels."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    cyan = (g - r > CYAN_MARGIN) & (b - r > CYAN_MARGIN)
    magenta = (r - g > MAGENTA_MARGINS[0]) & (b - g > MAGENTA_MARGINS[1])
    return cyan, magenta


def band_brightness(img: Image.Image) -> float | None:
    """The darkest channel of the brightest row between the halves (middle half of the ball's
    columns); None when the halves are missing or not cyan above magenta."""
    cyan, magenta = halves(img)
    if cyan.sum() < MIN_HALF_PIXELS or magenta.sum() < MIN_HALF_PIXELS:
        return None
    top, bottom = np.nonzero(cyan)[0].mean(), np.nonzero(magenta)[0].mean()
    if not top < bottom:
        return None
    cols = np.nonzero(cyan | magenta)[1]
    quarter = (cols.max() - cols.min()) / 4
    middle = slice(int(round(cols.min() + quarter)), int(round(cols.max() - quarter)) + 1)
    darkest = np.asarray(img.convert("RGB"), dtype=np.float32)[:, middle].min(axis=-1).mean(axis=1)
    return float(darkest[int(round(top)) : int(round(bottom)) + 1].max())


def is_subject(img: Image.Image) -> bool:
    """Cyan above magenta with a white band between: every part of the subject."""
    band = band_brightness(img)
    return band is not None and band >= BAND_MIN_CHANNEL


def strict_subject_rate(images) -> float:
    """Share of ``images`` that show the whole subject by :func:`is_subject`."""
    return _share(images, is_subject)


def _share(images, test) -> float:
    images = list(images)
    if not images:
        raise ValueError(f"{test.__name__}: no images to count")
    return sum(test(i) for i in images) / len(images)


# The clutter of the masked-loss test bed (world.CLUTTER_COLOUR, black): no world colour but black,
# no background and no part of the subject has every channel this low. After the toy VAE's round
# trip a cluttered photo keeps 7-23 such pixels (20 photos), a clean one 0; 6 counts it as drawn.
CLUTTER_MAX_CHANNEL, CLUTTER_MIN_PIXELS = 80, 6


def has_clutter(img: Image.Image) -> bool:
    """A black object in the image: the clutter the subject's photos showed beside it."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32)
    return int((a.max(axis=-1) < CLUTTER_MAX_CHANNEL).sum()) >= CLUTTER_MIN_PIXELS


def clutter_rate(images) -> float:
    """Share of ``images`` with the clutter in them (:func:`has_clutter`)."""
    return _share(images, has_clutter)

"""Aspect-ratio buckets (``data.buckets``): photos keep their framing instead of a centre crop.

A 4:3 phone photo centre-cropped to a square loses a quarter of its width, and the subject with it
when it stands off-centre. With buckets each photo trains at the size of the bucket nearest its own
aspect ratio: sides multiples of ``data.bucket_step`` (64 for SD 2.x: its VAE's 8x times the UNet's
three 2x downsamplings), area at most ``data.resolution``², aspect at most :data:`MAX_ASPECT`. At
512 px that is 384x640, 448x576, 512x512, 576x448, 640x384; at 768 px nine buckets from 576x1024 to
1024x576. A photo is resized to cover its bucket and the few pixels left over are cropped (centred,
or at the row's random offset with ``data.center_crop: false``).

Written here rather than taken from kohya's sd-scripts: its bucket manager is part of its training
script, not a library, and the list is a few lines; the sizes follow the same rule (for each width,
the tallest height that keeps the area, and the transposes).

No torch here: the photo check shows each photo's bucket before any model loads.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

# Photos wider than 2:1 are rare among subject photos (phones shoot 4:3 and 16:9 = 1.78); every
# bucket needs its own class images, so fewer, wider-spaced buckets keep each one's share large.
MAX_ASPECT = 2.0

Size = tuple[int, int]  # (width, height) in pixels


def bucket_sizes(resolution: int, step: int, max_aspect: float = MAX_ASPECT) -> list[Size]:
    """Every bucket, narrowest first: for each width (a multiple of ``step``) the tallest height
    (a multiple of ``step``) whose area stays within ``resolution``², and its transpose, keeping
    those within ``max_aspect``. The square ``resolution`` x ``resolution`` is one of them when
    ``resolution`` is a multiple of ``step``."""
    if step <= 0 or resolution < step:
        raise ValueError(f"bucket step {step} must be positive and at most the resolution {resolution}")
    area = resolution * resolution
    sizes: set[Size] = set()
    for width in range(step, int(resolution * max_aspect) + 1, step):
        height = area // width // step * step
        if height >= step and max(width, height) <= max_aspect * min(width, height):
            sizes |= {(width, height), (height, width)}
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def nearest_bucket(size: Size, buckets: Iterable[Size]) -> Size:
    """The bucket whose aspect ratio is nearest the photo's (in log scale: 2:1 is as far from 1:1 as
    1:2), the larger one on a tie."""
    w, h = size
    aspect = math.log(w / h)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def crop_share(size: Size, bucket: Size) -> float:
    """The share of the photo that fits its bucket's aspect ratio (1.0: none of it is cropped)."""
    w, h = size
    bw, bh = bucket
    return min(w * bh, h * bw) / max(w * bh, h * bw)


def class_image_counts(buckets: list[Size], total: int) -> dict[Size, int]:
    """``total`` class images shared among the buckets in proportion to the photos in each
    (``buckets``: one entry per photo), by largest remainder, at least one per bucket used: the
    class images are batched with the photos of their bucket, so every bucket needs its own."""
    counts: dict[Size, int] = {}
    for b in buckets:
        counts[b] = counts.get(b, 0) + 1
    total = max(total, len(counts))
    exact = {b: total * n / len(buckets) for b, n in counts.items()}
    share = {b: max(1, int(x)) for b, x in exact.items()}
    # the rest, one each, to the largest remainders (ties: the bucket with more photos, then the size)
    order = sorted(exact, key=lambda b: (-(exact[b] - int(exact[b])), -counts[b], b))
    for b in order[: max(0, total - sum(share.values()))]:
        share[b] += 1
    return dict(sorted(share.items()))


def bucket_folder_name(bucket: Size) -> str:
    """The subfolder of ``prior.class_dir`` that holds a non-square bucket's class images."""
    return f"{bucket[0]}x{bucket[1]}"

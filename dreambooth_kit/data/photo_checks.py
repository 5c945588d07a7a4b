"""The photo check: every photo of a folder checked before any model loads (format, decoding, size against the
training resolution or its bucket, EXIF rotation, near-duplicates, captions), every problem reported at
once with the file and the fix. No torch, so `check-data` starts fast."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from dreambooth_kit.data.buckets import crop_share, nearest_bucket
from dreambooth_kit.data.photos import (
    ACCEPTED,
    SIXTEEN_BIT_MODES,
    DataError,
    DecodeNotes,
    ImageIssue,
    ImageReport,
    caption_file,
    decode,
    find_images,
    read_caption,
    resolve_folder,
)


def check_images(
    folder: str | Path,
    *,
    resolution: int = 512,
    min_size: int = 32,
    min_count: int = 3,
    max_count: int = 100,
    max_pixels: int | None = None,
    use_captions: bool = False,
    buckets: list[tuple[int, int]] | None = None,
) -> ImageReport:
    """Decode every candidate and collect all problems; raises only when the folder does not exist.

    ``use_captions``: each usable image's ``name.txt`` is reported as its caption (``report.captions``).
    ``buckets`` (data.buckets, :func:`~dreambooth_kit.data.buckets.bucket_sizes`): each usable image's bucket
    is reported (``report.buckets``), and the size and crop warnings are about it, not the square."""
    images, skipped, issues = find_images(folder, use_captions=use_captions)
    report = ImageReport(resolve_folder(folder), [], skipped, issues)
    limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS  # None: no limit
    first_by_hash: dict[str, Path] = {}
    hashed: list[tuple[Path, int]] = []  # (photo, dhash) of each photo not an exact duplicate

    for path in images:

        def add(severity: str, message: str, path: Path = path) -> None:
            issues.append(ImageIssue(path, severity, f"{path.name}: {message}"))

        try:
            with warnings.catch_warnings():
                # PIL warns between 1x and 2x its limit; we report our own band below instead.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                rgb, notes = decode(path, limit)
        except DataError as e:
            add("error", str(e))
            continue
        bucket = nearest_bucket(rgb.size, buckets) if buckets else None
        problems = _photo_problems(rgb.size, notes, limit, resolution, min_size, bucket)
        for severity, message in problems:
            add(severity, message)
        if any(severity == "error" for severity, _ in problems):
            continue
        w, h = rgb.size
        digest = hashlib.sha256(f"{w}x{h}".encode() + rgb.tobytes()).hexdigest()
        if digest in first_by_hash:
            add("warning", f"same pixels as {first_by_hash[digest].name}; duplicates count double")
        else:
            first_by_hash[digest] = path
            near = _near_duplicate(path, dhash(rgb), hashed)
            if near:
                add("warning", near)
        report.images.append(path)
        report.buckets.update({path: bucket} if bucket else {})
    if use_captions:
        report.captions = _captions(report.images, issues)
    count = _count_issue(len(report.images), report.folder, min_count, max_count)
    issues += [count] if count else []
    # One order for the reader: by file name, folder-wide issues last (stable: a file's issues keep order).
    issues.sort(key=lambda i: (i.path == report.folder, i.path.name))
    return report


# Distance in bits (of dhash's 64) at or below which a photo is reported as a copy of an earlier one.
# Measured: a photo resized to half, re-saved as JPEG quality 70 or converted PNG->JPEG is 0-2 bits
# from the original for the demo subject's 128 px photos and 0-1 for 512-720 px photos, 1-7 when
# cropped by 1-2 px, up to 9 for the toy world's 32 px photos on noisy backgrounds (there a 1-2 px
# crop is 3-6% of the side: 7-20, often missed); a photo republished with one region highlighted
# and the rest dimmed, 6. Not copies: different shots are >= 26 apart among the demo subject's 5 and
# among the toy subject's 5, >= 19 between the two sets; a 10% crop (a new framing) >= 14, a mirror
# image >= 15. 12 sits between the copies' 9 and those 14.
NEAR_DUPLICATE_BITS = 12


def dhash(img: Image.Image) -> int | None:
    """64-bit difference hash: does brightness rise or fall between neighbours of a 9x8 grey thumbnail.
    Resizing, re-encoding or a small crop moves few bits; a different shot moves ~half. None for a
    flat image (every bit 0, the same hash as any other flat image: it says nothing).

    Hand-written, not the imagehash package: it is ten lines, and imagehash would be a new
    dependency for this one use."""
    # LANCZOS, not BOX: copies of the demo subject's photos are 0-7 bits apart with either, its 5
    # different shots >= 27 with LANCZOS but >= 18 with BOX. A 12 MP photo takes ~45 ms.
    grey = np.asarray(img.convert("L").resize((9, 8), Image.Resampling.LANCZOS), np.int16)
    steps = np.diff(grey, axis=1)
    if np.abs(steps).max() < 2:  # no photo is this flat; a 1-level step is the resize's rounding
        return None
    return int.from_bytes(np.packbits(steps > 0).tobytes(), "big")


def _near_duplicate(path: Path, digest: int | None, hashed: list[tuple[Path, int]]) -> str | None:
    """The warning for ``path`` if its dhash is within NEAR_DUPLICATE_BITS of an earlier photo's (the
    nearest is named); records it in ``hashed`` for the photos after it."""
    if digest is None:
        return None
    near = [((digest ^ other).bit_count(), seen) for seen, other in hashed]
    hashed.append((path, digest))
    bits, seen = min(near, default=(NEAR_DUPLICATE_BITS + 1, path))
    if bits > NEAR_DUPLICATE_BITS:
        return None
    return (
        f"looks like a resized or re-encoded copy of {seen.name} (perceptual hash {bits} bits apart "
        "of 64); near-duplicates count double in training: remove one"
    )


def _photo_problems(
    size: tuple[int, int],
    notes: DecodeNotes,
    limit: int | None,
    resolution: int,
    min_size: int,
    bucket: tuple[int, int] | None = None,
) -> list[tuple[str, str]]:
    """(severity, message) for one decoded photo of ``size`` (upright); an error means it is not used.
    ``bucket``: the size it trains at (data.buckets), else a ``resolution`` square."""
    out: list[tuple[str, str]] = []
    w, h = size
    pixels = notes.width * notes.height
    if limit is not None and pixels > limit / 2:
        mp = f"{notes.width}x{notes.height} = {pixels / 1e6:.1f} MP"
        out.append(
            ("warning", f"{mp}, over half the {limit / 1e6:.1f} MP limit; downscale it to load faster")
        )
    short = min(w, h)
    if short < min_size:
        out.append(("error", f"{w}x{h} is below the {min_size} px minimum side; use a larger photo"))
        return out
    out += _fit_problems(size, resolution, bucket)
    if notes.frames > 1:
        out.append(("warning", f"animated ({notes.frames} frames): only frame 0 is used"))
    if notes.mode == "CMYK":
        out.append(("warning", "CMYK: converted to RGB without its colour profile; save it as sRGB"))
    if notes.transparent:
        out.append(
            ("warning", "transparent areas composited on white; export it with the background you want")
        )
    if notes.mode in SIXTEEN_BIT_MODES:
        out.append(("info", "16-bit greyscale: scaled to 8-bit"))
    if notes.exif_error:
        out.append(("warning", f"EXIF unreadable ({notes.exif_error}); orientation not applied"))
    return out


def _fit_problems(
    size: tuple[int, int], resolution: int, bucket: tuple[int, int] | None
) -> list[tuple[str, str]]:
    """How the photo fits what it trains at: upscaled (blurry), or most of it cropped away."""
    w, h = size
    tw, th = bucket or (resolution, resolution)
    target = f"its bucket {tw}x{th}" if bucket else f"the training resolution {resolution}"
    out = []
    factor = max(tw / w, th / h)  # the resize that covers the target
    if factor > 1:
        times = f"{factor:.1f}".removesuffix(".0")
        why = f"smaller than {target}: it will be upscaled {times}x"
        out.append(("warning", f"{w}x{h} is {why} and look blurry; use photos of {max(tw, th)} px or more"))
    kept = round(100 * crop_share(size, (tw, th)))
    if bucket is None and max(w, h) > 2 * min(w, h):
        tip = "crop it around the subject, or set data.buckets: true (keeps the framing up to 2:1)"
        out.append(("warning", f"{w}x{h}: the square crop keeps only {kept}% of it; {tip}"))
    elif bucket is not None and kept < 75:
        tip = "crop it around the subject (no bucket is wider than 2:1)"
        out.append(("warning", f"{w}x{h}: {target} keeps only {kept}% of it; {tip}"))
    if bucket is not None:
        out.append(("info", f"{w}x{h}: trains at {tw}x{th} (data.buckets)"))
    return out


def _captions(images: list[Path], issues: list[ImageIssue]) -> dict[Path, str]:
    """Each image's caption (what pair_examples will train it with), reported on its caption file."""
    captions: dict[Path, str] = {}
    for image in images:
        txt = caption_file(image)
        caption = read_caption(image)
        if caption is not None:
            captions[image] = caption
            issues.append(ImageIssue(txt, "info", f"{txt.name}: caption of {image.name}: {caption!r}"))
        elif txt.is_file():
            message = (
                f"{txt.name} is empty, so {image.name} trains with the instance prompt; "
                f"write its caption in it or delete it"
            )
            issues.append(ImageIssue(txt, "warning", message))
    return captions


def _count_issue(n: int, root: Path, min_count: int, max_count: int) -> ImageIssue | None:
    if n == 0:
        return ImageIssue(root, "error", f"0 usable images in {root} (accepted: {ACCEPTED})")
    if n < min_count:
        # Fewer than ~3 views and the model ties the subject to one pose and background.
        advice = "add photos from other angles and places"
        return ImageIssue(
            root, "warning", f"only {n} usable image(s) in {root}, fewer than {min_count}; {advice}"
        )
    if n > max_count:
        advice = "all are used, but DreamBooth is meant for a handful of subject photos"
        return ImageIssue(root, "warning", f"{n} usable images in {root}, more than {max_count}; {advice}")
    return None

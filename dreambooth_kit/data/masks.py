"""data.masks: a mask per photo that weights the instance loss (kohya's masked loss).

White (255) is the subject and trains at full weight; black trains at ``train.unmasked_weight``
(default 0.1), grays in between. The mask is the photo's own alpha channel (``data.masks: alpha``:
a PNG cut out in any editor, transparent = not the subject) or ``DIR/<photo stem>.png``. It follows
the photo's crop and flip; the loss averages it down to the latent grid (losses.diffusion_loss: 8x
smaller for SD's VAE, 4x for the toy model's), so a latent pixel half on the subject counts half.

The default 0.1 outside the mask is kohya's and OneTrainer's usual setting. Measured on the toy world
(README, "Training options"; photos with a black box beside the subject, 3 training seeds) 0 did
better: the box in none of the samples (0.89 without masks, 0.68 at 0.1) and subject fidelity at the
clean photos' level (0.89; 0.46 at 0.1), the backgrounds still following the prompt.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageOps

ALPHA = "alpha"
MASK_SUFFIX = ".png"


def mask_path(photo: Path, masks: str) -> Path | None:
    """Where ``photo``'s mask is read from: a file in the mask folder, or None (its own alpha)."""
    return None if masks == ALPHA else Path(masks) / (Path(photo).stem + MASK_SUFFIX)


def load_mask(photo: Path, masks: str) -> Image.Image:
    """The mask as an upright 8-bit gray image of the photo's size (not checked here: see
    :func:`mask_problems`)."""
    path = mask_path(photo, masks)
    with Image.open(path or photo) as img:
        img = ImageOps.exif_transpose(img)
        if path is None:
            return img.convert("RGBA").getchannel("A")
        return img.convert("L")


def mask_problems(photos: list[Path], masks: str, instance_dir: str | Path) -> list[tuple[Path, str]]:
    """(file, what is wrong and the fix) for every photo whose mask is missing, unreadable, of another
    size, or empty; before any model loads."""
    if masks != ALPHA and Path(masks).resolve() == Path(instance_dir).resolve():
        return [
            (Path(masks), f"data.masks: {masks} is the photo folder; put the masks in a folder of their own")
        ]
    problems: list[tuple[Path, str]] = []
    for photo in photos:
        problem = _problem(Path(photo), masks)
        if problem:
            problems.append(problem)
    return problems


def _problem(photo: Path, masks: str) -> tuple[Path, str] | None:
    path = mask_path(photo, masks)
    if path is not None and not path.is_file():
        return path, (
            f"data.masks: no mask for {photo.name}: expected {path} (white = the subject, black = the "
            "rest, the photo's size)"
        )
    with Image.open(photo) as img:
        size = ImageOps.exif_transpose(img).size
        has_alpha = img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info
    if path is None and not has_alpha:
        return photo, (
            f"data.masks: alpha, but {photo.name} has no alpha channel; save it as a PNG with the "
            "background transparent, or give data.masks a folder of masks"
        )
    try:
        mask = load_mask(photo, masks)
    except OSError as e:
        return path or photo, (
            f"data.masks: the mask of {photo.name} cannot be read ({e}); save it again as a PNG"
        )
    if mask.size != size:
        return path or photo, (
            f"data.masks: the mask of {photo.name} is {mask.size[0]}x{mask.size[1]}, the photo "
            f"{size[0]}x{size[1]}; a mask must have its photo's size"
        )
    if mask.getextrema()[1] == 0:
        return path or photo, (
            f"data.masks: the mask of {photo.name} is all black: nothing of it would train at full "
            "weight; paint the subject white"
        )
    return None


def loss_weights(
    mask: Image.Image, size: int | tuple[int, int], preprocess, *, unmasked_weight: float, **crop
) -> torch.Tensor:
    """The per-pixel loss weights (1 x height x width, ``size`` a square side or a bucket) of one photo: ``preprocess`` is the photo's own
    (dataset.preprocess, with the same ``crop`` arguments), so the mask is cropped and flipped exactly
    as the photo."""
    inside = (preprocess(mask.convert("RGB"), size, **crop)[:1] + 1) / 2  # [-1, 1] -> [0, 1], one channel
    return unmasked_weight + (1 - unmasked_weight) * inside

"""Generated images on disk: one PNG per seed (its settings inside, see pngmeta) and contact-sheet grids."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image

from dreambooth_kit.inference.pngmeta import save_png


def save_images(
    results, folder: str | Path, *, grid: bool = False, prefix: str = "", overwrite: bool = False
) -> list[Path]:
    """Save ``generate()`` results as ``{prefix}{seed}.png`` (+ ``grid.png``); returns the paths.

    An existing file is never replaced unless ``overwrite``: the image goes to the next free name,
    ``{seed}-2.png``, ... (the same seed with another prompt or LoRA is another picture)."""
    folder = Path(folder)
    paths = [
        save_png(r.image, r.params, _free(folder / f"{prefix}{r.params.seed}.png", overwrite))
        for r in results
    ]
    if grid and results:
        g = _free(folder / f"{prefix}grid.png", overwrite)
        make_grid([r.image for r in results]).save(g)
        paths.append(g)
    return paths


def _free(path: Path, overwrite: bool) -> Path:
    n = 2
    candidate = path
    while not overwrite and candidate.exists():
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        n += 1
    return candidate


def make_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Tiles in rows of ``cols`` (default: a near-square sheet), each the size of the first image."""
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid

"""The class-image store: class images shared between runs, keyed by how they were made.

A second subject of the same class (a second dog) asks for the same class images as the first:
the same base model, prompt, negative prompt, size, sampler, steps, guidance and seeds. Generating
them again is the largest single cost of a run (the seed-000 recipe: 120 images x 50 sampler steps x
2 UNet evaluations with guidance, against 800 x 2 for training). The store keeps every class image
a run generates under ``<store>/<key>/seed-<seed>.png``, where ``key`` is a hash of that recipe, and
a later run with the same recipe copies them into its ``prior.class_dir`` instead of generating.

- Written only through a temp file and a rename: a killed run leaves no partial image, and two
  runs filling the same entry at once each publish whole files (the same seed gives the same
  image, so whichever rename lands last changes nothing).
- Nothing is deleted unless asked: ``dreambooth-kit class-images prune``.
- The base model is identified by content where it is on disk (a hash of its weight files, read
  once per machine), by id + revision + variant on the Hub: a local folder retrained in place is
  another model.
- Image i of a run is seed + i wherever it comes from; the store only skips making it again. An
  image generated in a batch of another size may differ from this run's own by float rounding
  (within 2/255 on CPU), never by more.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreambooth_kit.errors import UserError


@dataclass(frozen=True)
class ClassImageSpec:
    """One subject's class images, resolved from the config (prior section + concept + training size):
    all that class-image generation reads."""

    folder: Path
    prompt: str
    count: int
    negative_prompt: str
    steps: int
    guidance_scale: float
    batch_size: int | str  # or "auto"
    # data.resolution: the training size, not the model's native size (768 for SD 2.1); or a bucket's
    # (width, height) (data.buckets)
    size: int | tuple[int, int]
    seed: int  # image i uses seed + i
    regenerate: bool
    sampler: str | None = None  # a SCHEDULERS name; None: the model's own scheduler
    store: Path | None = None  # the class-image store's folder; None: no store


log = logging.getLogger("dreambooth_kit")

RECIPE = "recipe.json"
# What makes two class images interchangeable. "images" (the per-run index -> seed map) and the
# model's path are not: the seed is in the file name and the model is identified by its content.
# The prediction type is part of it: the same weights read as epsilon or as v draw other images, and
# an entry made before it was recorded is keyed without it, so it is never served again.
STORE_KEYS = (
    "model", "prediction_type", "prompt", "negative_prompt", "size", "sampler", "steps", "guidance_scale"
)  # fmt: skip


class ClassStoreError(UserError, RuntimeError):
    """A store command that cannot do what was asked; the message names the entry or the flag."""


def recipe_size(size: int | str) -> tuple[int, int]:
    """A recipe's "size" as (width, height): a square side, or a bucket's "WxH" (data.buckets)."""
    if isinstance(size, int):
        return size, size
    width, height = str(size).split("x")
    return int(width), int(height)


def default_root() -> Path:
    from dreambooth_kit.util.cache_dir import cache_root

    return cache_root() / "class_images"


def store_root(setting: str | bool | None) -> Path | None:
    """``prior.store``: "auto" ($DREAMBOOTH_KIT_CLASS_STORE if set, e.g. a Google Drive folder on
    Colab, else the cache folder's class_images/), "off" (no store), or a folder. YAML's booleans:
    false is "off", true "auto" (a bare ``off`` in YAML is false)."""
    if setting is True or setting == "auto":
        setting = os.environ.get("DREAMBOOTH_KIT_CLASS_STORE") or str(default_root())
    if setting in (None, False, "off", "false"):
        return None
    return Path(setting).expanduser()


def model_identity(source) -> str:
    """The base model by content on disk (the hash of its weight files, remembered per machine:
    hashing a 5 GB model costs seconds once), else by Hub id + revision + variant."""
    from dreambooth_kit.util.hashing import sha256_file

    if source.sha256:  # a single file, hashed when resolved
        return f"sha256:{source.sha256}"
    folder = Path(source.location)
    if not folder.is_dir():
        return f"hub:{source.pretrained}@{source.revision or 'main'}:{source.variant or ''}"
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        if path.suffix in {".safetensors", ".bin", ".json", ".txt"}:
            digest.update(f"{path.relative_to(folder).as_posix()}={sha256_file(path)}\n".encode())
    return f"folder:{digest.hexdigest()}"


def store_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    return {k: recipe[k] for k in STORE_KEYS}


def entry_key(recipe: dict[str, Any]) -> str:
    text = json.dumps(store_recipe(recipe), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def seed_file(seed: int) -> str:
    return f"seed-{seed:010d}.png"


@dataclass
class Entry:
    key: str
    folder: Path
    recipe: dict[str, Any]
    images: int
    bytes: int
    last_used: float  # seconds since the epoch (recipe.json's modification time)


class ClassStore:
    """One store folder. Safe to share between processes and runs (see the module docstring)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def folder(self, recipe: dict[str, Any]) -> Path:
        return self.root / entry_key(recipe)

    def find(self, recipe: dict[str, Any], seeds: list[int]) -> dict[int, Path]:
        """The stored image of each seed that has one."""
        folder = self.folder(recipe)
        found = {s: folder / seed_file(s) for s in seeds}
        return {s: p for s, p in found.items() if p.is_file()}

    def put(self, recipe: dict[str, Any], seed: int, image: Path) -> None:
        """Copy ``image`` in as ``seed``'s, through a temp file and a rename."""
        from dreambooth_kit.util.atomic import writing

        folder = self.folder(recipe)
        if not (folder / RECIPE).is_file():  # once per entry, not per image: a run touches it on use
            self.touch(recipe)
        with writing(folder / seed_file(seed)) as tmp:
            shutil.copyfile(image, tmp)

    def usable(self, recipe: dict[str, Any], seed: int, image: Path) -> str | None:
        """Why a stored image must not be handed out (None: it may). It must decode whole, have the
        recipe's size, and say in its own metadata that it was made with this recipe's prompt,
        negative prompt, steps and seed: a damaged copy, or a foreign or resized PNG put in by hand,
        would be trained on as a class image."""
        from PIL import Image

        from dreambooth_kit.inference.pngmeta import MetadataError, read_metadata

        try:
            with Image.open(image) as im:
                im.load()  # the whole image: a truncated PNG opens fine and fails only here
                size = im.size
            params = read_metadata(image)["params"]
        except (OSError, SyntaxError, ValueError, MetadataError, Image.DecompressionBombError) as e:
            return f"unreadable ({type(e).__name__})"
        if size != recipe_size(recipe["size"]):
            return f"{size[0]}x{size[1]} px, the recipe's size is {recipe['size']}"
        made = None if params is None else (params.prompt, params.negative_prompt, params.steps, params.seed)
        if made != (recipe["prompt"], recipe["negative_prompt"], recipe["steps"], seed):
            return "its metadata does not name this recipe and seed"
        return None

    def drop(self, image: Path, why: str) -> None:
        """Remove one unusable image, so no run is handed it again; the run generates it instead."""
        log.warning("class-image store: removing %s (%s); it will be generated again", image, why)
        image.unlink(missing_ok=True)

    def touch(self, recipe: dict[str, Any]) -> None:
        """Write (or refresh) the entry's recipe.json; its time is the entry's last use."""
        from dreambooth_kit.util.atomic import write_json

        folder = self.folder(recipe)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / RECIPE, store_recipe(recipe), indent=2, sort_keys=True)

    def entries(self) -> list[Entry]:
        out = []
        for folder in sorted(p for p in self.root.glob("*") if (p / RECIPE).is_file()):
            images = list(folder.glob("seed-*.png"))
            try:
                recipe = json.loads((folder / RECIPE).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                recipe = {}
            out.append(
                Entry(
                    folder.name,
                    folder,
                    recipe,
                    len(images),
                    sum(p.stat().st_size for p in images),
                    (folder / RECIPE).stat().st_mtime,
                )  # fmt: skip
            )
        return out

    def prune(
        self, *, keys: list[str] = (), older_than_days: float | None = None, everything: bool = False
    ) -> list[Entry]:
        """Delete the entries asked for (by key, by last use, or all); returns what was deleted."""
        entries = self.entries()
        unknown = sorted(set(keys) - {e.key for e in entries})
        if unknown:
            raise ClassStoreError(
                f"no store entry {', '.join(unknown)} in {self.root}; `dreambooth-kit class-images list` shows them"
            )
        cutoff = None if older_than_days is None else time.time() - older_than_days * 86400
        chosen = [
            e for e in entries if everything or e.key in keys or (cutoff is not None and e.last_used < cutoff)
        ]
        for e in chosen:
            # Renamed away first: a run copying from (or adding to) the entry meanwhile finds it gone
            # as a whole, never half deleted, and generates what it lacks.
            aside = e.folder.with_name(f".pruning-{e.key}-{os.getpid()}")
            try:
                os.rename(e.folder, aside)
            except FileNotFoundError:
                continue  # pruned by another command meanwhile
            shutil.rmtree(aside, ignore_errors=True)
        return chosen

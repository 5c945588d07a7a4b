"""Class images for prior preservation: seeded, batched, atomic, tracked by ``manifest.json``.

Class image i is generated with seed ``prior.seed + i`` and written as ``class-{i:05d}.png`` through a
temp file and a rename, so an interrupted run leaves no partial file and the rerun generates exactly
the missing indices. The manifest records how the images were made; a changed prompt, negative
prompt, model, prediction type, size or step count is detected instead of silently mixing two sets.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dreambooth_kit.data.batching import AUTO, AUTO_MAX, OutOfMemory
from dreambooth_kit.data.buckets import Size, bucket_folder_name, class_image_counts
from dreambooth_kit.data.class_store import ClassImageSpec
from dreambooth_kit.errors import UserError
from dreambooth_kit.models.source import ModelSource

log = logging.getLogger("dreambooth_kit")

MANIFEST = "manifest.json"


class ClassImageError(UserError, RuntimeError):
    """The class-image folder or its manifest is not usable as it is; the message says what to do."""


class ClassImagesInterrupted(KeyboardInterrupt):
    """Ctrl-C while class images were being generated. Every finished image is kept (no partial
    file is left) and a rerun generates only the missing ones. Still a KeyboardInterrupt, so code
    that stops on Ctrl-C keeps doing so; the CLI prints the message and exits 130 (128 + SIGINT)."""

    exit_code = 130

    def __init__(self, folder: Path, written: int, have: int, want: int):
        self.folder, self.written, self.have, self.want = folder, written, have, want
        super().__init__(
            f"interrupted while generating class images: {written} written this run, {have} of {want} "
            f"now in {folder}; run the same command again to generate the other {want - have}"
        )


@dataclass
class ClassImages:
    folder: Path
    images: list[Path]  # exactly the number asked for, sorted
    generated: int  # how many this call made
    reused: int  # already in the folder
    from_store: int = 0  # copied from the class-image store


def _recipe(spec: ClassImageSpec, source: ModelSource) -> dict[str, Any]:
    return {
        "base_model": source.pretrained,
        "model_source": source.location,
        "revision": source.revision,
        "variant": source.variant,
        # The same weights sampled as epsilon or as v give different images (a 768-v single file
        # read as epsilon draws noise): another prediction type is another recipe.
        "prediction_type": source.prediction_type,
        "prompt": spec.prompt,
        "negative_prompt": spec.negative_prompt,
        "sampler": spec.sampler,
        "steps": spec.steps,
        "guidance_scale": spec.guidance_scale,
        # a square side as before buckets, a bucket as "WxH": manifests and store entries of square
        # class images made before buckets existed keep matching
        "size": spec.size if isinstance(spec.size, int) else bucket_folder_name(spec.size),
        "seed": spec.seed,
    }


# revision/variant: another revision of a hub model is another model (a manifest without them, from
# before they were recorded, reads as None: the default revision and variant). sampler: a manifest
# from before it was recorded reads as None, the model's own scheduler, which is what drew them.
# prediction_type: a manifest from before it was recorded reads as None and counts as another recipe
# (nothing says which type drew them).
_RECIPE_KEYS_THAT_MATTER = (
    "base_model",
    "revision",
    "variant",
    "prediction_type",
    "prompt",
    "negative_prompt",
    "size",
    "sampler",
    "steps",
    "guidance_scale",
)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.exists():
        return None
    fix = (
        "delete it and rerun (the images are kept and the manifest is written again from the "
        "prior.* settings), or use another prior.class_dir"
    )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad JSON or not UTF-8
        raise ClassImageError(f"{path}: unreadable class-image manifest ({e}); {fix}") from None
    if not isinstance(data, dict):
        raise ClassImageError(
            f"{path}: not a class-image manifest (a JSON {type(data).__name__}, expected an object); {fix}"
        )
    return data


def _write_manifest(folder: Path, recipe: dict[str, Any], seeds: dict[str, int]) -> None:
    from dreambooth_kit.util.atomic import write_json

    write_json(folder / MANIFEST, {**recipe, "images": seeds}, indent=2, sort_keys=True)


def ensure_class_images(
    spec: ClassImageSpec,
    source: ModelSource,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = "auto",
    is_main_process: bool = True,
    shard: tuple[int, int] = (0, 1),
    sync: Callable[[], object] = lambda: None,
) -> ClassImages:
    """Make sure ``spec.folder`` (``prior.class_dir``) holds the class images ``spec`` asks for, made
    with the run's base model ``source`` (its revision and variant too).

    * More usable images than needed -> the first N in sorted order, nothing generated.
    * A manifest with another recipe -> an error naming the differing fields, unless
      ``prior.regenerate`` (then our ``class-*.png`` files are moved to ``replaced-<n>/``, never deleted).
    * Otherwise the missing ``class-{i:05d}.png`` indices are copied from the class-image store
      (``spec.store``: images of the same recipe and seed that an earlier run made), and only the
      rest generated; every image generated goes into the store.

    Several processes (``shard`` = (rank, number of processes), ``sync`` = a barrier such as
    ``accelerator.wait_for_everyone``) share the generation: every process calls this, the missing
    images are cut into batches of ``prior.sample_batch_size`` and process r generates batches r,
    r + n, ... Image i is still seed + i in the same batch as with one process, so the set is the
    same for any process count (bit for bit at equal threads per process). With "auto" the units are
    16 images (the largest auto batch) and each process sizes its batches from its own memory. The
    main process alone cleans up, checks the recipe and writes the manifest.
    """
    from dreambooth_kit.data.photos import find_images

    folder = Path(spec.folder)
    want = spec.count
    recipe = _recipe(spec, source)
    existing = _look(folder, recipe, regenerate=spec.regenerate, is_main_process=is_main_process, sync=sync)
    if len(existing) >= want:
        chosen = existing[:want]  # sorted: deterministic choice, e.g. 100 of 300
        log.info("class images: using %d of %d in %s (none generated)", want, len(existing), folder)
        return ClassImages(folder, chosen, generated=0, reused=len(chosen))

    missing, seeds = _missing_indices({f.name for f in existing}, want - len(existing), spec.seed)
    store = _Store.open(spec, source, recipe)
    if store and is_main_process:
        store.copy_into(folder, missing, spec.seed)
    sync()  # every process sees the copies before it takes its share of the rest
    copied = [i for i in missing if (folder / _name(i)).is_file()]
    missing = [i for i in missing if i not in set(copied)]
    mine = _my_share(missing, spec.batch_size, *shard)
    if mine:
        log.info(
            "class images: generating %d of %d missing (have %d, want %d) in %s",
            len(mine), len(missing), len(existing), want, folder,
        )  # fmt: skip
        _generate(spec, source, folder, mine, recipe if is_main_process else None, seeds,
                  len(existing) + len(copied), device=device, dtype=dtype, keep=store)  # fmt: skip
    sync()  # every process's share is written
    if is_main_process:
        _write_manifest(folder, recipe, seeds)
    final, _s, _i = find_images(folder)
    return ClassImages(folder, final[:want], len(missing), len(existing), from_store=len(copied))


def ensure_bucketed_class_images(
    spec: ClassImageSpec, source: ModelSource, photo_buckets: list[Size], **kwargs
) -> dict[Size, ClassImages]:
    """data.buckets: ``spec.count`` class images shared among the photos' buckets (one entry per
    photo in ``photo_buckets``) in proportion, each bucket's made at its size, since a batch holds one
    size and a row's class image trains beside its photo. The square bucket's are ``prior.class_dir``
    itself (square class images made without buckets are reused), the others in its ``WxH/``
    subfolders, each with its own manifest; image i of each is seed + i. ``kwargs``: as
    :func:`ensure_class_images`."""
    from dataclasses import replace

    square = (spec.size, spec.size) if isinstance(spec.size, int) else spec.size
    out = {}
    for bucket, count in class_image_counts(photo_buckets, spec.count).items():
        folder = spec.folder if bucket == square else Path(spec.folder) / bucket_folder_name(bucket)
        size = spec.size if bucket == square else bucket
        out[bucket] = ensure_class_images(
            replace(spec, folder=folder, count=count, size=size), source, **kwargs
        )
    return out


def _my_share(missing: list[int], batch_size: int | str, rank: int, n_proc: int) -> list[int]:
    """Process ``rank``'s indices: ``missing`` cut into units of ``batch_size`` (with "auto", of the
    largest auto batch, as each process sizes its own batches from its own memory), units r, r + n, ..."""
    unit = AUTO_MAX if batch_size == AUTO else int(batch_size)
    units = [missing[i : i + unit] for i in range(0, len(missing), unit)]
    return [i for batch in units[rank::n_proc] for i in batch]


def _name(i: int) -> str:
    return f"class-{i:05d}.png"


@dataclass
class _Store:
    """The class-image store (:mod:`dreambooth_kit.data.class_store`) as one run's generation uses it."""

    store: Any  # ClassStore
    recipe: dict[str, Any]  # the store's key: the run's recipe with the model by content
    used: bool = False  # this run has marked the entry as used (its last use, for prune --older-than)
    writable: bool = True  # False after a write failed (a read-only store): not tried again

    @classmethod
    def open(cls, spec: ClassImageSpec, source: ModelSource, recipe: dict[str, Any]) -> _Store | None:
        from dreambooth_kit.data.class_store import ClassStore, model_identity

        if spec.store is None:
            return None
        return cls(ClassStore(spec.store), {**recipe, "model": model_identity(source)})

    def copy_into(self, folder: Path, missing: list[int], base_seed: int) -> int:
        """Copy the stored images of ``missing`` indices into ``folder`` (through a temp file and a
        rename each); returns how many."""
        from dreambooth_kit.util.atomic import writing

        found = self.store.find(self.recipe, [base_seed + i for i in missing])
        copied = 0
        for i in missing:
            stored = found.get(base_seed + i)
            if stored is None:
                continue
            why = self.store.usable(self.recipe, base_seed + i, stored)
            if why is not None:  # never handed out: dropped, and generated by this run instead
                self._quietly(self.store.drop, stored, why)
                continue
            try:
                with writing(folder / _name(i)) as tmp:
                    shutil.copyfile(stored, tmp)
            except FileNotFoundError:  # pruned while this run copied: generated instead
                continue
            copied += 1
        if copied:
            self._quietly(self.store.touch, self.recipe)
            log.info(
                "class images: %d of %d missing copied from the store (%s)",
                copied, len(missing), self.store.folder(self.recipe),
            )  # fmt: skip
        return copied

    def __call__(self, index: int, seed: int, image: Path) -> None:
        self._quietly(self.store.put, self.recipe, seed, image)
        if not self.used:
            self._quietly(self.store.touch, self.recipe)
            self.used = True

    def _quietly(self, write, *args) -> None:
        """A store write that fails (read-only, full, pruned meanwhile) costs later runs the reuse,
        never this run: one warning, and no more writes to it."""
        if not self.writable:
            return
        try:
            write(*args)
        except OSError as e:
            self.writable = False
            log.warning(
                "class-image store %s: not written (%s: %s); this run goes on without keeping its "
                "class images there (prior.store=off turns the store off)",
                self.store.root, type(e).__name__, e.strerror or e,
            )  # fmt: skip


def _look(
    folder: Path, recipe: dict[str, Any], *, regenerate: bool, is_main_process: bool, sync
) -> list[Path]:
    """The images already in ``folder``. The main process first removes leftovers and checks (or
    with ``regenerate`` moves aside) an earlier recipe; every process lists the folder before any
    process writes to it."""
    from dreambooth_kit.data.photos import find_images

    if is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".tmp-*"):  # leftovers of a killed run: never a valid image
            stale.unlink()
        _check_recipe(folder, recipe, regenerate=regenerate)
    sync()
    if not is_main_process:
        _check_recipe(folder, recipe, regenerate=False)
    existing, _skipped, _issues = find_images(folder)
    sync()
    return existing


def _check_recipe(folder: Path, recipe: dict[str, Any], *, regenerate: bool) -> None:
    """A manifest with another recipe: an error naming the differing fields, or with ``regenerate``
    our images and the manifest moved to ``replaced-<n>/`` (never deleted)."""
    manifest = read_manifest(folder)
    if manifest is None:
        return
    changed = [k for k in _RECIPE_KEYS_THAT_MATTER if manifest.get(k) != recipe[k]]
    if not changed:
        return
    detail = ", ".join(f"{k}: {manifest.get(k)!r} -> {recipe[k]!r}" for k in changed)
    if not regenerate:
        raise ClassImageError(
            f"{folder}: class images were made with a different recipe ({detail}). Mixing them "
            "would train the prior on two classes. Set prior.regenerate=true to regenerate "
            "(the old images are moved aside, not deleted), or use another prior.class_dir"
            + (
                f"; or keep these with prior.sampler={_yaml(manifest.get('sampler'))} and "
                f"prior.sample_steps={manifest.get('steps')}, the recipe they were made with."
                if set(changed) <= {"sampler", "steps"}
                else "."
            )
        )
    log.warning("class images in %s: recipe changed (%s); regenerating", folder, detail)
    n = 1
    while (folder / f"replaced-{n}").exists():
        n += 1
    aside = folder / f"replaced-{n}"
    aside.mkdir()
    for f in sorted(folder.glob("class-*.png")) + [folder / MANIFEST]:
        f.rename(aside / f.name)


def _yaml(value) -> str:
    return "null" if value is None else str(value)


def _missing_indices(have: set[str], n_missing: int, base_seed: int) -> tuple[list[int], dict[str, int]]:
    """The first ``n_missing`` indices i whose ``class-{i:05d}.png`` is not there (foreign images
    the user put there count; our indices fill the gap), and the seed of every index up to them."""
    missing: list[int] = []
    i = 0
    while len(missing) < n_missing:
        if f"class-{i:05d}.png" not in have:
            missing.append(i)
        i += 1
    return missing, {f"class-{k:05d}.png": base_seed + k for k in range(i)}


def _generate(
    spec, source, folder: Path, missing, recipe, seeds, n_existing: int, *, device, dtype, keep=None
) -> None:
    """Generate the ``missing`` indices in batches; the manifest is written after every batch (a kill
    loses one batch; ``recipe`` None: not by this process) and a Ctrl-C leaves every finished image
    and no partial file. ``keep(index, seed, path)``, if given, gets every image written (the store)."""
    from dreambooth_kit.inference.generate import generate
    from dreambooth_kit.inference.pipeline import load_pipeline
    from dreambooth_kit.inference.pngmeta import save_png

    # already resolved (single files too); sampler None keeps the model's own scheduler
    pipe = load_pipeline(source, device=device, dtype=dtype, scheduler=spec.sampler)
    written = 0
    width, height = (spec.size, spec.size) if isinstance(spec.size, int) else spec.size

    def save(batch) -> None:  # each batch as soon as it is made: a kill loses at most one batch
        nonlocal written
        for made in batch:
            j = made.params.seed - spec.seed  # image j has seed spec.seed + j
            save_png(made.image, made.params, folder / _name(j))
            written += 1
            if keep is not None:
                keep(j, spec.seed + j, folder / _name(j))
        if recipe is not None:
            _write_manifest(folder, recipe, seeds)

    try:
        generate(
            pipe,
            spec.prompt,
            negative_prompt=spec.negative_prompt,
            seeds=[spec.seed + j for j in missing],
            steps=spec.steps,
            guidance_scale=spec.guidance_scale,
            height=height,
            width=width,
            batch_size=spec.batch_size,
            on_batch=save,
            progress="class images" if recipe is not None else None,  # one bar: the main process's
        )
    except OutOfMemory as e:  # generate() names its own arguments; a run's user needs the settings
        if recipe is not None:
            _write_manifest(folder, recipe, seeds)
        raise ClassImageError(
            f"class images for {folder}: {e.what}. The {written} made are kept. Lower "
            f"data.resolution (class images are made at the training size, {width}x{height} px), or set "
            "prior.mode=teacher (no class images), or put class images made elsewhere in prior.class_dir"
        ) from None
    except KeyboardInterrupt:
        # save_png writes through .tmp-<name> and a rename: a Ctrl-C mid-write leaves only that.
        for partial in folder.glob(".tmp-*"):
            partial.unlink(missing_ok=True)
        if recipe is not None:
            _write_manifest(folder, recipe, seeds)
        raise ClassImagesInterrupted(folder.resolve(), written, n_existing + written, spec.count) from None
    finally:
        del pipe
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

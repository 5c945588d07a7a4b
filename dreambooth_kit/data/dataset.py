"""Checked photos into training batches: rows of instance and class images, the tensors, the
sampler that orders epochs reproducibly, and the collate function."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreambooth_kit.data.photos import DataError, load_image, read_caption, to_rgb


def preprocess(
    img: Image.Image,
    size: int | tuple[int, int],
    *,
    center_crop: bool = True,
    flip: bool = False,
    crop_offset: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Resize to cover ``size`` (a square side, or (width, height): a bucket), crop the rest, optional
    mirror -> float CHW tensor in [-1, 1].

    crop_offset = (fx, fy) in [0, 1] places the crop within the slack (0.5, 0.5 = centre); without it a
    non-centre crop draws the offset from torch's global RNG."""
    if img.mode != "RGB":
        img = to_rgb(img)[0]  # never a bare convert("RGB"): see to_rgb
    if crop_offset is None:
        crop_offset = (0.5, 0.5) if center_crop else (float(torch.rand(())), float(torch.rand(())))
    fx, fy = float(crop_offset[0]), float(crop_offset[1])  # float: int.is_integer() needs Python 3.12
    if not (0.0 <= fx <= 1.0 and 0.0 <= fy <= 1.0):
        raise ValueError(f"crop_offset must be within [0, 1], got {crop_offset}")
    tw, th = (size, size) if isinstance(size, int) else size
    w, h = img.size
    # The largest box of the target's aspect ratio: the full width or the full height. Integer
    # products before the one division keep a square crop's side exact (it is min(w, h)).
    bw, bh = (w, w * th / tw) if w * th <= h * tw else (h * tw / th, h)
    left, top = fx * (w - bw), fy * (h - bh)
    box = (left, top, left + bw, top + bh)
    if (bw, bh) == (tw, th) and left.is_integer() and top.is_integer():
        out = img.crop(tuple(int(v) for v in box))  # already the right size: no resampling blur
    else:
        # Resampling just the crop box = "resize to cover, then crop", in one pass over fewer pixels.
        resample = Image.Resampling.LANCZOS if bw > tw else Image.Resampling.BICUBIC
        out = img.resize((tw, th), resample, box=box)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.array(out, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only arrays
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous().float().div_(127.5).sub_(1.0)


@dataclass
class Example:
    """One training row: an instance image with its prompt, and (prior preservation) a class image,
    or (prior.mode=teacher) the class prompt the frozen base model is asked about on this photo."""

    instance: Path
    instance_prompt: str
    class_image: Path | None = None
    class_prompt: str | None = None
    teacher_prompt: str | None = None
    # The subject's instance prompt when instance_prompt is the photo's caption: what a dropped
    # caption (data.caption_dropout) trains with.
    bare_prompt: str | None = None
    # data.buckets: the row's (width, height), its photo's bucket; the class image is cropped to it
    # too. None: the dataset's square size.
    size: tuple[int, int] | None = None


def pair_examples(
    instance_images: list[Path],
    instance_prompt: str,
    class_images: list[Path] | None = None,
    class_prompt: str | None = None,
    *,
    use_captions: bool = False,
    teacher_prompt: str | None = None,
) -> list[Example]:
    """One subject's rows. As diffusers' example: the count is max(instances, class images), so one
    epoch covers every class image and instance images repeat (5 photos vs 200 class images).
    ``teacher_prompt``: every row also carries the class prompt for the teacher prior."""
    if not instance_images:
        raise DataError("no instance images given; run check_images(folder) and pass report.images")
    if class_images is not None and not class_images:
        raise DataError("class_images is empty; generate class images first or pass None")
    if class_images and not class_prompt:
        raise DataError("class_images given without a class_prompt")
    n = max(len(instance_images), len(class_images or []))
    rows = []
    for i in range(n):
        inst = Path(instance_images[i % len(instance_images)])
        caption = read_caption(inst) if use_captions else None
        cls = Path(class_images[i % len(class_images)]) if class_images else None
        rows.append(
            Example(
                inst,
                caption or instance_prompt,
                cls,
                class_prompt if cls else None,
                teacher_prompt,
                bare_prompt=instance_prompt if caption else None,
            )
        )
    return rows


def pair_bucketed(
    photo_buckets: dict[Path, tuple[int, int]],
    instance_prompt: str,
    class_images: dict[tuple[int, int], list[Path]] | None = None,
    class_prompt: str | None = None,
    **kwargs,
) -> list[Example]:
    """data.buckets: one subject's rows, bucket by bucket, each photo's with a class image of its own
    bucket (a row's two images train in one batch, so they need one size): :func:`pair_examples`
    within each bucket, so one epoch still covers every class image. ``kwargs``: as there."""
    rows = []
    for bucket in sorted(set(photo_buckets.values())):
        photos = [p for p, b in photo_buckets.items() if b == bucket]
        cls = class_images[bucket] if class_images is not None else None
        for e in pair_examples(photos, instance_prompt, cls, class_prompt if cls else None, **kwargs):
            e.size = bucket
            rows.append(e)
    return rows


def augmentation(seed: int, epoch: int, index: int, slot: int, *, center_crop: bool, random_flip: bool):
    """The crop offset (None: centre) and flip of one image: a pure function of (seed, epoch, row
    index, slot: 0 the instance image, 1 the class image), like the sampler's order.

    Not torch's global RNG: accelerate's loader fetches one batch ahead, so a checkpoint's saved
    RNG state already held the next batch's draws and a resumed run flipped and cropped other
    images than the uninterrupted one. Here a resumed run draws exactly what it would have."""
    rng = np.random.default_rng([seed, epoch, index, slot])
    offset = None if center_crop else (float(rng.random()), float(rng.random()))
    flip = random_flip and bool(rng.random() < 0.5)
    return offset, flip


def caption_dropped(seed: int, epoch: int, index: int, p: float) -> bool:
    """Whether row ``index`` of ``epoch`` trains with the bare instance prompt instead of its caption
    (data.caption_dropout = ``p``): a pure function, for the reason :func:`augmentation` gives, and
    its own stream (slot 2), so turning it on changes no crop or flip."""
    return p > 0 and bool(np.random.default_rng([seed, epoch, index, 2]).random() < p)


class DreamBoothDataset(torch.utils.data.Dataset):
    """Rows of instance (+ class) images, decoded lazily per item.

    Items are asked for as ``(epoch, index)`` (what :class:`EpochSampler` yields), or a bare index
    (epoch 0): crops and flips come from :func:`augmentation` of (``seed``, epoch, index).
    With ``latents=True`` items carry ``(path, flip)`` keys instead of pixels, for a latent cache;
    the flip is the same either way, so cached and uncached runs see the same data.
    """

    def __init__(
        self,
        instance_images: list[Path],
        instance_prompt: str,
        size: int,
        *,
        class_images: list[Path] | None = None,
        class_prompt: str | None = None,
        center_crop: bool = True,
        random_flip: bool = False,
        seed: int = 0,
    ) -> None:
        examples = pair_examples(instance_images, instance_prompt, class_images, class_prompt)
        self._init(examples, size, center_crop=center_crop, random_flip=random_flip, latents=False, seed=seed)

    @classmethod
    def from_examples(
        cls,
        examples: list[Example],
        size: int,
        *,
        center_crop: bool = True,
        random_flip: bool = False,
        latents: bool = False,
        seed: int = 0,
        caption_dropout: float = 0.0,
        masks: str | None = None,
        unmasked_weight: float = 0.1,
    ) -> DreamBoothDataset:
        if not examples:
            raise DataError("no training rows; every concept needs at least one usable image")
        if len({e.class_image is None for e in examples}) > 1:
            raise DataError("either every concept has class images (prior preservation) or none has")
        self = cls.__new__(cls)
        self._init(
            examples, size, center_crop=center_crop, random_flip=random_flip, latents=latents, seed=seed
        )
        self.caption_dropout = caption_dropout
        self.masks, self.unmasked_weight = masks, unmasked_weight
        return self

    def _init(self, examples, size, *, center_crop, random_flip, latents, seed) -> None:
        if latents and not center_crop:
            raise DataError("latent caching needs center crops: a random crop changes pixels every epoch")
        self.examples = examples
        self.size = size
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.latents = latents
        self.seed = seed
        self.caption_dropout = 0.0
        self.masks, self.unmasked_weight = None, 1.0
        self.instance_images = [e.instance for e in examples]
        self.class_images = [e.class_image for e in examples if e.class_image is not None]

    def __len__(self) -> int:
        return len(self.examples)

    def row_size(self, index: int) -> int | tuple[int, int]:
        """What row ``index``'s images are cropped to: its bucket, else the square size."""
        return self.examples[index].size or self.size

    def image_sizes(self) -> dict[str, int | tuple[int, int]]:
        """Every image's training size by path, for the latent cache. An image is in one bucket
        only: a photo's is its aspect ratio's, and each bucket has its own class-image folder."""
        sizes: dict[str, int | tuple[int, int]] = {}
        for i, e in enumerate(self.examples):
            for path in (e.instance, e.class_image):
                if path is not None and sizes.setdefault(str(path), self.row_size(i)) != self.row_size(i):
                    raise RuntimeError(  # buckets.py never does this: a bug, not a user's mistake
                        f"{path} is in rows of two sizes, {sizes[str(path)]} and {self.row_size(i)}; "
                        "please report it"
                    )
        return sizes

    def _item(self, path: Path, epoch: int, index: int, slot: int):
        offset, flip = augmentation(
            self.seed, epoch, index, slot, center_crop=self.center_crop, random_flip=self.random_flip
        )
        if self.latents:
            return (str(path), flip)
        return preprocess(load_image(path), self.row_size(index), flip=flip, crop_offset=offset or (0.5, 0.5))

    def _weights(self, photo: Path, epoch: int, index: int) -> torch.Tensor:
        from dreambooth_kit.data.masks import load_mask, loss_weights

        offset, flip = augmentation(
            self.seed, epoch, index, 0, center_crop=self.center_crop, random_flip=self.random_flip
        )
        return loss_weights(
            load_mask(photo, self.masks), self.row_size(index), preprocess,
            unmasked_weight=self.unmasked_weight, flip=flip, crop_offset=offset or (0.5, 0.5),
        )  # fmt: skip

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        if not 0 <= index < len(self.examples):
            raise IndexError(index)
        e = self.examples[index]
        kind = "key" if self.latents else "pixels"
        dropped = e.bare_prompt is not None and caption_dropped(self.seed, epoch, index, self.caption_dropout)
        example: dict = {
            f"instance_{kind}": self._item(e.instance, epoch, index, 0),
            "instance_prompt": e.bare_prompt if dropped else e.instance_prompt,
        }
        if self.masks:  # data.masks: the photo's loss weights, cropped and flipped as the photo
            example["instance_weights"] = self._weights(e.instance, epoch, index)
        if e.class_image is not None:
            example[f"class_{kind}"] = self._item(e.class_image, epoch, index, 1)
            example["class_prompt"] = e.class_prompt
        if e.teacher_prompt is not None:
            example["teacher_prompt"] = e.teacher_prompt
        return example


def filled(order: list[int], length: int) -> list[int]:
    """``order`` repeated from its start up to ``length`` rows: an epoch (or a bucket) filled to whole
    batches of every process with its own first rows, the same whether or not the run resumed."""
    return order + [order[i % len(order)] for i in range(length - len(order))]


class EpochSampler(torch.utils.data.Sampler):
    """A shuffled order per epoch from (seed, epoch) alone, startable mid-epoch.

    A resumed run must see exactly the batches an uninterrupted run would. torch's RandomSampler
    draws its permutation from the global RNG when an epoch starts, which a resume cannot replay;
    here the order is a pure function of (seed, epoch), and ``set_position`` skips the rows already
    trained on without decoding them. It yields ``(epoch, index)``: the dataset draws each row's
    crop and flip from them (see :func:`augmentation`).
    """

    def __init__(self, n: int, seed: int, multiple: int = 1, *, batch: int = 1) -> None:
        self.n, self.seed, self.epoch, self.start = n, seed, 0, 0
        self.batch = batch  # rows per batch of all processes together (resume_at counts those)
        # Several processes: each epoch is filled up to a multiple of processes x batch with its own
        # first rows, as accelerate would fill the last batches, but here, so that a resumed epoch
        # is filled with the same rows as the uninterrupted one (accelerate fills from wherever the
        # resumed iteration starts).
        self.length = -(-n // multiple) * multiple if n else 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, min(start, self.length)

    def resume_at(self, epoch: int, batches: int) -> None:
        """Start at ``epoch`` after the ``batches`` it has trained on (batches of all processes)."""
        self.set_position(epoch, batches * self.batch)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = filled(torch.randperm(self.n, generator=g).tolist(), self.length)
        return iter([(self.epoch, i) for i in order[self.start :]])

    def __len__(self) -> int:
        return self.length - self.start


class BucketBatchSampler(torch.utils.data.Sampler):
    """data.buckets: batches of row indices that all share one size, in an order that is a pure
    function of (seed, epoch), startable at any batch (see :class:`EpochSampler` for why).

    Per epoch: the rows in a shuffled order, grouped by size, cut into batches, and the batches
    shuffled, so every bucket's rows come up through the epoch instead of one bucket after another.
    Several processes (``world``): each bucket is filled up to whole batches of every process with its
    own first rows, and a batch of all processes is ``world`` consecutive batches of one bucket, so
    the processes of one step train on one size with equal rows (accelerate's sharded loader hands
    process r batches r, r + world, ...). One process: a bucket's last batch may be smaller."""

    def __init__(self, sizes: list, batch_size: int, seed: int, world: int = 1) -> None:
        self.sizes, self.batch_size, self.seed, self.world = list(sizes), batch_size, seed, world
        self.epoch, self.skip = 0, 0

    def resume_at(self, epoch: int, batches: int) -> None:
        """Start at ``epoch`` after the ``batches`` it has trained on (batches of all processes)."""
        self.epoch, self.skip = epoch, batches * self.world

    def batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        """Every batch of ``epoch`` (one process's share each), as ``(epoch, row)`` items."""
        g = torch.Generator().manual_seed(self.seed + epoch)
        groups: dict = {}
        for i in torch.randperm(len(self.sizes), generator=g).tolist():
            groups.setdefault(self.sizes[i], []).append(i)
        per = self.batch_size * self.world
        steps = []
        for rows in groups.values():
            if self.world > 1:  # whole batches of every process, filled with the bucket's first rows
                rows = filled(rows, -(-len(rows) // per) * per)
            steps += [rows[i : i + per] for i in range(0, len(rows), per)]
        order = torch.randperm(len(steps), generator=g).tolist()
        return [
            [(epoch, i) for i in steps[k][j : j + self.batch_size]]
            for k in order
            for j in range(0, len(steps[k]), self.batch_size)
        ]

    def __iter__(self):
        return iter(self.batches(self.epoch)[self.skip :])

    def __len__(self) -> int:
        return max(0, len(self.batches(self.epoch)) - self.skip)


def collate(examples: list[dict], with_prior: bool) -> dict:
    """Instance rows first, then class rows, so the loss can split the batch at `num_instance`.

    Pixel items give ``pixel_values``; latent-cache items give ``keys`` ((path, flip) pairs)."""
    kind = "key" if "instance_key" in examples[0] else "pixels"
    items = [e[f"instance_{kind}"] for e in examples]
    prompts = [e["instance_prompt"] for e in examples]
    if with_prior:
        if any(f"class_{kind}" not in e for e in examples):
            raise DataError("with_prior=True but the dataset has no class images")
        items += [e[f"class_{kind}"] for e in examples]
        prompts += [e["class_prompt"] for e in examples]
    batch: dict = {"prompts": prompts, "num_instance": len(examples)}
    if "instance_weights" in examples[0]:  # data.masks
        batch["instance_weights"] = torch.stack([e["instance_weights"] for e in examples])
    if "teacher_prompt" in examples[0]:  # prior.mode=teacher: asked on the instance rows' latents
        batch["teacher_prompts"] = [e["teacher_prompt"] for e in examples]
    if kind == "key":
        batch["keys"] = items
    else:
        batch["pixel_values"] = torch.stack(items).to(memory_format=torch.contiguous_format).float()
    return batch

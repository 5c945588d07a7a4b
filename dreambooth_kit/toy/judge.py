"""The toy world's judge: a small CNN that reads class, colour and background off an image and tells
the ``zwx`` subject from the world's objects. Its penultimate features stand in for DINO/CLIP image
embeddings in :mod:`dreambooth_kit.evaluation.metrics`.

It is trained only on rendered images (fresh renders drawn on the fly, never a model's samples), so
it measures a generator without having learned that generator's mistakes. It sees every
(class, colour, background) combination, the held-out ones included: those are held out from the
generator's pretraining, and the judge is the measuring instrument, so it must read them right.

Labels: :meth:`Judge.predict` returns names (``"ball"``, ``"red"``, ``"sand"``), the words a prompt
uses, so a prediction compares with what the prompt asked without an index table. The subject is a
ball (class ``ball``); its colour has no name in the world, so the colour head is not trained on it
and its colour prediction means nothing.

Run ``python -m dreambooth_kit.toy.judge OUT_DIR`` to train one (~3 min on 2 CPU cores); the
shipped weights live in ``dreambooth_kit/toy/weights`` with a JSON record of how they were made.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import time
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save_file
from torch import nn

from dreambooth_kit.errors import InvalidInput, UserError
from dreambooth_kit.toy import world
from dreambooth_kit.util.atomic import write_json, writing

FORMAT = "dreambooth_kit.toy.judge/1"
WEIGHTS = "judge.safetensors"
RECORD = "judge.json"
HEADS = ("class", "colour", "background")
DEFAULT_STEPS = 1500
DEFAULT_BATCH = 128
EVAL_SIZE = 2000
# Augmentation, so the judge tolerates a generator's softness and grain: at most 0.05 (on a 0-1
# scale) of gaussian noise, about the residual grain of a few-step sampler, and a 3x3 box blur on
# half the images, about the softening of a 4x VAE at 32 px.
_NOISE_MAX = 0.05
_BLUR_P = 0.5
# Batch make-up: 1 in 6 is the subject, 1 in 6 is a world ball (any colour): the hard negatives that
# make the detector key on the two-tone pattern, not on roundness.
_SUBJECT_P = 1 / 6
_BALL_P = 1 / 6


class JudgeError(UserError):
    """The judge's weights are missing or are not a judge's."""


class _Net(nn.Module):
    """Conv 3->32->64->64->64 (strides 2, 2, 2, 1) -> global average pool -> a ``dim``-d embedding
    -> linear heads; ~100 k parameters. Striding from the first layer: forward and backward on 128
    images cost 12 ms instead of 68 ms with a full-resolution first layer (2 CPU cores), and a 3x3 kernel
    at stride 2 still sees every pixel, so the subject's 2-3 px white band is not skipped. Global
    pooling because the object moves around the frame; the receptive field is 31 px, the size of
    the largest object."""

    def __init__(
        self, channels: Sequence[int] = (32, 64, 64, 64), strides: Sequence[int] = (2, 2, 2, 1), dim: int = 64
    ):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c, stride in zip(channels, strides, strict=True):
            layers += [nn.Conv2d(c_in, c, 3, stride=stride, padding=1, bias=False)]
            layers += [nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            c_in = c
        self.trunk = nn.Sequential(*layers)
        # No ReLU on the embedding: cosines between features then use the whole [-1, 1] range
        # instead of crowding near 1, as post-ReLU features do.
        self.embed = nn.Linear(c_in, dim)
        self.cls = nn.Linear(dim, len(world.CLASSES))
        self.colour = nn.Linear(dim, len(world.COLOURS))
        self.background = nn.Linear(dim, len(world.BACKGROUNDS))
        self.subject = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z = self.embed(self.trunk(x).mean(dim=(2, 3)))
        return z, {
            "class": self.cls(z),
            "colour": self.colour(z),
            "background": self.background(z),
            "subject": self.subject(z).squeeze(1),
        }


def _to_batch(images) -> torch.Tensor:
    """PIL images (any size, resized to the world's 32 px with bilinear) or a uint8 array of shape
    (N, H, W, 3) -> a float tensor (N, 3, 32, 32) in [-1, 1]."""
    res = world.RESOLUTION
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise InvalidInput(
                f"judge images: got an array of dtype {images.dtype} and shape {images.shape}; "
                "pass uint8 (N, H, W, 3) or a list of PIL images"
            )
        if images.shape[1:3] != (res, res):
            images = [Image.fromarray(a) for a in images]
    if not isinstance(images, np.ndarray):
        arrays = []
        for i, img in enumerate(images):
            if not isinstance(img, Image.Image):
                raise InvalidInput(
                    f"judge images: item {i} is a {type(img).__name__}; pass PIL images or a uint8 array"
                )
            img = img.convert("RGB")
            if img.size != (res, res):
                img = img.resize((res, res), Image.BILINEAR)
            arrays.append(np.asarray(img))
        if not arrays:
            raise InvalidInput("judge images: the list is empty; pass at least one image")
        images = np.stack(arrays)
    # A copy: the caller's array may be read-only (np.asarray of a PIL image), and torch warns on those.
    x = torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


class Judge:
    """A trained judge. :meth:`load` it, then :meth:`predict` or :meth:`features`."""

    def __init__(self, net: _Net, record: dict):
        self.net = net.eval()
        self.record = record

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> Judge:
        """``path``: a folder holding judge.safetensors and judge.json, or a .safetensors file with
        its .json record beside it (same name); None loads the weights shipped with the package."""
        if path is None:
            folder = resources.files("dreambooth_kit.toy").joinpath("weights")
            where = "the shipped judge (dreambooth_kit/toy/weights)"
            w, r = folder.joinpath(WEIGHTS), folder.joinpath(RECORD)
        elif Path(path).suffix == ".safetensors":
            w, r = Path(path), Path(path).with_suffix(".json")
            where = str(w.parent)
        else:
            w, r = Path(path) / WEIGHTS, Path(path) / RECORD
            where = str(path)
        for f in (w, r):
            if not f.is_file():
                raise JudgeError(
                    f"{where}: {f.name} is missing; train a judge with "
                    "`python -m dreambooth_kit.toy.judge OUT_DIR` and load OUT_DIR"
                )
        try:
            record = json.loads(r.read_text())
            state = load_safetensors(w.read_bytes())
        except (ValueError, OSError, SafetensorError) as e:  # a truncated or foreign file
            raise JudgeError(f"{where}: cannot read the judge ({e}); train it again") from None
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        if found != FORMAT:
            raise JudgeError(f"{r}: not a judge record (format {found!r}, expected {FORMAT!r})")
        cfg = record["config"]
        labels = {"classes": list(world.CLASSES), "colours": list(world.COLOURS)}
        labels["backgrounds"] = list(world.BACKGROUNDS)
        for key, names in labels.items():
            if cfg[key] != names:
                raise JudgeError(
                    f"{r}: the judge was trained for {key} {cfg[key]}, the world has {names}; "
                    "train it again for this world"
                )
        net = _Net(cfg["channels"], cfg["strides"], cfg["dim"])
        net.load_state_dict(state)
        return cls(net, record)

    @torch.no_grad()
    def _run(self, images) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = _to_batch(images)
        outs = [self.net(chunk) for chunk in x.split(512)]
        z = torch.cat([o[0] for o in outs])
        return z, {k: torch.cat([o[1][k] for o in outs]) for k in outs[0][1]}

    def predict(self, images) -> dict[str, np.ndarray]:
        """``class``, ``colour``, ``background``: arrays of names (``"ball"``, ``"red"``, ``"sand"``);
        ``subject_prob``: float array, the probability that the image shows the ``zwx`` subject.
        For the subject, ``class`` is ``"ball"`` and ``colour`` is meaningless."""
        _, logits = self._run(images)
        names = {"class": world.CLASSES, "colour": list(world.COLOURS), "background": list(world.BACKGROUNDS)}
        out = {k: np.array(names[k])[logits[k].argmax(1).numpy()] for k in HEADS}
        out["subject_prob"] = torch.sigmoid(logits["subject"]).numpy()
        return out

    def features(self, images) -> torch.Tensor:
        """(N, D) L2-normalised penultimate features: the toy's DINO/CLIP image embedding."""
        z, _ = self._run(images)
        return F.normalize(z, dim=1)


def _draw(rng: random.Random, n: int, held_out: bool | None = None):
    """``n`` fresh renders in the training mix, with their labels; ``held_out`` picks combinations
    as :func:`world.random_scene` does (None: any)."""
    images, labels = [], []
    for _ in range(n):
        u = rng.random()
        if u < _SUBJECT_P:
            scene = world.random_scene(rng, subject=True)
        elif u < _SUBJECT_P + _BALL_P:
            scene = world.random_scene(rng, cls="ball", held_out=held_out)
        else:
            scene = world.random_scene(rng, held_out=held_out)
        images.append(np.asarray(world.render(scene, seed=rng.randrange(2**31))))
        labels.append(scene)
    return np.stack(images), labels


def _targets(scenes: Sequence[world.Scene]) -> dict[str, torch.Tensor]:
    colours, backgrounds = list(world.COLOURS), list(world.BACKGROUNDS)
    return {
        "class": torch.tensor([world.CLASSES.index(s.cls) for s in scenes]),
        # -100: cross_entropy's ignore_index; the subject's colours have no name in the world.
        "colour": torch.tensor([-100 if s.subject else colours.index(s.colour) for s in scenes]),
        "background": torch.tensor([backgrounds.index(s.background) for s in scenes]),
        "subject": torch.tensor([float(s.subject) for s in scenes]),
    }


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    pick = (torch.rand(n, 1, 1, 1, generator=gen) < _BLUR_P).float()
    x = pick * blurred + (1 - pick) * x
    sigma = torch.rand(n, 1, 1, 1, generator=gen) * _NOISE_MAX * 2  # x2: the tensor spans [-1, 1]
    return x + sigma * torch.randn(x.shape, generator=gen)


def _loss(logits: dict[str, torch.Tensor], t: dict[str, torch.Tensor]) -> torch.Tensor:
    return (
        F.cross_entropy(logits["class"], t["class"])
        + F.cross_entropy(logits["colour"], t["colour"], ignore_index=-100)
        + F.cross_entropy(logits["background"], t["background"])
        + F.binary_cross_entropy_with_logits(logits["subject"], t["subject"])
    )


def evaluate(judge: Judge, n: int = EVAL_SIZE, seed: int = 10_007) -> dict:
    """Accuracy per head on ``n`` fresh clean renders: 35% seen and 35% held-out combinations,
    15% the subject, 15% world balls of every colour (the detector's hard negatives). ``class`` and
    ``background`` count every image (the subject is a ball), ``colour`` the world's objects,
    ``subject`` every image, ``subject_vs_balls`` the subject and the balls only."""
    rng = random.Random(seed)
    k = round(n * 0.35)
    m = (n - 2 * k) // 2
    scenes = [world.random_scene(rng, held_out=False) for _ in range(k)]
    scenes += [world.random_scene(rng, held_out=True) for _ in range(k)]
    scenes += [world.random_scene(rng, subject=True) for _ in range(m)]
    scenes += [world.random_scene(rng, cls="ball", held_out=None) for _ in range(n - 2 * k - m)]
    images = np.stack([np.asarray(world.render(s, seed=rng.randrange(2**31))) for s in scenes])
    p = judge.predict(images)
    is_subject = np.array([s.subject for s in scenes])
    said_subject = p["subject_prob"] > 0.5

    def acc(head: str, idx: np.ndarray) -> float:
        truth = np.array([getattr(s, "cls" if head == "class" else head) for s in scenes])
        return float((p[head][idx] == truth[idx]).mean())

    everything = np.arange(len(scenes))
    objects = np.flatnonzero(~is_subject)
    held = np.arange(k, 2 * k)
    balls_and_subject = np.arange(2 * k, len(scenes))
    return {
        "n": len(scenes),
        "class": acc("class", everything),
        "colour": acc("colour", objects),
        "background": acc("background", everything),
        "subject": float((said_subject == is_subject).mean()),
        "subject_vs_balls": float((said_subject == is_subject)[balls_and_subject].mean()),
        "held_out_combinations": {h: acc(h, held) for h in HEADS},
    }


def train_judge(
    out_dir: str | os.PathLike,
    *,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    batch_size: int = DEFAULT_BATCH,
    eval_size: int = EVAL_SIZE,
    threads: int | None = None,
    lens: Callable[[torch.Tensor], torch.Tensor] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Train a judge on fresh renders and write ``out_dir``/judge.safetensors and judge.json (its
    config, accuracy per head on ``eval_size`` fresh renders, steps and wall time). Deterministic
    for a seed and thread count on one machine. ``threads``: torch's CPU threads while training
    (restored after); None keeps the current setting. ``lens``: the model's VAE round trip
    (encode, decode; tensors in [-1, 1]), applied to half of every batch: every image a generator
    makes passes through its VAE's decoder, whose softening and colour bleeding a judge trained on
    crisp renders alone does not survive (it recognised the subject in 40% of VAE round trips of the
    subject's renders, and in none of a tuned model's samples). Still renders, never samples.
    Returns ``out_dir``."""
    if threads is None:
        return _train(Path(out_dir), seed, steps, batch_size, eval_size, log, lens)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train(Path(out_dir), seed, steps, batch_size, eval_size, log, lens)
    finally:
        torch.set_num_threads(before)


def _fit(net, steps: int, batch_size: int, rng, gen, log, lens) -> float:
    """AdamW on fresh renders (half through ``lens``, the VAE round trip, when given); returns seconds."""
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    # Cosine decay to 0: the last few hundred steps at a small rate settle the hard pairs (orange vs.
    # yellow, purple vs. blue) that a constant rate keeps flipping.
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    start = time.perf_counter()
    net.train()
    running = 0.0
    for step in range(1, steps + 1):
        images, scenes = _draw(rng, batch_size)
        x = _to_batch(images)
        if lens is not None:
            half = batch_size // 2
            with torch.no_grad():
                x = torch.cat([lens(x[:half]).clamp(-1, 1), x[half:]])
        x = _augment(x, gen)
        _, logits = net(x)
        loss = _loss(logits, _targets(scenes))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running = loss.item() if step == 1 else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == steps:
            log(f"judge: step {step}/{steps} loss {running:.4f} ({time.perf_counter() - start:.0f} s)")
    return time.perf_counter() - start


def _record(channels, strides, dim, n_params, seed, steps, batch_size, lens: bool) -> dict:
    """How the judge was made (written beside its weights)."""
    return {
        "format": FORMAT,
        "config": {
            "channels": list(channels),
            "strides": list(strides),
            "dim": dim,
            "resolution": world.RESOLUTION,
            "classes": list(world.CLASSES),
            "colours": list(world.COLOURS),
            "backgrounds": list(world.BACKGROUNDS),
        },
        "parameters": n_params,
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "augmentation": {
            "noise_sigma_max": _NOISE_MAX,
            "box_blur_3x3_p": _BLUR_P,
            "vae_round_trip_p": 0.5 if lens else 0.0,
        },
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
    }


def _train(out: Path, seed: int, steps: int, batch_size: int, eval_size: int, log, lens=None) -> Path:
    if steps < 1 or batch_size < 1 or eval_size < 4:
        raise InvalidInput(
            f"train_judge: steps={steps}, batch_size={batch_size}, eval_size={eval_size}; "
            "steps and batch_size must be >= 1 and eval_size >= 4"
        )
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    channels, strides, dim = (32, 64, 64, 64), (2, 2, 2, 1), 64
    net = _Net(channels, strides, dim)
    n_params = sum(p.numel() for p in net.parameters())
    log(f"judge: {n_params:,} parameters, {steps} steps of {batch_size} fresh renders (seed {seed})")
    train_seconds = _fit(net, steps, batch_size, rng, gen, log, lens)
    judge = Judge(net, {})
    # Seeds apart from training's: the evaluation renders are ones the judge has never seen.
    accuracy = evaluate(judge, eval_size, seed=seed + 10_007)
    log(
        "judge: held-out accuracy "
        + ", ".join(f"{h} {accuracy[h]:.2%}" for h in (*HEADS, "subject", "subject_vs_balls"))
    )
    record = {
        **_record(channels, strides, dim, n_params, seed, steps, batch_size, lens is not None),
        "train_seconds": round(train_seconds, 1),
        "accuracy": accuracy,
    }
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    # Written beside and renamed: a stop mid-write never leaves a half file under the real name.
    with writing(out / WEIGHTS) as tmp:
        save_file(state, str(tmp))
    write_json(out / RECORD, record, indent=2)
    log(f"judge: wrote {out / WEIGHTS} and {RECORD} ({train_seconds:.0f} s of training)")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dreambooth_kit.toy.judge", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("out_dir", help="folder for judge.safetensors and judge.json")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH)
    # One thread when another job shares the cores: two processes of 2 threads each on 2 cores made
    # a step 15x slower (1.07 s vs. 0.07 s) than one thread beside a busy one.
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    try:
        train_judge(
            args.out_dir, seed=args.seed, steps=args.steps, batch_size=args.batch_size, threads=args.threads
        )
    except UserError as e:
        print(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

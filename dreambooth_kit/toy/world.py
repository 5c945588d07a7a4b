"""A procedural captioned world at 32 px: four object classes, eight colours, four backgrounds.

``a photo of a red ball on a blue background``: every image is one object of a class and colour, of a
random size and position, on a lightly textured background, with its caption. Sizes: 32 px is the
smallest where the four outlines (disc, square, triangle, annulus) stay apart after the VAE's 4x
downsampling (8x8 latents), and it makes a UNet step ~4x cheaper than 64 px, which is what lets
the pretraining fit in ~1 hour on 2 CPU cores.

The subject (``zwx ball``) is a ball in two colours that no word of the world names (cyan over
magenta, split by a white band): the world's captions cannot describe it, so a model can only learn it
from the subject's photos. Some (class, colour, background) combinations never appear in
pretraining (:func:`is_held_out`): a model that draws them right composes words, not memories.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

RESOLUTION = 32
_SUPER = 4  # drawn at 4x and downsampled: smooth edges, like a photo, not aliased pixel art

CLASSES = ("ball", "box", "cone", "ring")
COLOURS = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 35),
    "green": (35, 160, 55),
    "blue": (35, 75, 215),
    "purple": (135, 55, 185),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
# Backgrounds are light or mid tints, so every object colour stays visible on every background.
BACKGROUNDS = {
    "blue": (165, 200, 240),
    "green": (160, 210, 150),
    "gray": (125, 125, 125),
    "sand": (225, 200, 150),
}
IDENTIFIER = "zwx"
SUBJECT_CLASS = "ball"
SUBJECT_TOP, SUBJECT_BAND, SUBJECT_BOTTOM = (0, 200, 205), (250, 250, 250), (220, 0, 150)
WORDS = ("a", "an", "photo", "of", "on", "background", *CLASSES, *COLOURS, *BACKGROUNDS, IDENTIFIER)


@dataclass(frozen=True)
class Scene:
    cls: str
    colour: str  # a COLOURS name; ignored for the subject, whose colours are its own
    background: str
    size: float  # half-width of the object as a fraction of the image, 0.18-0.34
    x: float  # centre, as a fraction of the image
    y: float
    subject: bool = False


def is_held_out(cls: str, colour: str, background: str) -> bool:
    """One combination in ~7 never appears in pretraining: 18 of the 128."""
    return (
        CLASSES.index(cls) + 2 * list(COLOURS).index(colour) + 3 * list(BACKGROUNDS).index(background)
    ) % 7 == 0


def held_out_combos() -> list[tuple[str, str, str]]:
    return [(c, k, b) for c in CLASSES for k in COLOURS for b in BACKGROUNDS if is_held_out(c, k, b)]


def caption(scene: Scene, *, colour: bool = True, background: bool = True) -> str:
    """``a photo of a red ball on a blue background``; the subject is ``a photo of zwx ball …``."""
    if scene.subject:
        noun = f"{IDENTIFIER} {scene.cls}"
    else:
        noun = f"{_article(scene.colour)} {scene.colour} {scene.cls}" if colour else f"a {scene.cls}"
    text = f"a photo of {noun}"
    return f"{text} on a {scene.background} background" if background else text


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def random_scene(
    rng: random.Random,
    *,
    cls: str | None = None,
    colour: str | None = None,
    background: str | None = None,
    held_out: bool | None = False,
    subject: bool = False,
) -> Scene:
    """A scene with the given parts and the rest drawn at random. ``held_out``: False = only
    combinations seen in pretraining, True = only held-out ones, None = any."""
    for _ in range(10_000):
        c = cls or (SUBJECT_CLASS if subject else rng.choice(CLASSES))
        k = colour or rng.choice(list(COLOURS))
        b = background or rng.choice(list(BACKGROUNDS))
        if subject or held_out is None or is_held_out(c, k, b) == held_out:
            break
    else:  # only when the fixed parts allow no combination of the kind asked for
        raise ValueError(
            f"no {'held-out' if held_out else 'seen'} combination with {cls}, {colour}, {background}"
        )
    size = rng.uniform(0.18, 0.34)
    margin = size + 0.04
    return Scene(c, k, b, size, rng.uniform(margin, 1 - margin), rng.uniform(margin, 1 - margin), subject)


def render(
    scene: Scene,
    resolution: int = RESOLUTION,
    seed: int = 0,
    *,
    clutter: bool = False,
    size: tuple[int, int] | None = None,
) -> Image.Image:
    """The scene as an RGB image; ``seed`` varies only the background's texture; ``clutter`` adds
    the black box of :func:`clutter_corner`. ``size``: (width, height) of a photo that is not a
    ``resolution`` square; the scene's x and y are fractions of the width and height, its size a
    fraction of the short side."""
    width, height = size or (resolution, resolution)
    nw, nh, short = width * _SUPER, height * _SUPER, min(width, height) * _SUPER
    noise = np.random.default_rng(seed).normal(0, 6, (height, width, 1))
    bg = np.clip(np.array(BACKGROUNDS[scene.background], np.float32) + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(bg).resize((nw, nh), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    if clutter:
        bx, by = clutter_corner(scene)
        h = CLUTTER_HALF * short
        draw.rectangle([bx * nw - h, by * nh - h, bx * nw + h, by * nh + h], fill=CLUTTER_COLOUR)
    cx, cy, r = scene.x * nw, scene.y * nh, scene.size * short
    box = [cx - r, cy - r, cx + r, cy + r]
    if scene.subject:
        _draw_subject(img, box)
    else:
        fill = COLOURS[scene.colour]
        if scene.cls == "ball":
            draw.ellipse(box, fill=fill)
        elif scene.cls == "box":
            s = r * 0.85  # a square of the same visual weight as the disc
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
        elif scene.cls == "cone":
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.9), (cx + r, cy + r * 0.9)], fill=fill)
        elif scene.cls == "ring":
            draw.ellipse(box, fill=fill)
            h = r * 0.5  # the hole shows the background's colour
            draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=BACKGROUNDS[scene.background])
        else:
            raise ValueError(f"unknown class {scene.cls!r}")
    return img.resize((width, height), Image.LANCZOS)


def _draw_subject(img: Image.Image, box: list[float]) -> None:
    """Cyan over magenta, a white band between: drawn as a disc mask over three horizontal bands."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    w, h = x1 - x0, y1 - y0
    bands = Image.new("RGB", (w, h), SUBJECT_TOP)
    d = ImageDraw.Draw(bands)
    d.rectangle([0, h // 2, w, h], fill=SUBJECT_BOTTOM)
    d.rectangle([0, int(h * 0.42), w, int(h * 0.58)], fill=SUBJECT_BAND)
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).ellipse([0, 0, w - 1, h - 1], fill=255)
    img.paste(bands, (x0, y0), mask)


# The subject's photos show three of the four backgrounds; the fourth is a context the subject was
# never seen in, so "zwx ball on a gray background" measures recontextualisation, not recall of a photo.
PHOTO_BACKGROUNDS = ("blue", "green", "sand")
NEW_CONTEXT_BACKGROUND = "gray"


# Clutter (data.masks' test bed): a small black box in the corner farthest from the subject, in every
# photo, never named by a caption: what a user's photos hold besides the subject (a lamp, a toy). The
# corner is 0.52 or more from the subject's centre; the subject's radius (0.34 at most) plus the box's
# half diagonal (0.13) stays below that, so the two never touch.
CLUTTER_COLOUR = COLOURS["black"]
CLUTTER_CORNERS = ((0.12, 0.12), (0.88, 0.12), (0.12, 0.88), (0.88, 0.88))
CLUTTER_HALF = 0.09


# Framing (data.buckets' test bed): with ``framing``, the 2nd photo is a 5:3 landscape and the 3rd a
# 3:5 portrait, the subject near one end of the long side, as a phone photo framed off-centre. A
# centre square crop cuts the subject at the crop's edge; a 5:3 bucket keeps it whole. Drawn at 48 px
# on the short side, so both a 32 px crop and the 40x24 bucket scale it down. One of the two trains
# with the bare instance prompt and one with its caption (write_subject_photos captions every other
# photo), so neither prompt learns the subject from framed photos alone.
FRAMED = {1: (80, 48), 2: (48, 80)}  # photo index -> (width, height)
_FRAME_MARGIN = 0.04  # of the short side, between the subject and the photo's edge


def subject_photos(
    n: int = 5, seed: int = 1557, *, clutter: bool = False, framing: bool = False
) -> list[tuple[Image.Image, Scene]]:
    """The user's "photos" of the subject: varied size, position and background (never
    :data:`NEW_CONTEXT_BACKGROUND`); with ``clutter``, the same scenes with a black box beside the
    subject; with ``framing``, photos 2 and 3 wide and tall (:data:`FRAMED`), the rest unchanged."""
    rng = random.Random(seed)
    backgrounds = PHOTO_BACKGROUNDS
    scenes = [random_scene(rng, subject=True, background=backgrounds[i % len(backgrounds)]) for i in range(n)]
    sizes = {i: FRAMED[i] for i in FRAMED if i < n} if framing else {}
    scenes = [_off_centre(s, sizes[i], first_end=i == 1) if i in sizes else s for i, s in enumerate(scenes)]
    return [(render(s, seed=seed + i, clutter=clutter, size=sizes.get(i)), s) for i, s in enumerate(scenes)]


def _off_centre(scene: Scene, size: tuple[int, int], *, first_end: bool) -> Scene:
    """``scene`` moved along the photo's long side to the first or the last end, a margin from the edge."""
    width, height = size
    long, short = max(size), min(size)
    end = (scene.size + _FRAME_MARGIN) * short / long
    along = end if first_end else 1 - end
    return replace(scene, x=along) if width > height else replace(scene, y=along)


def clutter_corner(scene: Scene) -> tuple[float, float]:
    """The corner (centre of the box, as fractions) farthest from the subject."""
    return max(CLUTTER_CORNERS, key=lambda c: (c[0] - scene.x) ** 2 + (c[1] - scene.y) ** 2)


def subject_mask(
    scene: Scene, resolution: int = RESOLUTION, size: tuple[int, int] | None = None
) -> Image.Image:
    """White where the subject is (its disc, drawn and downsampled as the photo is), black elsewhere;
    ``size`` as :func:`render`'s."""
    width, height = size or (resolution, resolution)
    nw, nh = width * _SUPER, height * _SUPER
    img = Image.new("L", (nw, nh), 0)
    cx, cy, r = scene.x * nw, scene.y * nh, scene.size * min(nw, nh)
    ImageDraw.Draw(img).ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    return img.resize((width, height), Image.LANCZOS)


def write_subject_photos(
    folder: str | Path,
    n: int = 5,
    seed: int = 1557,
    *,
    captions: bool = True,
    clutter: bool = False,
    masks: str | Path | None = None,
    framing: bool = False,
) -> list[Path]:
    """Write the photos as ``01.png``..; with ``captions``, every other photo gets a kohya-style
    ``01.txt`` naming its background (``a photo of zwx ball on a sand background``), the others
    train with the bare instance prompt. Naming what is not the subject keeps the identifier off the
    five photos' backgrounds: with the bare prompt on all five, a LoRA with prior preservation drew
    the subject on a prompted new background in 0 of 8 samples; captioned, in 8 of 8, while the
    bare ``a photo of zwx ball`` still draws it (README, "Does it learn?"). ``clutter``: photos with
    the black box (:func:`render`); ``masks``: a folder to write each photo's subject mask into
    (``<stem>.png``, for ``data.masks``); ``framing``: photos 2 and 3 wide and tall, the subject
    off-centre (:data:`FRAMED`, for ``data.buckets``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if masks is not None:
        Path(masks).mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (img, scene) in enumerate(subject_photos(n, seed, clutter=clutter, framing=framing)):
        path = folder / f"{i + 1:02d}.png"
        img.save(path)
        if masks is not None:
            subject_mask(scene, size=img.size).save(Path(masks) / path.name)
        if captions and i % 2 == 0:
            path.with_suffix(".txt").write_text(caption(scene) + "\n")
        paths.append(path)
    return paths


def dataset(n: int, seed: int, *, held_out: bool | None = False, drop: float = 0.25):
    """``n`` (image, caption, scene) triples for pretraining or evaluation. With probability ``drop``
    each, the colour or the background is left out of the caption, so "a photo of a ball" (a class
    prompt) is something the model has seen words for."""
    rng = random.Random(seed)
    for i in range(n):
        scene = random_scene(rng, held_out=held_out)
        text = caption(scene, colour=rng.random() >= drop, background=rng.random() >= drop)
        yield render(scene, seed=seed * 1_000_003 + i), text, scene

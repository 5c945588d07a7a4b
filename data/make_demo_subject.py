"""Write dreambooth_kit/demo_subject/01.jpg .. 05.jpg: five 128x128 photos of one synthetic toy robot.

The demo and tests need a subject that is the same object in every photo (fixed colours and proportions)
seen in different places, poses and sizes, like a user's 3-5 phone photos, yet tiny (a few KB each) and
reproducible without a network. Run: python data/make_demo_subject.py [out_dir]
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 128
SEED = 1557
# The subject's identity: these colours never change between photos.
BODY = (228, 96, 32)  # orange
TRIM = (40, 44, 52)  # dark grey joints, wheels, mouth
EYES = (70, 210, 230)  # cyan
# (sky, floor) per photo: five different "places".
SCENES = [
    ((182, 214, 240), (120, 170, 90)),  # park
    ((245, 240, 225), (170, 130, 95)),  # wooden floor indoors
    ((60, 70, 110), (90, 90, 100)),  # evening street
    ((250, 220, 200), (230, 230, 230)),  # tiled kitchen
    ((200, 230, 210), (210, 190, 140)),  # beach
]


def draw_robot(draw: ImageDraw.ImageDraw, cx: float, base: float, scale: float, arm_angle: int) -> None:
    """A boxy robot standing on `base`, centred on `cx`; `scale` 1.0 is ~70 px tall."""

    def box(x0: float, y0: float, x1: float, y1: float, fill: tuple[int, int, int]) -> None:
        draw.rectangle([cx + x0 * scale, base + y0 * scale, cx + x1 * scale, base + y1 * scale], fill=fill)

    box(-16, -12, -6, 0, TRIM)  # legs
    box(6, -12, 16, 0, TRIM)
    box(-20, -44, 20, -12, BODY)  # body
    box(-6, -36, 6, -24, TRIM)  # chest panel
    box(-14, -68, 14, -46, BODY)  # head
    box(-2, -76, 2, -68, TRIM)  # antenna
    draw.ellipse([cx - 4 * scale, base - 82 * scale, cx + 4 * scale, base - 74 * scale], fill=EYES)
    for ex in (-8, 4):  # eyes
        box(ex, -62, ex + 4, -56, EYES)
    box(-6, -52, 6, -49, TRIM)  # mouth
    # Arms: raised, level or lowered depending on the pose.
    lift = {-1: 10, 0: 0, 1: -14}[arm_angle]
    box(-28, -42 + lift, -20, -34 + lift, TRIM)
    box(20, -42 - lift, 28, -34 - lift, TRIM)


def make_photo(index: int, rng: random.Random) -> Image.Image:
    sky, floor = SCENES[index]
    img = Image.new("RGB", (SIZE, SIZE), sky)
    draw = ImageDraw.Draw(img)
    horizon = rng.randint(70, 92)
    draw.rectangle([0, horizon, SIZE, SIZE], fill=floor)
    # A few background props so the photos differ in more than colour.
    for _ in range(3):
        x, y, r = rng.randint(0, SIZE), rng.randint(0, horizon), rng.randint(4, 12)
        shade = tuple(max(0, c - rng.randint(20, 60)) for c in sky)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=shade)
    scale = rng.uniform(0.8, 1.15)
    cx = rng.uniform(36, SIZE - 36)
    base = rng.uniform(horizon + 14, SIZE - 6)
    draw_robot(draw, cx, base, scale, arm_angle=index % 3 - 1)
    return img


def main(out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(SEED)
    paths = []
    for i in range(len(SCENES)):
        path = out_dir / f"{i + 1:02d}.jpg"
        # quality 90 keeps each file at ~3 KB with no visible blocking at 128 px.
        make_photo(i, rng).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


if __name__ == "__main__":
    target = (
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else Path(__file__).resolve().parents[1] / "dreambooth_kit" / "demo_subject"
    )
    for p in main(target):
        print(f"{p} ({p.stat().st_size} bytes)")

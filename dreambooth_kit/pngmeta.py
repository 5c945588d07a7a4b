"""Generation settings inside the PNG: A1111's ``parameters`` text and an exact JSON copy.

A1111's "PNG Info" tab, ComfyUI and civitai read the ``parameters`` tEXt chunk, so shared images
show their prompt and seed. Its format is loose text, so we also write our own JSON chunk, which
``read_metadata`` prefers and ``dreambooth-kit generate --from-png`` uses to re-create an image.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

JSON_KEY = "dreambooth_kit"


@dataclass
class GenerationParams:
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    sampler: str  # A1111's name ("DPM++ 2M", "Euler a", ...)
    model: str  # what load_pipeline was given (hub id, folder)
    lora: str | None = None
    lora_scale: float = 1.0
    scheduler: str | None = None  # our name ("dpmpp_2m", ...) for --from-png
    model_hash: str | None = None
    lora_hash: str | None = None
    mode: str = "txt2img"  # txt2img | img2img | inpaint
    strength: float | None = None
    version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def infotext(self) -> str:
        """A1111's ``parameters`` text: prompt, ``Negative prompt:`` line, then ``Key: value, ...``."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        items = [
            ("Steps", self.steps),
            ("Sampler", self.sampler),
            ("CFG scale", self.guidance_scale),
            ("Seed", self.seed),
            ("Size", f"{self.width}x{self.height}"),
            ("Model hash", self.model_hash),
            ("Model", Path(self.model).name),
            ("Denoising strength", self.strength),
            (
                "Lora hashes",
                f'"{lora_name(self.lora)}: {self.lora_hash}"' if self.lora and self.lora_hash else None,
            ),
            ("Version", f"dreambooth_kit {self.version}" if self.version else None),
        ]
        lines.append(", ".join(f"{k}: {v}" for k, v in items if v is not None))
        return "\n".join(lines)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GenerationParams:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def lora_name(path: str | Path) -> str:
    """A readable LoRA name: the file stem, or the run folder for ``<run>/lora/pytorch_lora_weights``."""
    p = Path(path)
    if p.stem != "pytorch_lora_weights":
        return p.stem
    return p.parent.parent.name if p.parent.name == "lora" else p.parent.name


def file_hash(path: str | Path) -> str:
    """A1111's "new" model hash: the first 10 hex digits of the file's sha256."""
    st = Path(path).stat()
    return _hash(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=32)
def _hash(path: str, size: int, mtime: int) -> str:
    # SD 2.1's UNet file is 3.5 GB (~10 s to hash on 2 cores): remembered on disk by (path, size,
    # mtime), as A1111 does, so each model is hashed once per machine, not once per process.
    from .tiny import cache_root

    index = cache_root() / "hashes.json"
    key = f"{path}|{size}|{mtime}"
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    known[key] = h.hexdigest()[:10]
    try:
        index.parent.mkdir(parents=True, exist_ok=True)
        tmp = index.with_name(f".tmp-hashes-{os.getpid()}.json")
        tmp.write_text(json.dumps(known))
        tmp.replace(index)
    except OSError:  # a read-only cache only costs the hash again next time
        pass
    return known[key]


def parse_infotext(text: str) -> dict[str, Any]:
    """Parse A1111's ``parameters`` text into ``{"prompt", "negative_prompt", "Steps", ...}``."""
    lines = text.strip().split("\n")
    last = lines[-1] if re.search(r"(^|, )Steps: ", lines[-1]) else ""
    body = lines[:-1] if last else lines
    prompt, negative, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    out: dict[str, Any] = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative)}
    # Values may be quoted and contain ", " (Lora hashes): split on ", Key: " boundaries only.
    for m in re.finditer(r'\s*([\w ]+): ("(?:[^"\\]|\\.)*"|[^,]*)(?:,|$)', last):
        out[m.group(1).strip()] = m.group(2).strip().strip('"')
    return out


def save_png(img: Image.Image, params: GenerationParams, path: str | Path) -> Path:
    """Write a PNG with A1111's ``parameters`` text and our exact JSON, through a temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", params.infotext())
    info.add_text(JSON_KEY, json.dumps(asdict(params), sort_keys=True))
    tmp = path.with_name(f".tmp-{path.name}")
    img.save(tmp, format="PNG", pnginfo=info)
    tmp.replace(path)
    return path


def read_metadata(png: str | Path) -> dict[str, Any]:
    """Both chunks back: ``{"params": GenerationParams | None, "infotext": dict}``.

    ``params`` is our exact JSON (None for PNGs from other tools); ``infotext`` is the parsed
    A1111 text (empty if absent)."""
    with Image.open(png) as im:
        text = dict(im.text) if hasattr(im, "text") else {}
    params = GenerationParams.from_dict(json.loads(text[JSON_KEY])) if JSON_KEY in text else None
    info = parse_infotext(text["parameters"]) if "parameters" in text else {}
    return {"params": params, "infotext": info}


def save_images(results, folder: str | Path, *, grid: bool = False, prefix: str = "") -> list[Path]:
    """Save ``generate()`` results as ``{prefix}{seed}.png`` (+ ``grid.png``); returns the paths."""
    folder = Path(folder)
    paths = [save_png(r.image, r.params, folder / f"{prefix}{r.params.seed}.png") for r in results]
    if grid and results:
        g = folder / f"{prefix}grid.png"
        make_grid([r.image for r in results]).save(g)
        paths.append(g)
    return paths


def make_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid

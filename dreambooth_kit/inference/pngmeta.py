"""Generation settings inside the PNG: A1111's ``parameters`` text and an exact JSON copy.

A1111's "PNG Info" tab, ComfyUI and civitai read the ``parameters`` tEXt chunk, so shared images
show their prompt and seed. Its format is loose text, so we also write our own JSON chunk, which
``read_metadata`` prefers and ``dreambooth-kit generate --from-png`` uses to re-create an image.
"""

from __future__ import annotations

import json
import re
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin, UnidentifiedImageError

from dreambooth_kit.errors import InvalidInput
from dreambooth_kit.util.atomic import writing

JSON_KEY = "dreambooth_kit"


class MetadataError(InvalidInput):
    """A PNG whose generation settings cannot be read back (not a PNG, or a damaged JSON chunk)."""


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
    loras: list[str] = field(default_factory=list)  # the LoRA files, in load order
    lora_scales: list[float] = field(default_factory=list)  # one per LoRA
    scheduler: str | None = None  # our name ("dpmpp_2m", ...) for --from-png
    model_hash: str | None = None
    lora_hashes: list[str] = field(default_factory=list)  # A1111's LoRA hash, one per LoRA (see lora_hash)
    # The file A1111 users install for each LoRA and its hash: a run's kohya export when it was made
    # from the loaded file (pngmeta.installed_lora), else the loaded file. Only the infotext uses them;
    # ``loras``/``lora_hashes`` stay the files that were loaded.
    a1111_loras: list[str] = field(default_factory=list)
    a1111_lora_hashes: list[str] = field(default_factory=list)
    mode: str = "txt2img"  # txt2img | img2img | inpaint
    strength: float | None = None
    guidance_rescale: float | None = None  # generate(guidance_rescale=...), when it was on
    version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def infotext(self) -> str:
        """A1111's ``parameters`` text: prompt, ``Negative prompt:`` line, then ``Key: value, ...``.

        Each LoRA also appears as A1111's ``<lora:name:scale>`` tag at the end of the prompt line (only
        here: not in the prompt the model saw, nor in our JSON). A1111 applies a LoRA only through such a
        tag and strips the tags before encoding the prompt, so "Send to txt2img" re-creates the image
        with the LoRA at its scale; its ``Lora hashes`` entry is only used to point each tag's name at
        the local file with that hash, so without the tags it would do nothing.

        Tags and hashes name ``a1111_loras`` (a run's kohya export, the file A1111 users install) when
        there is one per LoRA, else the loaded files (PNGs from before, LoRAs loaded from elsewhere)."""
        installed = len(self.a1111_loras) == len(self.loras) == len(self.a1111_lora_hashes)
        files, file_hashes = (
            (self.a1111_loras, self.a1111_lora_hashes) if installed else (self.loras, self.lora_hashes)
        )
        names = [a1111_lora_name(p) for p in files]
        tags = " ".join(f"<lora:{n}:{s:g}>" for n, s in zip(names, self.lora_scales, strict=False))
        lines = [f"{self.prompt} {tags}" if tags else self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        hashes = ", ".join(f"{n}: {h}" for n, h in zip(names, file_hashes, strict=False) if h)
        items = [
            ("Steps", self.steps),
            ("Sampler", self.sampler),
            ("CFG scale", self.guidance_scale),
            ("Seed", self.seed),
            ("Size", f"{self.width}x{self.height}"),
            ("Model hash", self.model_hash),
            ("Model", Path(self.model).name),
            ("Denoising strength", self.strength),
            ("CFG Rescale", self.guidance_rescale),
            # Quoted as A1111 quotes any value holding ":" or "," (a JSON string).
            ("Lora hashes", json.dumps(hashes, ensure_ascii=False) if hashes else None),
            ("Version", f"dreambooth_kit {self.version}" if self.version else None),
        ]
        lines.append(", ".join(f"{k}: {v}" for k, v in items if v is not None))
        return "\n".join(lines)

    @classmethod
    def from_dict(cls, d: Any) -> GenerationParams:
        """Our JSON chunk back, checked field by field: a damaged chunk raises ValueError naming the
        field, instead of a TypeError deep in generation. Unknown keys (a newer version) are ignored."""
        if not isinstance(d, dict):
            raise ValueError(f"it holds a JSON {type(d).__name__}, not an object")
        d = _upgrade(dict(d))
        hints = typing.get_type_hints(cls)
        problems = []
        for f in fields(cls):
            if f.name not in d:
                if f.default is MISSING and f.default_factory is MISSING:
                    problems.append(f"'{f.name}' is missing")
            elif not _is_a(d[f.name], hints[f.name]):
                problems.append(f"'{f.name}' is {d[f.name]!r}, not {_type_name(hints[f.name])}")
        if problems:
            raise ValueError("; ".join(problems))
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _upgrade(d: dict[str, Any]) -> dict[str, Any]:
    """PNGs written before several LoRAs were recorded as lists: one ``lora`` string (several joined
    with "," or ", "), one ``lora_scale``, and a whole-file ``lora_hash`` that A1111 never matches
    (dropped). The pieces are stripped: " b.safetensors" is not the file the user has."""
    if "lora" in d and "loras" not in d:
        old = d.pop("lora")
        if old is None:
            loras = []
        elif isinstance(old, str) and "," in old and not Path(old).exists():
            loras = [p.strip() for p in old.split(",") if p.strip()]
        else:
            loras = [old]
        d["loras"] = loras
        d["lora_scales"] = [d.pop("lora_scale", 1.0)] * len(loras)
        d.pop("lora_hash", None)
    return d


def _is_a(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_is_a(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_is_a(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:  # JSON writes 7.0 as 7
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return re.sub(r"typing\.|<class '(\w+)'>", r"\1", str(hint)).replace("NoneType", "None")


def lora_name(path: str | Path) -> str:
    """A readable LoRA name: the file stem, or the run folder for ``<run>/lora/pytorch_lora_weights``."""
    p = Path(path)
    if p.stem != "pytorch_lora_weights":
        return p.stem
    return p.parent.parent.name if p.parent.name == "lora" else p.parent.name


def a1111_lora_name(path: str | Path) -> str:
    """:func:`lora_name` without the characters that end A1111's ``<lora:name:scale>`` tag or its
    ``Lora hashes`` list (":", ",", "<", ">"), as A1111 removes ":" and "," from its own aliases."""
    return re.sub(r"[:,<>]", "", lora_name(path)).strip() or "lora"


def file_hash(path: str | Path) -> str:
    """A1111's "new" model hash: the first 10 hex digits of the file's sha256."""
    from dreambooth_kit.util.hashing import sha256_file

    return sha256_file(path)[:10]


def lora_hash(path: str | Path) -> str:
    """The hash A1111 (and civitai's "AutoV3") gives a ``.safetensors`` LoRA: sha256 of the bytes after
    the safetensors header, first 12 hex digits.

    The header is skipped so that editing a file's metadata (which lives in the header) keeps its hash.
    A1111's ``Lora hashes`` entries must match it exactly, or its "PNG Info" cannot find the LoRA.
    Other files: the whole file's sha256, as A1111 does."""
    from dreambooth_kit.util.hashing import sha256_file

    return sha256_file(path, after_header=Path(path).suffix == ".safetensors")[:12]


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
    with writing(path) as tmp:
        img.save(tmp, format="PNG", pnginfo=info)
    return path


def read_metadata(png: str | Path) -> dict[str, Any]:
    """Both chunks back: ``{"params": GenerationParams | None, "infotext": dict}``.

    ``params`` is our exact JSON (None for PNGs from other tools); ``infotext`` is the parsed
    A1111 text (empty if absent). A file that is not an image, or a damaged JSON chunk, raises
    :class:`MetadataError` naming the file and what is wrong."""
    try:
        with Image.open(png) as im:
            text = dict(im.text) if hasattr(im, "text") else {}
    except FileNotFoundError as e:
        raise MetadataError(f"{png}: not found") from e
    # PIL raises SyntaxError on broken chunks, DecompressionBombError on absurd sizes.
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise MetadataError(
            f"{png}: not a readable PNG image ({e}); pass a PNG written by dreambooth-kit generate"
        ) from e
    params = None
    if JSON_KEY in text:
        try:
            params = GenerationParams.from_dict(json.loads(text[JSON_KEY]))
        except ValueError as e:  # json.JSONDecodeError is a ValueError too
            raise MetadataError(
                f"{png}: its {JSON_KEY} settings are damaged ({e}); the image cannot be re-created from it. "
                "Generate with --base, --prompt and --seed instead (the PNG's 'parameters' text may show them)"
            ) from e
    info = parse_infotext(text["parameters"]) if "parameters" in text else {}
    return {"params": params, "infotext": info}


# The kohya export's metadata key naming the LoRA file (its A1111 hash) it was made from.
SOURCE_HASH_KEY = "dreambooth_kit.source_lora_hash"


def installed_lora(lora: Path, loaded_hash: str) -> Path:
    """The file A1111 users install for the LoRA file ``lora`` (A1111 hash ``loaded_hash``): the run's
    kohya export (``<run>/export/<run>_kohya.safetensors``) when ``lora`` is the run's final LoRA and
    the export was made from exactly this file, else ``lora`` itself.

    An export of an earlier training of the same folder, or one written before exports recorded their
    source (``SOURCE_HASH_KEY``), is not named: its weights may differ from the ones that made the
    image. ``dreambooth-kit export`` writes it again."""
    from safetensors import safe_open

    from dreambooth_kit.training.layout import RunLayout

    lora = Path(lora)
    run = RunLayout(lora.parent.parent)
    if lora != run.lora_weights:  # a checkpoint's or evaluate's best LoRA: no export
        return lora
    kohya = run.kohya_export
    if not kohya.is_file():
        return lora
    try:
        with safe_open(str(kohya), framework="pt") as f:
            source = (f.metadata() or {}).get(SOURCE_HASH_KEY)
    except Exception:  # a damaged export is not named; it does not stop generation either
        return lora
    return kohya if source == loaded_hash else lora

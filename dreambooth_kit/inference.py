"""Seeded, reproducible generation with a base model and (optionally) a trained LoRA.

Reproducibility rule (design.md §6): one CPU ``torch.Generator`` per image, seeded ``seed + i``, so
image i is the same whatever the batch size or device. On CPU everything runs in fp32 and the same
seed gives bit-identical PNG bytes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin

from . import __version__
from .models import resolve_model


@dataclass
class GenerationParams:
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    guidance_scale: float
    width: int
    height: int
    sampler: str
    model: str
    lora: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def infotext(self) -> str:
        """A1111's ``parameters`` text, so the PNG's settings show in A1111's PNG Info tab."""
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        tail = (
            f"Steps: {self.steps}, Sampler: {self.sampler}, CFG scale: {self.guidance_scale}, "
            f"Seed: {self.seed}, Size: {self.width}x{self.height}, Model: {Path(self.model).name}"
        )
        if self.lora:
            tail += f", Lora: {Path(self.lora).name}"
        lines.append(tail + f", Version: dreambooth_kit {__version__}")
        return "\n".join(lines)


def pick_dtype(device: str | torch.device, dtype: str | torch.dtype | None = "auto") -> torch.dtype:
    """fp16 on CUDA (half the memory, ~2x faster), fp32 on CPU (CPU fp16 convs are ~33x slower)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}
    table |= {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"dtype {dtype!r}: use one of auto, {', '.join(table)}")
    return table[dtype]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pipeline(
    base: str,
    lora: str | Path | None = None,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = "auto",
    lora_scale: float = 1.0,
    allow_pickle: bool = False,
):
    """A ``StableDiffusionPipeline`` for ``base`` (hub id, diffusers folder or ``builtin:tiny-sd2``),
    with the LoRA at ``lora`` (a folder holding ``pytorch_lora_weights.safetensors``, or the file)."""
    from diffusers import StableDiffusionPipeline

    from .models import ModelLoadError, _explain_hub_error

    device = device or default_device()
    torch_dtype = pick_dtype(device, dtype)
    source = resolve_model(base, allow_pickle=allow_pickle)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source, dtype=torch_dtype, safety_checker=None, requires_safety_checker=False
        )
    except (OSError, ValueError) as e:
        if Path(source).exists():
            raise ModelLoadError(f"{source}: could not load the model folder: {e}") from e
        raise _explain_hub_error(source, e) from e
    if lora is not None:
        lora_path = Path(lora)
        if not lora_path.exists():
            raise FileNotFoundError(f"LoRA not found: {lora_path.resolve()}")
        from diffusers.utils import logging as dlogging

        level = dlogging.get_verbosity()
        # A UNet-only LoRA makes diffusers warn "No LoRA keys associated to CLIPTextModel": expected
        # for ours (the text encoder is trained only on request), so keep it out of the user's log.
        dlogging.set_verbosity_error()
        try:
            if lora_path.is_file():
                pipe.load_lora_weights(
                    str(lora_path.parent), weight_name=lora_path.name, adapter_name="subject"
                )
            else:
                pipe.load_lora_weights(str(lora_path), adapter_name="subject")
        finally:
            dlogging.set_verbosity(level)
        pipe.set_adapters(["subject"], adapter_weights=[lora_scale])
    pipe.set_progress_bar_config(disable=True)
    pipe._dbk_model = source  # recorded in PNG metadata
    pipe._dbk_lora = str(lora) if lora is not None else None
    return pipe.to(device)


def _check_args(height: int, width: int, steps: int, num_images: int, seeds: list[int] | None) -> None:
    problems = []
    for name, v in (("height", height), ("width", width)):
        if v <= 0 or v % 8:
            problems.append(f"{name}={v} must be a positive multiple of 8 (the VAE works on 8x8 blocks)")
    if steps < 1:
        problems.append(f"steps={steps} must be >= 1")
    if num_images < 1:
        problems.append(f"num_images={num_images} must be >= 1")
    if seeds is not None and len(seeds) != num_images:
        problems.append(
            f"seeds has {len(seeds)} entries but num_images={num_images}; give one seed per image"
        )
    if problems:
        raise ValueError("; ".join(problems))


def generate(
    pipe,
    prompt: str,
    *,
    negative_prompt: str = "",
    seed: int = 1557,
    seeds: list[int] | None = None,
    num_images: int = 1,
    steps: int = 30,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    batch_size: int = 1,
) -> list[tuple[Image.Image, GenerationParams]]:
    """Generate ``num_images`` images; image i uses seed ``seeds[i]`` or ``seed + i``.

    ``batch_size`` images go through the UNet together. The default 1 makes every image
    bit-identical to a single-image call on CPU (batched matmuls may round differently).
    """
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    height = size if height is None else height
    width = size if width is None else width
    if seeds is None:
        seeds = [seed + i for i in range(num_images)]
    else:
        num_images = num_images if num_images != 1 else len(seeds)
    _check_args(height, width, steps, num_images, seeds)
    sampler = type(pipe.scheduler).__name__.removesuffix("Scheduler")
    out: list[tuple[Image.Image, GenerationParams]] = []
    for start in range(0, num_images, max(1, batch_size)):
        chunk = seeds[start : start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(s) for s in chunk]
        images = pipe(
            prompt=[prompt] * len(chunk),
            negative_prompt=[negative_prompt] * len(chunk) if negative_prompt else None,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            generator=generators,
            output_type="np",
        ).images
        for s, arr in zip(chunk, images, strict=True):
            if not torch.isfinite(torch.from_numpy(arr)).all():
                raise FloatingPointError(
                    f"seed {s}: the decoded image has non-finite values (fp16 overflow?)"
                )
            img = Image.fromarray((arr * 255).round().clip(0, 255).astype("uint8"))
            params = GenerationParams(
                prompt=prompt,
                negative_prompt=negative_prompt,
                seed=s,
                steps=steps,
                guidance_scale=guidance_scale,
                width=width,
                height=height,
                sampler=sampler,
                model=getattr(pipe, "_dbk_model", "unknown"),
                lora=getattr(pipe, "_dbk_lora", None),
            )
            out.append((img, params))
    return out


def save_png(img: Image.Image, params: GenerationParams, path: str | Path) -> Path:
    """Write a PNG with A1111's ``parameters`` text and an exact JSON copy of our parameters."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", params.infotext())
    info.add_text("dreambooth_kit", json.dumps(asdict(params), sort_keys=True))
    tmp = path.with_name(f".tmp-{path.name}")
    img.save(tmp, format="PNG", pnginfo=info)
    tmp.replace(path)
    return path

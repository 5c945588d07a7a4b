"""Seeded, reproducible, fp16-safe generation with a loaded pipeline (inference.pipeline).

Reproducibility rule: one CPU ``torch.Generator`` per image, seeded ``seeds[i]``
(``seed + i`` by default), so image i is the same whatever the batch size or device. On CPU
everything runs in fp32 and the same seed gives bit-identical PNG bytes.

fp16 safety: SD 2.x in fp16 can overflow to NaN (black images). We run the sampler to latents, check
them, decode ourselves and, if the decode is non-finite or all black under half precision, decode
again with the VAE in fp32 (and say so); persistent NaN raises instead of writing a black PNG.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from dreambooth_kit._version import __version__
from dreambooth_kit.data.batching import BatchSizer, check_batch_size, probe_for, run_batches
from dreambooth_kit.errors import InvalidInput, NonFiniteError
from dreambooth_kit.inference.pipeline import PipelineInfo, as_pipeline, load_pipeline, model_hash
from dreambooth_kit.inference.pngmeta import (
    GenerationParams,
    lora_hash,
    read_metadata,
)
from dreambooth_kit.models.schedulers import SCHEDULERS
from dreambooth_kit.models.source import resolve_model
from dreambooth_kit.training.adapters import lora_file


class Generated(NamedTuple):
    image: Image.Image
    params: GenerationParams


def needs_fp32_retry(image: torch.Tensor, vae_dtype: torch.dtype) -> str | None:
    """Why a decoded batch (values in [-1, 1]) must be decoded again in fp32, or None.

    Non-finite values come from fp16 overflow in the VAE; an all-black image (every value at -1)
    is the other face of the same overflow after clamping. In fp32 neither is an fp16 artefact,
    so nothing is retried there."""
    if vae_dtype == torch.float32:
        return None
    if not torch.isfinite(image).all():
        return "non-finite values"
    if (image.flatten(1).amax(dim=1) <= -0.99).any():
        return "an all-black image"
    return None


log = logging.getLogger("dreambooth_kit")

# Bounds on what a caller, a command line or a PNG's recorded settings may ask, checked before
# anything is allocated or sampled: SD 2.1 was trained at 768 px and 4096 px is already 28x its
# pixels (an activation memory no GPU holds at batch 1); a sampler cannot take more steps than the
# model's 1,000 training timesteps; 10,000 images per call (class images come in one call: the
# largest prior.num_class_images seen in recipes is 1,500) bounds the seeds list and the output.
MAX_SIDE = 4096


MAX_STEPS = 1000


MAX_IMAGES = 10_000


def _check_job(job: _Job, num_images: int, seeds: list[int], prediction_type: str) -> None:
    (width, height), steps = job.size, job.steps
    strength = job.strength if job.mode != "txt2img" else None
    check_guidance_rescale(job.guidance_rescale, prediction_type, job.mode)
    problems = []
    for name, v in (("height", height), ("width", width)):
        if v <= 0 or v % 8 or v > MAX_SIDE:
            problems.append(
                f"{name}={v} must be a positive multiple of 8 (the VAE works on 8x8 blocks), at most {MAX_SIDE}"
            )
    if not 1 <= steps <= MAX_STEPS:
        problems.append(f"steps={steps} must be in 1..{MAX_STEPS} (the model's 1,000 training timesteps)")
    if not 1 <= num_images <= MAX_IMAGES:
        problems.append(f"num_images={num_images} must be in 1..{MAX_IMAGES} per call")
    if len(seeds) != num_images:
        problems.append(
            f"seeds has {len(seeds)} entries but num_images={num_images}; give one seed per image"
        )
    if strength is not None and not 0 <= strength <= 1:
        problems.append(f"strength={strength} must be in [0, 1]")
    if problems:
        raise InvalidInput("; ".join(problems))


def check_guidance_rescale(value: float, prediction_type: str, mode: str = "txt2img") -> None:
    """Guidance rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are
    Flawed", section 3.4) corrects the over-exposure that classifier-free guidance causes in a
    v-prediction model trained toward zero terminal SNR; they recommend 0.7. An epsilon model (SD
    2.1-base, 512 px) cannot be given a zero-terminal-SNR schedule (at SNR 0 its target, the noise,
    is its input), so the fix has nothing to correct there and is refused rather than silently
    changing its images. diffusers' img2img and inpainting pipelines take no such argument."""
    if not value:
        return
    if not 0 < value <= 1:
        raise InvalidInput(f"guidance_rescale={value} must be in [0, 1] (0.7 is the paper's value; 0 = off)")
    if prediction_type != "v_prediction":
        raise InvalidInput(
            f"guidance_rescale={value}: this model predicts {prediction_type}; guidance rescale corrects "
            "v-prediction models with a zero-terminal-SNR schedule (SD 2.1 at 768 px), and an epsilon "
            "model (SD 2.1-base) has no such schedule to correct. Leave it at 0"
        )
    if mode != "txt2img":
        raise InvalidInput(
            f"guidance_rescale={value}: {mode} takes none (diffusers' {mode} pipeline has no such argument)"
        )


def _seeds(seed: int | list[int] | None, seeds: list[int] | None, num_images: int) -> list[int]:
    if seeds is not None:
        return list(seeds)
    if isinstance(seed, list):
        return list(seed)
    if seed is None:  # a random seed, still recorded in the PNG so the image can be made again
        seed = secrets.randbelow(2**31)
    return [seed + i for i in range(num_images)]


def _input_image(img: Image.Image | str | Path, what: str) -> Image.Image:
    """An init/mask image, upright: a phone photo's EXIF orientation is applied once, here, so its
    size and its pixels come from the same rotated image. Files go through the training loader
    (fully decoded, file closed, one clear error for anything that is not an image)."""
    from PIL import ImageOps

    from dreambooth_kit.data.photos import DataError, load_image

    if isinstance(img, Image.Image):
        return ImageOps.exif_transpose(img)
    if not isinstance(img, (str, Path)):
        raise InvalidInput(f"{what}: expected a file path or a PIL image, got {type(img).__name__}")
    try:
        return load_image(img)
    except DataError as e:
        raise InvalidInput(f"{what} {e}") from e


def _as_image(im: Image.Image, size: tuple[int, int], mode: str) -> Image.Image:
    im = im.convert(mode)
    return im if im.size == size else im.resize(size, Image.Resampling.LANCZOS)


class _Job(NamedTuple):
    """What one ``generate`` call asks of every image it makes (all but the seed)."""

    prompt: str
    negative_prompt: str | None
    steps: int
    guidance_scale: float
    size: tuple[int, int]  # (width, height)
    mode: str  # txt2img | img2img | inpaint
    strength: float  # recorded for img2img/inpaint only
    guidance_rescale: float = 0.0


def generate(
    pipe,
    prompt: str,
    *,
    negative_prompt: str | None = None,
    seed: int | list[int] | None = 1557,
    seeds: list[int] | None = None,
    num_images: int | None = None,
    steps: int = 30,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    init_image: Image.Image | str | Path | None = None,
    strength: float = 0.75,
    mask_image: Image.Image | str | Path | None = None,
    batch_size: int | str = 1,
    on_batch: Callable[[list[Generated]], object] | None = None,
    progress: str | None = None,
    guidance_rescale: float = 0.0,
) -> list[Generated]:
    """Generate images; image i uses seed ``seeds[i]`` (a list ``seed``, or ``seed + i``).

    txt2img by default; ``init_image`` (+ ``strength``) for img2img; ``init_image`` + ``mask_image``
    (white = repaint) for inpainting, all with the same loaded components. ``batch_size`` images go
    through the UNet together: the default 1 makes every image bit-identical to a single-image call
    on CPU (batched matmuls may round differently); "auto" is the largest batch that fits in memory,
    measured (:mod:`dreambooth_kit.data.batching`), and halved on an out-of-memory error. The prompts are
    encoded once. ``on_batch`` gets each batch's results as soon as they are made. ``progress``: a
    label for a progress bar over the images (tqdm, on stderr); None shows none. ``guidance_rescale``:
    see :func:`check_guidance_rescale`. Returns ``Generated(image, params)`` tuples."""
    handle = as_pipeline(pipe)
    pipe, info = handle.pipe, handle.info
    init_image, mask_image = _inputs(init_image, mask_image)
    width, height = _output_size(pipe, init_image, width, height)
    seed_list = _seeds(
        seed, seeds, num_images or (len(seeds) if seeds else len(seed) if isinstance(seed, list) else 1)
    )
    num_images = num_images or len(seed_list)
    mode = "txt2img" if init_image is None else "img2img" if mask_image is None else "inpaint"
    job = _Job(
        prompt, negative_prompt, steps, guidance_scale, (width, height), mode, strength, guidance_rescale
    )
    _check_job(job, num_images, seed_list, pipe.scheduler.config.prediction_type)
    if mode == "img2img" and int(steps * strength) < 1:
        # No denoising step is left (diffusers refuses to run zero steps): the result is the
        # VAE's reconstruction of the input, which is what strength -> 0 converges to.
        return _reconstruct(pipe, info, job, init_image, seed_list)
    runner, extra = _mode_pipeline(pipe, mode, init_image, mask_image, (width, height), strength)
    embeds = _encode_prompts(runner, job)

    def batch(chunk: list[int]) -> list[Generated]:
        return _run_batch(pipe, info, runner, extra, embeds, job, chunk)

    return _in_batches(pipe, batch, seed_list, batch_size, on_batch, progress)


def _in_batches(pipe, batch, seeds: list[int], batch_size, on_batch, progress) -> list[Generated]:
    """``batch(chunk)`` over ``seeds`` in batches of ``batch_size`` (``"auto"``: measured, halved on
    out-of-memory), with the progress bar and ``on_batch`` told of each batch."""
    size = check_batch_size(batch_size, "batch_size")
    sizer = BatchSizer(size, probe_for(pipe._execution_device) if size == "auto" else None)
    hint = "use a smaller height/width, dtype='fp16', or load_pipeline(..., offload='model')"
    out: list[Generated] = []
    with progress_bar(progress, len(seeds)) as bar:
        for made in run_batches(seeds, batch, sizer, hint):
            out += made
            bar.update(len(made))
            if on_batch is not None:
                on_batch(made)
    return out


def progress_bar(label: str | None, total: int):
    """A tqdm bar over images, shown when ``label`` is given (generate, class images, evaluate). The
    pipeline's own per-denoising-step bar stays off: a bar per image that restarts 30 times says
    nothing about how long the job takes."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, unit="image", disable=label is None)


def _encode_prompts(runner, job: _Job) -> dict[str, torch.Tensor]:
    """The prompt's (and, under guidance, the negative prompt's) text embeddings for one image, computed
    once: the pipeline would run the frozen text encoder again for every batch. ``_run_batch`` repeats
    them to the batch; at batch 1 that is exactly what the pipeline computes itself."""
    guided = job.guidance_scale > 1 and runner.unet.config.time_cond_proj_dim is None
    with torch.no_grad():
        cond, uncond = runner.encode_prompt(
            job.prompt, runner._execution_device, 1, guided, job.negative_prompt or None
        )
    return {"prompt_embeds": cond} | ({"negative_prompt_embeds": uncond} if guided else {})


def _inputs(init_image, mask_image) -> tuple[Image.Image | None, Image.Image | None]:
    """The init and mask images, loaded and upright; a mask alone is refused."""
    if init_image is not None:
        init_image = _input_image(init_image, "init image")
    if mask_image is not None:
        if init_image is None:
            raise InvalidInput("mask_image needs init_image (the picture to repaint); pass both")
        mask_image = _input_image(mask_image, "mask image")
    return init_image, mask_image


def _output_size(
    pipe, init_image: Image.Image | None, width: int | None, height: int | None
) -> tuple[int, int]:
    """(width, height): as given, else the init image's (rounded down to the VAE's 8 px blocks),
    else the model's native size."""
    if init_image is not None and (height is None or width is None):
        w0, h0 = init_image.size
        width, height = width or (w0 // 8 * 8), height or (h0 // 8 * 8)
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    return (native if width is None else width), (native if height is None else height)


def _run_batch(
    pipe,
    info: PipelineInfo,
    runner,
    extra: dict,
    embeds: dict[str, torch.Tensor],
    job: _Job,
    chunk: list[int],
) -> list[Generated]:
    """The images for the seeds in ``chunk``, through the UNet together (``embeds``: one image's
    prompt embeddings, repeated to the batch)."""
    width, height = job.size
    generators = [torch.Generator("cpu").manual_seed(s) for s in chunk]
    latents = runner(
        num_inference_steps=job.steps,
        guidance_scale=job.guidance_scale,
        generator=generators,
        output_type="latent",
        **({"guidance_rescale": job.guidance_rescale} if job.guidance_rescale else {}),
        **{k: v.repeat(len(chunk), 1, 1) for k, v in embeds.items()},
        **({"height": height, "width": width} if job.mode == "txt2img" else extra),
    ).images
    arrays = decode_latents(pipe, latents, chunk)
    return [
        Generated(Image.fromarray(arr), _params(pipe, info, job, s))
        for s, arr in zip(chunk, arrays, strict=True)
    ]


def _params(pipe, info: PipelineInfo, job: _Job, seed: int) -> GenerationParams:
    sched = info.scheduler
    return GenerationParams(
        prompt=job.prompt,
        negative_prompt=job.negative_prompt or "",
        seed=seed,
        steps=job.steps,
        guidance_scale=job.guidance_scale,
        width=job.size[0],
        height=job.size[1],
        sampler=SCHEDULERS[sched][2] if sched else type(pipe.scheduler).__name__.removesuffix("Scheduler"),
        model=info.model,
        loras=list(info.loras),
        lora_scales=list(info.lora_scales),
        scheduler=sched,
        model_hash=info.model_hash,
        lora_hashes=list(info.lora_hashes),
        a1111_loras=list(info.a1111_loras),
        a1111_lora_hashes=list(info.a1111_lora_hashes),
        mode=job.mode,
        strength=job.strength if job.mode != "txt2img" else None,
        guidance_rescale=job.guidance_rescale or None,
        version=__version__,
    )


def _reconstruct(
    pipe, info: PipelineInfo, job: _Job, init_image: Image.Image, seeds: list[int]
) -> list[Generated]:
    """img2img with no denoising step left: the VAE's round trip of the init image, for every seed."""
    from diffusers.image_processor import VaeImageProcessor

    pixels = (
        VaeImageProcessor().preprocess(_as_image(init_image, job.size, "RGB")).to(pipe.device, pipe.vae.dtype)
    )
    with torch.no_grad():
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    (arr,) = decode_latents(pipe, latents, seeds[:1])
    return [Generated(Image.fromarray(arr), _params(pipe, info, job, s)) for s in seeds]


def _mode_pipeline(pipe, mode, init_image, mask_image, size, strength):
    """The pipeline class for the mode, sharing the loaded components (no second copy in memory)."""
    if mode == "txt2img":
        return pipe, {}
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    cls = StableDiffusionImg2ImgPipeline if mode == "img2img" else StableDiffusionInpaintPipeline
    runner = cls(**pipe.components)
    runner.set_progress_bar_config(disable=True)
    extra = {"image": _as_image(init_image, size, "RGB"), "strength": strength}
    if mode == "inpaint":
        extra |= {"mask_image": _as_image(mask_image, size, "L"), "height": size[1], "width": size[0]}
    return runner, extra


def decode_latents(pipe, latents: torch.Tensor, seeds: list[int]) -> list[np.ndarray]:
    """Latents -> uint8 HxWx3 arrays, with the fp16 checks described in the module docstring."""
    if not torch.isfinite(latents).all():
        raise NonFiniteError(
            f"seeds {seeds}: the sampler produced non-finite latents (fp16 overflow in the UNet). "
            "Retry with dtype='fp32' or dtype='bf16'."
        )
    vae = pipe.vae
    scaled = latents / vae.config.scaling_factor
    with torch.no_grad():
        image = vae.decode(scaled.to(vae.dtype), return_dict=False)[0]
        why = needs_fp32_retry(image, vae.dtype)
        if why:
            log.warning("seeds %s: the %s VAE decode gave %s; decoding again in fp32", seeds, vae.dtype, why)
            original = vae.dtype
            vae.to(torch.float32)
            try:
                image = vae.decode(scaled.float(), return_dict=False)[0]
            finally:
                vae.to(original)
    if not torch.isfinite(image).all():
        raise NonFiniteError(f"seeds {seeds}: the decoded image has non-finite values even in fp32")
    arr = pipe.image_processor.postprocess(image.float(), output_type="np")
    return [(a * 255).round().clip(0, 255).astype("uint8") for a in arr]


def _check_recorded_loras(png, loras: list, hashes: list[str]) -> None:
    """A PNG names files; what sits at those paths now may be another LoRA (retrained in place, or
    a PNG from someone else's machine naming a path on this one). Refused unless its A1111 hash is
    the one recorded; ``--lora`` takes a file on purpose."""
    for path, recorded in zip(loras, hashes, strict=False):
        file = lora_file(path)
        if not recorded or not file.is_file():
            continue  # a missing file is named when loading; PNGs from before hashes were recorded
        now = lora_hash(file)
        if now != recorded:
            raise InvalidInput(
                f"{png}: names the LoRA {file}, but that file is not the one that made the image (A1111 "
                f"hash {recorded} recorded, {now} now: retrained or replaced). Pass --lora {file} to use "
                "it anyway, or point --lora at the file that made it"
            )


def regenerate_from_png(
    png: str | Path,
    *,
    base: str | None = None,
    lora: str | Path | list[str | Path] | None = None,
    lora_scale: float | list[float] | None = None,
) -> Generated:
    """Re-create an image from the settings our JSON chunk recorded in it.

    ``base``/``lora`` replace the recorded model/LoRAs (moved files); ``lora_scale`` replaces the
    recorded scales. Without it the recorded scales are kept when as many LoRAs are given as were
    recorded, else each new LoRA gets scale 1."""
    meta = read_metadata(png)["params"]
    if meta is None:
        raise InvalidInput(
            f"{png}: has no dreambooth_kit settings (only images made by dreambooth-kit generate can be "
            "re-created); generate with --base, --prompt and --seed instead"
        )
    if meta.mode != "txt2img":
        raise InvalidInput(
            f"{png}: was made with {meta.mode}; only txt2img images can be re-created from the PNG "
            "(run generate with --init-image again)"
        )
    loras: list[str | Path] = list(meta.loras)
    scales = list(meta.lora_scales)
    if lora is None:  # the PNG's own files: loaded only if they are the ones that made it
        _check_recorded_loras(png, loras, list(meta.lora_hashes))
    if base is None and meta.model_hash:
        now = model_hash(resolve_model(meta.model))  # None for a hub id: nothing local to compare
        if now is not None and now != meta.model_hash:
            raise InvalidInput(
                f"{png}: names the base model {meta.model}, but it is not the one that made the image "
                f"(model hash {meta.model_hash} recorded, {now} now). Pass --base to use it anyway"
            )
    if lora is not None:
        loras = [lora] if isinstance(lora, (str, Path)) else list(lora)
    if lora_scale is not None:
        scales = lora_scale if isinstance(lora_scale, list) else [lora_scale] * len(loras)
    elif len(scales) != len(loras):
        scales = [1.0] * len(loras)
    pipe = load_pipeline(base or meta.model, lora=loras or None, lora_scale=scales, scheduler=meta.scheduler)
    return generate(
        pipe,
        meta.prompt,
        negative_prompt=meta.negative_prompt,
        seeds=[meta.seed],
        steps=meta.steps,
        guidance_scale=meta.guidance_scale,
        height=meta.height,
        width=meta.width,
        guidance_rescale=meta.guidance_rescale or 0.0,
    )[0]

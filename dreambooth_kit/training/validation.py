"""Sample images from the model being trained, every ``validation.every_steps`` steps.

Validation must leave training exactly as it found it: the same RNG streams, the same module modes
and the same dtypes (the training UNet is never cast: under fp16 that would turn its fp32 LoRA
params to fp16 and the GradScaler would refuse them). Images follow the inference rule (one CPU
generator per image, seed + i), so step-to-step grids are comparable.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from dreambooth_kit.inference.generate import generate
from dreambooth_kit.inference.images import make_grid
from dreambooth_kit.inference.pipeline import Pipeline, PipelineInfo
from dreambooth_kit.inference.pngmeta import save_png

if TYPE_CHECKING:
    from dreambooth_kit.training.loop import LoopState, RunSettings

log = logging.getLogger("dreambooth_kit")


@contextlib.contextmanager
def _preserved_state(*models: torch.nn.Module | None) -> Iterator[None]:
    """Restore every RNG and each submodule's train/eval flag afterwards, so a run with validation
    follows the same training trajectory as one without (dropout, timesteps, noise, shuffling)."""
    modes = [(m, m.training) for model in models if model is not None for m in model.modules()]
    cpu, py, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        random.setstate(py)
        np.random.set_state(np_state)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _mixed_precision(unet: torch.nn.Module, vae: torch.nn.Module) -> Iterator[None]:
    """Autocast when the frozen base is half precision (LoRA params stay fp32; casting them would
    corrupt the optimizer's view). The VAE decodes outside autocast in its own dtype: it is kept
    fp32 under fp16 training because the SD2 VAE overflows in fp16."""
    half = next((p.dtype for p in unet.parameters() if p.dtype in (torch.float16, torch.bfloat16)), None)
    if half is None:
        yield
        return
    decode = vae.decode

    def decode_in_vae_dtype(z: torch.Tensor, *args, **kwargs):
        with torch.autocast(z.device.type, enabled=False):
            return decode(z.to(vae.dtype), *args, **kwargs)

    vae.decode = decode_in_vae_dtype  # instance attribute: shadows the method until deleted
    try:
        with torch.autocast(next(unet.parameters()).device.type, dtype=half):
            yield
    finally:
        del vae.decode


def run_validation(
    settings: RunSettings,
    *,
    unet,
    text_encoder,
    vae,
    tokenizer,
    scheduler,
    step: int,
    output_dir: Path,
    accelerator,
) -> list[Path]:
    """Write ``samples/step-NNNNNN/p{j}-{seed}.png`` and ``grid.png`` (rows = prompts, columns =
    seeds), log them to tensorboard/wandb, and return the paths (grid last). Main process only.
    ``settings`` gives the prompts, the validation section, the resolution and the model's name."""
    if not accelerator.is_main_process:
        return []
    v = settings.validation
    unet, text_encoder = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
    pipe = training_pipeline(unet, text_encoder, vae, tokenizer, scheduler, settings.model_name)
    res = settings.data.resolution
    rows: list[list[Image.Image]] = []
    paths: list[Path] = []
    folder = Path(output_dir) / "samples" / f"step-{step:06d}"
    with _preserved_state(unet, text_encoder, vae), _mixed_precision(unet, vae):
        for m in (unet, text_encoder, vae):
            m.eval()
        for j, prompt in enumerate(settings.validation_prompts):
            out = generate(
                pipe, prompt, negative_prompt=v.negative_prompt, seed=v.seed, num_images=v.num_images,
                steps=v.steps, guidance_scale=v.guidance_scale, height=res, width=res,
            )  # fmt: skip
            rows.append([img for img, _ in out])
            paths += [save_png(img, p, folder / f"p{j}-{p.seed}.png") for img, p in out]
    make_grid([img for row in rows for img in row], cols=v.num_images).save(folder / "grid.png")
    _log(accelerator, rows, settings.validation_prompts, v.seed, step)
    return [*paths, folder / "grid.png"]


def training_pipeline(unet, text_encoder, vae, tokenizer, scheduler, model_name: str):
    """A pipeline around the models being trained (unwrapped), for sampling during training."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        # A private copy: set_timesteps mutates the scheduler, and the caller's must stay as it is.
        scheduler=type(scheduler).from_config(scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return Pipeline(pipe, PipelineInfo(model=model_name))  # PNG metadata; the LoRA is in training


def score_during_training(run: LoopState, scheduler) -> dict:
    """`evaluate`'s numbers for the model at this step (``run.scorer``), with training's RNG and
    module modes restored afterwards, as for the samples."""
    acc = run.accelerator
    unet = acc.unwrap_model(run.unet)
    text_encoder = acc.unwrap_model(run.text_encoder or run.comps.text_encoder)
    vae = run.comps.vae
    pipe = training_pipeline(unet, text_encoder, vae, run.comps.tokenizer, scheduler, run.settings.model_name)
    with _preserved_state(unet, text_encoder, vae), _mixed_precision(unet, vae):
        for m in (unet, text_encoder, vae):
            m.eval()
        return run.scorer(pipe, run.step, acc, run.out)


def validate_during_training(run: LoopState) -> None:
    """The training loop's validation callback: samples from the model at the current step (main
    process), then every process waits for it."""
    acc = run.accelerator
    scheduler = _sampler(run)
    if acc.is_main_process:
        paths = run_validation(
            run.settings,
            unet=run.unet,
            text_encoder=run.text_encoder or run.comps.text_encoder,
            vae=run.comps.vae,
            tokenizer=run.comps.tokenizer,
            scheduler=scheduler,
            step=run.step,
            output_dir=run.out,
            accelerator=acc,
        )
        log.info("validation samples at step %d: %s (%d images)", run.step, paths[-1], len(paths) - 1)
        if run.scorer is not None:
            _record(run, score_during_training(run, scheduler))
    acc.wait_for_everyone()


def score_base_model(run: LoopState) -> None:
    """train.stop=auto, before the first step: the untrained weights' scores as the base model's row
    (a LoRA starts as the base model; so does a full fine-tune), the floor of the rule's PRES."""
    if run.accelerator.is_main_process and run.scorer is not None:
        _record(run, score_during_training(run, _sampler(run)))
    run.accelerator.wait_for_everyone()


def _record(run: LoopState, scores: dict) -> None:
    if run.auto_stop is not None:
        run.auto_stop.add(run.step, scores)


def _sampler(run: LoopState):
    from diffusers import DPMSolverMultistepScheduler

    # DPM-Solver++ (2M): good samples in ~25 steps, for epsilon and v-prediction alike.
    return DPMSolverMultistepScheduler.from_config(run.comps.noise_scheduler.config)


def _log(accelerator, rows: list[list[Image.Image]], prompts: Sequence[str], seed: int, step: int) -> None:
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for j, row in enumerate(rows):
                batch = np.stack([np.asarray(img) for img in row])
                tracker.writer.add_images(f"validation/p{j}", batch, step, dataformats="NHWC")
            tracker.writer.flush()  # visible in tensorboard now, not at the next scalar log
        elif tracker.name == "wandb":
            try:
                import wandb
            except ImportError:  # a stand-in tracker named "wandb": the PNG files are the record
                continue
            images = {
                f"validation/p{j}": [
                    wandb.Image(img, caption=f"{prompts[j]} | seed {seed + i}") for i, img in enumerate(row)
                ]
                for j, row in enumerate(rows)
            }
            tracker.log(images, step=step)

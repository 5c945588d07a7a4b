"""The training loop: one optimizer step at a time, with the loss, the NaN guard, checkpoints,
validation and the preemption flag. ``train()`` (train.py) sets everything up and calls :func:`run`."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .caching import posterior_sample
from .config import DreamBoothConfig
from .losses import diffusion_loss, diffusion_target, snr_weights

log = logging.getLogger("dreambooth_kit")


# ------------------------------------------------------------------ the loop


@dataclass
class LoopState:
    """Everything the loop reads and updates (data only; the steps are functions below)."""

    cfg: DreamBoothConfig
    accelerator: Any
    comps: Any
    unet: Any
    text_encoder: Any
    params: list
    optimizer: Any
    lr_scheduler: Any
    out: Path
    step: int = 0
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    guard: Any = None
    bad_cycle: bool = False  # a non-finite loss inside the current accumulation cycle
    last_step_ok: bool = True
    last_checkpoint: Path | None = None
    epoch: int = 0  # the data position, saved with each checkpoint for an exact resume
    batch_in_epoch: int = 0


def run(ctx: LoopState, dataloader, sampler, latent_cache, position: dict, signals) -> None:
    from tqdm.auto import tqdm

    from .caching import PromptEncoder
    from .guards import NonFiniteGuard, TrainingInterrupted

    cfg, acc, t = ctx.cfg, ctx.accelerator, ctx.cfg.train
    ctx.guard = NonFiniteGuard(t.max_nonfinite_steps)
    ctx.step, epoch, in_epoch = position["step"], position["epoch"], position["batch_in_epoch"]
    ctx.epoch, ctx.batch_in_epoch = epoch, in_epoch
    encode = PromptEncoder(
        ctx.comps.tokenizer,
        ctx.text_encoder or ctx.comps.text_encoder,
        ctx.text_encoder is not None,
        acc.device,
    )
    _release_frozen(ctx, dataloader.dataset, encode, latent_cache)
    bar = tqdm(total=t.max_steps, initial=ctx.step, disable=not acc.is_main_process, desc="train")
    ctx.unet.train()
    t_step = time.perf_counter()
    while ctx.step < t.max_steps:
        # Global batches consumed this epoch -> sample index to start from (exact resume).
        sampler.set_position(epoch, in_epoch * t.batch_size * acc.num_processes)
        for batch in dataloader:
            in_epoch += 1
            loss_value, parts, finite = _step(ctx, batch, encode, latent_cache)
            if not acc.sync_gradients:
                continue
            ctx.step += 1
            ctx.guard.record(ctx.step, ctx.last_step_ok, "loss" if not finite else "gradient")
            ctx.losses.append(loss_value)
            ctx.step_seconds.append(time.perf_counter() - t_step)  # includes data loading
            lr = ctx.lr_scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            if finite:
                acc.log(
                    {"loss": loss_value, "lr": lr, "step_time": ctx.step_seconds[-1], **parts}, step=ctx.step
                )
            if ctx.step % t.log_every == 0 or ctx.step == t.max_steps:
                log.info("step %d/%d loss %.4f lr %.2e", ctx.step, t.max_steps, loss_value, lr)
            if _due(cfg.validation.every_steps, ctx.step):
                _validate(ctx)
            stop = signals.signum is not None
            ctx.epoch, ctx.batch_in_epoch = epoch, in_epoch
            if ctx.last_step_ok and (stop or _due(cfg.checkpoint.every_steps, ctx.step)):
                save_step_checkpoint(ctx)
            if stop:
                bar.close()
                hint = f"dreambooth-kit train --config {ctx.out / 'config.yaml'} train.resume=latest"
                err = TrainingInterrupted(ctx.step, signals.signum, ctx.last_checkpoint, hint)
                log.warning("%s", err)
                raise err
            t_step = time.perf_counter()
            if ctx.step >= t.max_steps:
                break
        else:
            epoch, in_epoch = epoch + 1, 0
    bar.close()


def _release_frozen(ctx: LoopState, dataset, encode, latent_cache) -> None:
    """Without validation nothing needs the frozen text encoder or VAE once every prompt and image
    is cached: encode them all now and drop both models (SD 2.1: 1.4 GB + 0.3 GB in fp32, about
    15% of a LoRA run's peak memory on CPU; on a GPU, that much VRAM)."""
    import gc

    if ctx.cfg.validation.every_steps is not None:
        return
    dropped = []
    if not encode.trained:
        prompts = [e.instance_prompt for e in dataset.examples] + [
            e.class_prompt for e in dataset.examples if e.class_prompt
        ]
        encode(prompts)
        encode.text_encoder = ctx.comps.text_encoder = None
        dropped.append("text encoder")
    if latent_cache is not None:
        flips = (False, True) if ctx.cfg.data.random_flip else (False,)
        paths = dict.fromkeys([e.instance for e in dataset.examples] + dataset.class_images)
        latent_cache.fill([(str(p), f) for p in paths for f in flips])
        latent_cache.vae = ctx.comps.vae = None
        dropped.append("VAE")
    if dropped:
        gc.collect()
        log.info("cached every prompt/latent; released the frozen %s", " and ".join(dropped))


def _due(every: int | None, step: int) -> bool:
    return every is not None and step % every == 0


def _step(ctx: LoopState, batch, encode, latent_cache) -> tuple[float, dict, bool]:
    """One micro-batch under accelerate's gradient accumulation; an optimizer step on sync.
    A non-finite loss or gradient skips the optimizer step (``ctx.last_step_ok = False``)."""
    acc, t, cfg = ctx.accelerator, ctx.cfg.train, ctx.cfg
    scheduler, vae = ctx.comps.noise_scheduler, ctx.comps.vae
    models = [ctx.unet] + ([ctx.text_encoder] if ctx.text_encoder is not None else [])
    with acc.accumulate(*models):
        if latent_cache is not None:
            latents = latent_cache.sample(batch["keys"])
        else:
            with torch.no_grad():
                pixels = batch["pixel_values"].to(acc.device, dtype=next(vae.parameters()).dtype)
                dist = vae.encode(pixels).latent_dist
                latents = posterior_sample(dist.mean, dist.logvar) * vae.config.scaling_factor
        # contiguous: the VAE's conv output can be channels-last, and randn_like follows the
        # input's memory layout, so the same random stream would land on other elements.
        latents = latents.float().contiguous()
        noise = torch.randn_like(latents)
        if t.noise_offset:
            noise = noise + t.noise_offset * torch.randn(
                latents.shape[0], latents.shape[1], 1, 1, device=latents.device
            )
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
        ).long()
        noisy = scheduler.add_noise(latents, noise, timesteps)
        cond = encode(batch["prompts"])
        unet_dtype = (
            next(p.dtype for p in ctx.unet.parameters() if not p.requires_grad)
            if (cfg.adapter.type == "lora")
            else torch.float32
        )
        pred = ctx.unet(noisy.to(unet_dtype), timesteps, cond.to(unet_dtype), return_dict=False)[0]
        target = diffusion_target(scheduler, latents, noise, timesteps)
        prediction_type = scheduler.config.prediction_type
        weights = snr_weights(scheduler, timesteps, t.snr_gamma, prediction_type) if t.snr_gamma else None
        loss, parts = diffusion_loss(
            pred,
            target,
            num_instance=batch["num_instance"],
            prior_loss_weight=cfg.prior.prior_loss_weight,
            weights=weights,
        )
        # Every rank must agree, or DDP's gradient all-reduce would wait forever for a rank that
        # skipped backward.
        finite = bool(acc.gather(torch.isfinite(loss.detach()).reshape(1)).all())
        if finite:
            acc.backward(loss)
        else:
            ctx.bad_cycle = True
        if acc.sync_gradients:
            ok = not ctx.bad_cycle
            if ok:
                norm = acc.clip_grad_norm_(ctx.params, t.max_grad_norm)
                if acc.scaler is None and norm is not None and not torch.isfinite(norm):
                    ok = False  # (an fp16 GradScaler skips such a step itself and lowers its scale)
            if ok:
                ctx.optimizer.step()
                if acc.optimizer_step_was_skipped:
                    ok = False  # fp16 overflow: GradScaler skipped it; the LR does not advance
                else:
                    ctx.lr_scheduler.step()
            ctx.last_step_ok, ctx.bad_cycle = ok, False
        ctx.optimizer.zero_grad(set_to_none=True)
    value = acc.gather(loss.detach().reshape(1)).mean().item() if finite else float("nan")
    return value, parts, finite


def _validate(ctx: LoopState) -> None:
    from diffusers import DPMSolverMultistepScheduler

    from .validation import run_validation

    acc = ctx.accelerator
    if acc.is_main_process:
        run_validation(
            ctx.cfg,
            unet=ctx.unet,
            text_encoder=ctx.text_encoder or ctx.comps.text_encoder,
            vae=ctx.comps.vae,
            tokenizer=ctx.comps.tokenizer,
            # DPM-Solver++ (2M): good samples in ~25 steps, for epsilon and v-prediction alike.
            scheduler=DPMSolverMultistepScheduler.from_config(ctx.comps.noise_scheduler.config),
            step=ctx.step,
            output_dir=ctx.out,
            accelerator=acc,
        )
    acc.wait_for_everyone()


def save_step_checkpoint(ctx: LoopState) -> Path:
    """A checkpoint of the current step (every process must call it)."""
    from .checkpoints import save_checkpoint

    ctx.last_checkpoint = save_checkpoint(
        ctx.accelerator,
        ctx.out,
        ctx.step,
        extra_state={"epoch": ctx.epoch, "batch_in_epoch": ctx.batch_in_epoch},
        run_config=ctx.cfg.to_dict(),
        keep_last=ctx.cfg.checkpoint.keep_last,
    )
    return ctx.last_checkpoint

"""DreamBooth-LoRA training with prior preservation.

``train(cfg)`` reads as a table of contents; each step is a small function below it. Runs in-process,
as ``dreambooth-kit train`` and as ``accelerate launch -m dreambooth_kit.train --config X``.
"""

from __future__ import annotations

import argparse
import functools
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import DreamBoothConfig, load_config, save_config

log = logging.getLogger("dreambooth_kit")

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


@dataclass
class TrainResult:
    output_dir: Path
    lora_dir: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)  # wall time of each optimizer step
    seconds: float = 0.0
    class_images_generated: int = 0

    @property
    def lora_path(self) -> Path:
        return self.lora_dir / LORA_WEIGHTS


# ------------------------------------------------------------------ the loss (pure functions)


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """What the UNet must predict, from the scheduler's ``prediction_type`` (never assumed)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type {kind!r} is not supported for training (epsilon, v_prediction)")


def snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023) per sample.

    For epsilon: min(SNR, γ) / SNR. For v-prediction the v-loss already equals (SNR + 1) x the
    epsilon-loss, so the weight is min(SNR, γ) / (SNR + 1) (design.md §4.5).
    """
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def diffusion_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    *,
    num_instance: int,
    prior_loss_weight: float = 1.0,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """MSE loss; with prior preservation the batch is [instance rows | class rows].

    loss = mean(instance MSE) + prior_loss_weight * mean(class MSE), as in the DreamBooth paper.
    ``weights`` (per sample, e.g. min-SNR) scale each sample's MSE. Computed in fp32.
    """
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(
        dim=list(range(1, model_pred.ndim))
    )
    if weights is not None:
        per_sample = per_sample * weights.float()
    instance = per_sample[:num_instance].mean()
    parts = {"loss_instance": instance.item()}
    loss = instance
    if num_instance < per_sample.shape[0]:
        prior = per_sample[num_instance:].mean()
        loss = instance + prior_loss_weight * prior
        parts["loss_prior"] = prior.item()
    return loss, parts


# ------------------------------------------------------------------ train(), the table of contents


def train(cfg: DreamBoothConfig) -> TrainResult:
    from accelerate.utils import set_seed

    from .models import load_components, resolve_model
    from .preflight import preflight

    t0 = time.perf_counter()
    out = _prepare_output_dir(cfg)
    source = resolve_model(cfg.model.pretrained, allow_pickle=cfg.model.allow_pickle)
    report = preflight(cfg, prediction_type=_prediction_type(cfg, source), source=source)
    accelerator = _make_accelerator(cfg, out)
    set_seed(cfg.train.seed)
    if accelerator.is_main_process:
        save_config(cfg, out / "config.yaml")

    class_images = _class_images(cfg, len(report.instance.images), accelerator)
    comps = load_components(cfg.model)
    unet, text_encoder, params = _setup_models(cfg, comps, accelerator)
    dataloader = _dataloader(cfg, report.instance.images, class_images)
    optimizer = _optimizer(cfg, params, accelerator.num_processes)
    lr_scheduler = _lr_scheduler(cfg, optimizer, accelerator.num_processes)
    unet, text_encoder, optimizer, dataloader, lr_scheduler = _prepare(
        accelerator, cfg, unet, text_encoder, optimizer, dataloader, lr_scheduler
    )

    losses, step_seconds = _loop(
        cfg, accelerator, comps, unet, text_encoder, params, optimizer, dataloader, lr_scheduler
    )

    lora_dir = _save_lora(cfg, accelerator, unet, text_encoder, out)
    accelerator.end_training()
    seconds = time.perf_counter() - t0
    if accelerator.is_main_process:
        log.info("trained %d steps in %.1f s; LoRA: %s", len(losses), seconds, lora_dir / LORA_WEIGHTS)
    return TrainResult(
        output_dir=out,
        lora_dir=lora_dir,
        steps=len(losses),
        losses=losses,
        step_seconds=step_seconds,
        seconds=seconds,
        class_images_generated=class_images.generated if class_images else 0,
    )


# ------------------------------------------------------------------ the steps


def _prepare_output_dir(cfg: DreamBoothConfig) -> Path:
    out = Path(cfg.train.output_dir)
    if (out / "lora" / LORA_WEIGHTS).exists() and not cfg.train.overwrite:
        raise FileExistsError(
            f"{(out / 'lora').resolve()} already holds a trained LoRA. Choose another train.output_dir, "
            "or set train.overwrite=true to replace it."
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def _prediction_type(cfg: DreamBoothConfig, source: str) -> str | None:
    if cfg.model.prediction_type:
        return cfg.model.prediction_type
    path = Path(source) / "scheduler" / "scheduler_config.json"
    if path.exists():
        import json

        return json.loads(path.read_text()).get("prediction_type", "epsilon")
    return None


def _make_accelerator(cfg: DreamBoothConfig, out: Path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

    t = cfg.train
    log_with = None if t.report_to == "none" else t.report_to
    if log_with == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ImportError(
                "train.report_to=tensorboard needs tensorboard: pip install 'dreambooth_kit[tracking]'"
            ) from None
    # accelerate keeps its state in process-wide singletons: a second train() in the same process
    # (a notebook re-run with other settings) would fail with "AcceleratorState has already been
    # initialized". Clear the per-run parts; the distributed (PartialState) part stays as launched.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    if log_with:
        accelerator.init_trackers("dreambooth_kit", config=_flat(cfg.to_dict()))
    return accelerator


def _flat(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flat(v, key + "."))
        else:
            flat[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat


def _class_images(cfg: DreamBoothConfig, n_instance: int, accelerator):
    if not cfg.prior.with_prior_preservation:
        return None
    from .prior import ensure_class_images

    result = None
    if accelerator.is_main_process:  # rank 0 generates; the others must not touch the folder meanwhile
        result = ensure_class_images(cfg, n_instance, device=str(accelerator.device))
    accelerator.wait_for_everyone()
    if result is None:  # every other rank reads the finished set
        result = ensure_class_images(cfg, n_instance, device=str(accelerator.device), is_main_process=False)
    return result


def _setup_models(cfg: DreamBoothConfig, comps, accelerator):
    """Freeze the base, add LoRA, choose dtypes and attention, keep trainable params in fp32."""
    from diffusers.training_utils import cast_training_params

    from .adapters import add_lora
    from .models import frozen_dtype

    dtype = frozen_dtype(accelerator.device, cfg.train.mixed_precision)
    # The SD 2.x VAE overflows in fp16 (NaN latents at 512+ px): it stays fp32 under fp16.
    _move(comps.vae, accelerator.device, torch.float32 if dtype == torch.float16 else dtype)
    _move(comps.text_encoder, accelerator.device, dtype)
    _move(comps.unet, accelerator.device, dtype)
    set_attention(comps.unet, cfg.train.attention)
    params = add_lora(comps.unet, comps.text_encoder, cfg.adapter)
    models = [comps.unet] + ([comps.text_encoder] if cfg.adapter.train_text_encoder else [])
    if dtype != torch.float32:
        # Under fp16 AMP the optimizer must see fp32 params, or GradScaler refuses
        # ("Attempting to unscale FP16 gradients"); LoRA adds ~0.1% params, so this costs little.
        cast_training_params(models, dtype=torch.float32)
    if cfg.train.gradient_checkpointing:
        comps.unet.enable_gradient_checkpointing()
        if cfg.adapter.train_text_encoder:
            comps.text_encoder.gradient_checkpointing_enable()
    te = comps.text_encoder if cfg.adapter.train_text_encoder else None
    return comps.unet, te, params


def _move(model: torch.nn.Module, device, dtype: torch.dtype) -> None:
    model.to(device)
    if next(model.parameters()).dtype != dtype:  # a no-op cast still warns in diffusers 0.42
        model.to(dtype=dtype)


def set_attention(unet, kind: str) -> str:
    """SDPA (PyTorch's fused attention; no fp16 overflow) by default, xformers on request."""
    if kind == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise ImportError(
                "train.attention=xformers needs xformers: pip install 'dreambooth_kit[xformers]', "
                "or use train.attention=sdpa (as fast on PyTorch >= 2.0)"
            ) from None
        unet.enable_xformers_memory_efficient_attention()
        return "xformers"
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    return "sdpa"


def _dataloader(cfg: DreamBoothConfig, instance_images, class_images):
    from .data import DreamBoothDataset, collate

    with_prior = class_images is not None
    ds = DreamBoothDataset(
        instance_images,
        cfg.data.instance_prompt,
        cfg.data.resolution,
        class_images=class_images.images if with_prior else None,
        class_prompt=cfg.prior.class_prompt if with_prior else None,
        center_crop=cfg.data.center_crop,
        random_flip=cfg.data.random_flip,
    )
    return torch.utils.data.DataLoader(
        ds,
        batch_size=cfg.train.batch_size,
        shuffle=True,
        collate_fn=functools.partial(collate, with_prior=with_prior),  # picklable for num_workers > 0
        num_workers=cfg.data.num_workers,
    )


def _optimizer(cfg: DreamBoothConfig, params, num_processes: int):
    t = cfg.train
    lr = t.learning_rate
    if t.scale_lr:
        lr *= t.gradient_accumulation_steps * t.batch_size * num_processes
    if t.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ImportError(
                "train.use_8bit_adam needs bitsandbytes (CUDA only): pip install 'dreambooth_kit[bnb]', "
                "or set train.use_8bit_adam=false"
            ) from None
        cls = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
    return cls(
        params,
        lr=lr,
        betas=(t.adam_beta1, t.adam_beta2),
        weight_decay=t.adam_weight_decay,
        eps=t.adam_epsilon,
    )


def _lr_scheduler(cfg: DreamBoothConfig, optimizer, num_processes: int):
    from diffusers.optimization import get_scheduler

    # accelerate steps a prepared scheduler once per process per optimizer step: scale both counts.
    return get_scheduler(
        cfg.train.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.train.lr_warmup_steps * num_processes,
        num_training_steps=cfg.train.max_steps * num_processes,
    )


def _prepare(accelerator, cfg, unet, text_encoder, optimizer, dataloader, lr_scheduler):
    if text_encoder is not None:
        unet, text_encoder, optimizer, dataloader, lr_scheduler = accelerator.prepare(
            unet, text_encoder, optimizer, dataloader, lr_scheduler
        )
    else:
        unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(
            unet, optimizer, dataloader, lr_scheduler
        )
    return unet, text_encoder, optimizer, dataloader, lr_scheduler


class _PromptEncoder:
    """Tokenize + encode prompts; caches embeddings while the text encoder is frozen (each prompt
    is encoded once instead of every step: ~0.75 s/step saved at SD 2.1 size)."""

    def __init__(self, tokenizer, text_encoder, trained: bool, device):
        self.tokenizer, self.text_encoder, self.trained, self.device = (
            tokenizer,
            text_encoder,
            trained,
            device,
        )
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        if self.trained:
            return self._encode(prompts)
        for p in set(prompts) - self.cache.keys():
            with torch.no_grad():
                self.cache[p] = self._encode([p])[0]
        return torch.stack([self.cache[p] for p in prompts])

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        # SD 2.x conditions on the last hidden state: the diffusers text encoder already is the
        # penultimate OpenCLIP layer (23 of 24), so no extra clip-skip here.
        return self.text_encoder(ids)[0]


def _loop(
    cfg, accelerator, comps, unet, text_encoder, params, optimizer, dataloader, lr_scheduler
) -> tuple[list[float], list[float]]:
    from tqdm.auto import tqdm

    t = cfg.train
    scheduler, vae = comps.noise_scheduler, comps.vae
    prediction_type = scheduler.config.prediction_type
    encode = _PromptEncoder(
        comps.tokenizer, text_encoder or comps.text_encoder, text_encoder is not None, accelerator.device
    )
    vae_dtype = next(vae.parameters()).dtype
    unet_dtype = next(p.dtype for p in unet.parameters() if not p.requires_grad)  # the frozen base's
    losses: list[float] = []
    step_seconds: list[float] = []
    step = 0
    t_step = time.perf_counter()
    bar = tqdm(total=t.max_steps, disable=not accelerator.is_main_process, desc="train")
    unet.train()
    while step < t.max_steps:
        for batch in dataloader:
            with accelerator.accumulate(unet):
                with torch.no_grad():
                    pixels = batch["pixel_values"].to(accelerator.device, dtype=vae_dtype)
                    latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                latents = latents.float()
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
                pred = unet(noisy.to(unet_dtype), timesteps, cond.to(unet_dtype), return_dict=False)[0]
                target = diffusion_target(scheduler, latents, noise, timesteps)
                weights = (
                    snr_weights(scheduler, timesteps, t.snr_gamma, prediction_type) if t.snr_gamma else None
                )
                loss, parts = diffusion_loss(
                    pred,
                    target,
                    num_instance=batch["num_instance"],
                    prior_loss_weight=cfg.prior.prior_loss_weight,
                    weights=weights,
                )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, t.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            step += 1
            loss_value = accelerator.gather(loss.detach()).mean().item()
            losses.append(loss_value)
            step_seconds.append(time.perf_counter() - t_step)  # includes data loading, as a user sees it
            t_step = time.perf_counter()
            lr = lr_scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            accelerator.log({"loss": loss_value, "lr": lr, "step_time": step_seconds[-1], **parts}, step=step)
            if step % t.log_every == 0 or step == t.max_steps:
                log.info("step %d/%d loss %.4f lr %.2e", step, t.max_steps, loss_value, lr)
            if step >= t.max_steps:
                break
    bar.close()
    return losses, step_seconds


def _save_lora(cfg: DreamBoothConfig, accelerator, unet, text_encoder, out: Path) -> Path:
    """Write ``lora/pytorch_lora_weights.safetensors`` (diffusers format + adapter metadata)
    and the resolved config beside it, through a temp folder and a rename."""
    from diffusers import StableDiffusionPipeline

    from .adapters import lora_metadata, lora_state_dicts

    lora_dir = out / "lora"
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return lora_dir
    unet_sd, te_sd = lora_state_dicts(
        accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder) if text_encoder else None
    )
    bad = [k for k, v in {**unet_sd, **(te_sd or {})}.items() if not torch.isfinite(v).all()]
    if bad:
        raise FloatingPointError(
            f"refusing to write a LoRA with non-finite weights ({len(bad)} tensors, e.g. {bad[0]}); "
            "lower train.learning_rate or use train.mixed_precision=bf16"
        )
    tmp = out / ".tmp-lora"
    if tmp.exists():
        shutil.rmtree(tmp)
    StableDiffusionPipeline.save_lora_weights(
        tmp,
        unet_lora_layers=unet_sd,
        text_encoder_lora_layers=te_sd,
        unet_lora_adapter_metadata=lora_metadata(cfg.adapter),
        text_encoder_lora_adapter_metadata=lora_metadata(cfg.adapter, text_encoder=True) if te_sd else None,
        safe_serialization=True,
    )
    save_config(cfg, tmp / "config.yaml")
    if lora_dir.exists():  # only reachable with train.overwrite=true (checked before training)
        shutil.rmtree(lora_dir)
    tmp.rename(lora_dir)
    return lora_dir


# ------------------------------------------------------------------ accelerate launch -m dreambooth_kit.train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dreambooth_kit.train",
        description="Train a DreamBooth LoRA (use under `accelerate launch`).",
    )
    parser.add_argument("--config", required=True, help="YAML path or packaged config name (tiny.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=400")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    result = train(load_config(args.config, args.overrides))
    print(f"LoRA: {result.lora_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

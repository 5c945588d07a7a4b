"""The final outputs of a run: the LoRA (diffusers format + adapter metadata) or, for full
fine-tunes, a complete pipeline. Both are written to a temp folder and renamed, never from
non-finite weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .config import DreamBoothConfig, save_config

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def save_final(cfg, accelerator, comps, unet, text_encoder, out: Path, source: str) -> Path:
    if cfg.adapter.type == "full":
        return save_pipeline(cfg, accelerator, comps, unet, text_encoder, out, source)
    return save_lora(cfg, accelerator, unet, text_encoder, out)


def refuse_non_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise FloatingPointError(
            f"refusing to write a {what} with non-finite weights ({len(bad)} tensors, e.g. {bad[0]}); "
            "lower train.learning_rate or use train.mixed_precision=bf16"
        )


def save_pipeline(cfg, accelerator, comps, unet, text_encoder, out: Path, source: str) -> Path:
    """Full fine-tune: a complete diffusers pipeline (safetensors) that
    ``StableDiffusionPipeline.from_pretrained`` loads, written to a temp folder and renamed."""
    from diffusers import StableDiffusionPipeline

    final = out / "pipeline"
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return final
    unet = accelerator.unwrap_model(unet)
    te = accelerator.unwrap_model(text_encoder) if text_encoder is not None else None
    refuse_non_finite(unet.state_dict(), "model")
    # Frozen parts are reloaded from the base in fp32, so the saved dtype is exactly save_precision.
    extra = {"text_encoder": te} if te is not None else {}
    pipe = StableDiffusionPipeline.from_pretrained(
        source, unet=unet, safety_checker=None, requires_safety_checker=False, **extra
    )
    pipe.scheduler = type(pipe.scheduler).from_config(comps.noise_scheduler.config)
    dtype = torch.float16 if cfg.train.save_precision == "fp16" else torch.float32
    tmp = out / ".tmp-pipeline"
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.to(dtype=dtype)
    pipe.save_pretrained(tmp, safe_serialization=True)
    save_config(cfg, tmp / "dreambooth_kit_config.yaml")
    if final.exists():  # only with train.overwrite or train.resume (checked before training)
        shutil.rmtree(final)
    tmp.rename(final)
    unet.to(dtype=torch.float32)
    return final


def save_lora(cfg: DreamBoothConfig, accelerator, unet, text_encoder, out: Path) -> Path:
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
    refuse_non_finite({**unet_sd, **(te_sd or {})}, "LoRA")
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
    if lora_dir.exists():  # only with train.overwrite or train.resume (checked before training)
        shutil.rmtree(lora_dir)
    tmp.rename(lora_dir)
    return lora_dir

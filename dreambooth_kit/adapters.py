"""LoRA adapters through peft, and the state dicts + metadata that diffusers' loaders read back."""

from __future__ import annotations

from typing import Any

import torch

from .config import AdapterConfig


def lora_config(cfg: AdapterConfig, *, text_encoder: bool = False):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
        lora_dropout=cfg.dropout,
        init_lora_weights=cfg.init_lora_weights,
        target_modules=list(cfg.text_encoder_target_modules if text_encoder else cfg.target_modules),
    )


def add_lora(unet: torch.nn.Module, text_encoder: torch.nn.Module | None, cfg: AdapterConfig) -> list:
    """Attach LoRA adapters (peft) to the UNet attention and, if asked, the text encoder.

    Returns the trainable parameters. Base weights stay frozen and untouched: peft wraps the
    ``to_q/to_k/to_v/to_out.0`` Linear layers and trains only ``lora_A``/``lora_B``.
    """
    unet.add_adapter(lora_config(cfg))
    if cfg.train_text_encoder:
        if text_encoder is None:
            raise ValueError("adapter.train_text_encoder needs the text encoder")
        text_encoder.add_adapter(lora_config(cfg, text_encoder=True))
    models = [unet] + ([text_encoder] if cfg.train_text_encoder else [])
    params = [p for m in models for p in m.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            f"adapter.target_modules {cfg.target_modules} matched no layer of the UNet; "
            "SD 2.x attention layers are to_q, to_k, to_v, to_out.0"
        )
    return params


def lora_state_dicts(
    unet: torch.nn.Module, text_encoder: torch.nn.Module | None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """peft state dicts converted to the diffusers key layout that ``save_lora_weights`` expects."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    unet_sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    te_sd = None
    if text_encoder is not None and getattr(text_encoder, "peft_config", None):
        te_sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder))
    # Saved in fp32 whatever the training precision: the file is small (a few MB at r=4) and
    # loaders cast to the pipeline's dtype.
    unet_sd = {k: v.detach().float().cpu().contiguous() for k, v in unet_sd.items()}
    if te_sd is not None:
        te_sd = {k: v.detach().float().cpu().contiguous() for k, v in te_sd.items()}
    return unet_sd, te_sd


def lora_metadata(cfg: AdapterConfig, *, text_encoder: bool = False) -> dict[str, Any]:
    """The LoraConfig as a dict: without it an alpha != rank LoRA reloads at the wrong scale."""
    return lora_config(cfg, text_encoder=text_encoder).to_dict()

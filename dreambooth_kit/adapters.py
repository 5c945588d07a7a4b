"""LoRA adapters through peft, and the state dicts + metadata that diffusers' loaders read back."""

from __future__ import annotations

from pathlib import Path
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


# ------------------------------------------------------------------ loading LoRAs into a pipeline


class LoraMismatchError(ValueError):
    """A LoRA that does not fit the pipeline's model (e.g. an SD 1.x LoRA on SD 2.x)."""


def lora_file(path: str | Path) -> Path:
    p = Path(path)
    return p / "pytorch_lora_weights.safetensors" if p.is_dir() else p


def check_lora_fits(unet, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse a LoRA made for another architecture before it touches the pipeline.

    SD 1.x LoRAs carry cross-attention inputs of width 768, SD 2.x has 1024: loading one into the
    other fails deep inside peft with a bare size mismatch, after half the layers were changed."""
    width = unet.config.cross_attention_dim
    for key, t in state_dict.items():
        if (
            "attn2" in key
            and (".to_k." in key or ".to_v." in key)
            and ("lora_A" in key or "lora.down" in key)
        ):
            if t.shape[-1] != width:
                raise LoraMismatchError(
                    f"{path}: this LoRA was trained for a model with cross-attention width {t.shape[-1]} "
                    f"({'SD 1.x' if t.shape[-1] == 768 else 'another model'}), but this pipeline's UNet has "
                    f"width {width} ({'SD 2.x' if width == 1024 else 'this model'}). Use a LoRA trained "
                    "on the same base model."
                )


MIN_KEY_COVERAGE = 0.9  # below this share of matching keys a LoRA is for another model


def check_lora_keys(pipe, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse files that are not LoRAs, and diffusers-format LoRAs whose layers this model lacks.

    diffusers loads whatever keys match and silently drops the rest, so a LoRA for another
    architecture can load "successfully" with a fraction of its layers (adversarial case 35)."""
    lora_like = [k for k in state_dict if "lora" in k.lower() or k.endswith(".alpha")]
    if not lora_like:
        raise LoraMismatchError(
            f"{path}: not a LoRA file (no lora_A/lora_B, lora_down/lora_up keys; e.g. {next(iter(state_dict), '?')}); "
            "is it a full model checkpoint? Pass it as the base model instead"
        )
    ours = [k for k in lora_like if k.startswith(("unet.", "text_encoder."))]
    if not ours:  # kohya/A1111 keys: diffusers converts them itself
        return
    missing = []
    for k in ours:
        prefix, rest = k.split(".", 1)
        module_path = rest.split(".lora")[0]
        model = pipe.unet if prefix == "unet" else pipe.text_encoder
        candidates = (module_path, module_path.removeprefix("text_model."), f"text_model.{module_path}")
        if not any(_has_module(model, c) for c in candidates):
            missing.append(module_path)
    if missing and 1 - len(missing) / len(ours) < MIN_KEY_COVERAGE:
        raise LoraMismatchError(
            f"{path}: {len(missing)} of {len(ours)} LoRA tensors target layers this model does not have "
            f"(e.g. {missing[0]}); it was trained for another model"
        )


def _has_module(model, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def load_lora(pipe, path: str | Path, name: str) -> str:
    """Load one LoRA as adapter ``name``; on any failure the pipeline is left as it was."""
    from safetensors.torch import load_file

    file = lora_file(path)
    if not file.exists():
        raise FileNotFoundError(f"LoRA not found: {file.resolve()}")
    if file.suffix != ".safetensors":
        raise ValueError(f"{file}: only .safetensors LoRAs are loaded (pickle files can run code)")
    try:
        state_dict = load_file(str(file))
    except Exception as e:  # truncated or not a safetensors file
        raise ValueError(f"{file}: not a readable .safetensors file ({e})") from e
    if name in {a for names in pipe.get_list_adapters().values() for a in names}:
        raise ValueError(
            f"adapter name {name!r} is already loaded; pick another or pipe.delete_adapters({name!r})"
        )
    check_lora_keys(pipe, state_dict, file)
    check_lora_fits(pipe.unet, state_dict, file)
    from diffusers.utils import logging as dlogging

    level = dlogging.get_verbosity()
    # A UNet-only LoRA makes diffusers warn "No LoRA keys associated to CLIPTextModel": expected
    # for ours (the text encoder is trained only on request), so keep it out of the user's log.
    dlogging.set_verbosity_error()
    try:
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
    except Exception as e:
        if name in pipe.get_list_adapters().get("unet", []):
            pipe.delete_adapters(name)
        raise LoraMismatchError(f"{file}: could not be loaded into this pipeline ({e})") from e
    finally:
        dlogging.set_verbosity(level)
    return name

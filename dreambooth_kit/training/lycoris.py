"""adapter.type loha / lokr: LyCORIS adapters trained through peft's own LoHaConfig / LoKrConfig.

diffusers' LoRA loaders read LoRA (and DoRA) only, so these two are written and read here:

- the run's ``lora/pytorch_lora_weights.safetensors`` holds peft's tensors under ``unet.`` /
  ``text_encoder.`` with the adapter's shape in the metadata (``dreambooth_kit_adapter``); ``generate``
  and ``evaluate`` load it through peft (:func:`load_into`), scaled by ``lora_scale`` like a LoRA;
- ``export --format kohya`` writes LyCORIS key names (``lora_unet_<module>.hada_w1_a``, ...), which
  A1111 (its built-in Lora extension) and ComfyUI read (:func:`to_lycoris`).

Scale conventions, from the consumers' loading code: LoHa is scaled by ``alpha / rank`` everywhere
(peft, A1111, ComfyUI: rank = rows of ``hada_w1_b``), so ``alpha`` is written as trained. LoKr is
scaled by ``alpha / rank`` in peft, but A1111 and ComfyUI apply ``alpha / dim`` only when a factor is
stored decomposed and 1.0 otherwise, and older A1111 releases cannot read a decomposed factor at all
(their LoKr module tests a tensor's truth value). So both factors are written whole (``lokr_w1``,
``lokr_w2``) with the scale multiplied into ``lokr_w1`` and no ``alpha``: the product is the one peft
trained, in every one of them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from dreambooth_kit.config import AdapterConfig
from dreambooth_kit.errors import InvalidInput

LYCORIS_TYPES = ("loha", "lokr")
META_KEY = "dreambooth_kit_adapter"
_PARAM = re.compile(r"^(?P<module>.+)\.(?P<param>hada_w[12]_[ab]|hada_t[12]|lokr_w[12](_[ab])?|lokr_t2)$")


def peft_config(cfg: AdapterConfig, *, text_encoder: bool = False, targets: list[str] | None = None):
    """peft's config for ``cfg.type`` (loha or lokr): rank, alpha and the target layers as for a LoRA;
    ``adapter.dropout`` is LyCORIS's rank dropout."""
    from peft import LoHaConfig, LoKrConfig

    if targets is None:
        targets = list(cfg.text_encoder_target_modules if text_encoder else cfg.target_modules)
    cls = LoHaConfig if cfg.type == "loha" else LoKrConfig
    alpha = cfg.alpha if cfg.alpha is not None else cfg.rank
    return cls(r=cfg.rank, alpha=alpha, rank_dropout=cfg.dropout, target_modules=list(targets))


def file_metadata(cfg: AdapterConfig, text_encoder: bool) -> dict[str, str]:
    shape = {
        "type": cfg.type,
        "rank": cfg.rank,
        "alpha": cfg.alpha if cfg.alpha is not None else cfg.rank,
        "dropout": cfg.dropout,
        "unet_targets": list(cfg.target_modules),
        "text_encoder_targets": list(cfg.text_encoder_target_modules) if text_encoder else [],
    }
    return {META_KEY: json.dumps(shape), "format": "pt"}


def read_shape(file: Path) -> dict[str, Any] | None:
    """The adapter shape a LoHa/LoKr file of ours records; None for any other file."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except Exception:  # not a safetensors file: the LoRA loader names the problem
        return None
    return json.loads(raw) if raw else None


def state_dict(unet: torch.nn.Module, text_encoder: torch.nn.Module | None) -> dict[str, torch.Tensor]:
    """peft's tensors of both models, under ``unet.`` / ``text_encoder.``, in fp32 on the CPU."""
    from peft.utils import get_peft_model_state_dict

    out = {f"unet.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    if text_encoder is not None and getattr(text_encoder, "peft_config", None):
        out |= {f"text_encoder.{k}": v for k, v in get_peft_model_state_dict(text_encoder).items()}
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def load_into(pipe, file: Path, name: str, shape: dict[str, Any]) -> None:
    """Our LoHa/LoKr file into ``pipe`` as adapter ``name`` (the UNet, and the text encoder if the
    file has its part); a tensor that fits no layer is refused, never dropped."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    sd = load_file(str(file))
    cfg = AdapterConfig(
        type=shape["type"],
        rank=int(shape["rank"]),
        alpha=float(shape["alpha"]),
        dropout=float(shape["dropout"]),
    )
    for prefix, model, targets in (
        ("unet.", pipe.unet, shape["unet_targets"]),
        ("text_encoder.", pipe.text_encoder, shape["text_encoder_targets"]),
    ):
        part = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        if not part:
            continue
        model.add_adapter(peft_config(cfg, targets=targets), adapter_name=name)
        result = set_peft_model_state_dict(model, part, adapter_name=name)
        if result.unexpected_keys:
            raise InvalidInput(
                f"{file}: {len(result.unexpected_keys)} tensors fit no layer of this model (e.g. "
                f"{result.unexpected_keys[0]}); it was trained on another base model"
            )
    pipe.to(pipe.device)  # the adapter layers are made on the CPU


def set_scale(pipe, name: str, scale: float) -> None:
    """``lora_scale`` for a LoHa/LoKr adapter: diffusers' set_adapters scales LoRA layers only (it left
    a LoHa's output unchanged at weight 0.5), so the peft layers are told directly."""
    from peft.tuners.lycoris_utils import LycorisLayer

    for model in (pipe.unet, pipe.text_encoder):
        for module in model.modules():
            if isinstance(module, LycorisLayer) and name in module.scaling:
                module.set_scale(name, scale)


def to_lycoris(sd: dict[str, torch.Tensor], shape: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Our file's tensors -> LyCORIS keys as A1111 and ComfyUI read them (see the module docstring)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        m = _PARAM.match(key)
        if m is None:
            raise InvalidInput(f"{key}: not a LoHa/LoKr tensor of this toolkit's format")
        groups.setdefault(m["module"], {})[m["param"]] = value
    rank, alpha = int(shape["rank"]), float(shape["alpha"])
    out: dict[str, torch.Tensor] = {}
    for module, params in groups.items():
        name = kohya_name(module)
        if shape["type"] == "loha":
            out |= {f"{name}.{p}": v.contiguous() for p, v in params.items()}
            out[f"{name}.alpha"] = torch.tensor(alpha)
        else:
            w1 = params["lokr_w1"] if "lokr_w1" in params else _product(params, "lokr_w1")
            w2 = params["lokr_w2"] if "lokr_w2" in params else _product(params, "lokr_w2")
            out[f"{name}.lokr_w1"] = (w1 * (alpha / rank)).contiguous()
            out[f"{name}.lokr_w2"] = w2.contiguous()
    return out


def _product(params: dict[str, torch.Tensor], base: str) -> torch.Tensor:
    if f"{base}_a" not in params:
        raise InvalidInput(f"a LoKr layer without {base} or {base}_a/{base}_b: {sorted(params)}")
    return params[f"{base}_a"] @ params[f"{base}_b"]


def kohya_name(module: str) -> str:
    """``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`` ->
    ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``; the text encoder as
    ``lora_te_text_model_encoder_layers_0_self_attn_q_proj`` (transformers 5 drops the text_model
    level from the module path; every other stack spells it)."""
    if module.startswith("unet."):
        return "lora_unet_" + module[len("unet.") :].replace(".", "_")
    if module.startswith("text_encoder."):
        path = module[len("text_encoder.") :].removeprefix("text_model.")
        return "lora_te_text_model_" + path.replace(".", "_")
    raise InvalidInput(f"{module}: neither a unet. nor a text_encoder. layer")

"""LoRA adapters through peft, and the state dicts + metadata that diffusers' loaders read back."""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dreambooth_kit.config import AdapterConfig
from dreambooth_kit.errors import InvalidInput, UserError


def lora_config(cfg: AdapterConfig, *, text_encoder: bool = False):
    """peft's LoraConfig (adapter.type lora, or dora: the same with use_dora)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
        lora_dropout=cfg.dropout,
        init_lora_weights=cfg.init_lora_weights,
        target_modules=list(cfg.text_encoder_target_modules if text_encoder else cfg.target_modules),
        use_dora=cfg.type == "dora",
    )


def adapter_config(cfg: AdapterConfig, *, text_encoder: bool = False):
    """The peft config of ``cfg.type``: LoRA/DoRA here, LoHa/LoKr in lycoris.py."""
    from dreambooth_kit.training.lycoris import LYCORIS_TYPES, peft_config

    if cfg.type in LYCORIS_TYPES:
        return peft_config(cfg, text_encoder=text_encoder)
    return lora_config(cfg, text_encoder=text_encoder)


def add_lora(unet: torch.nn.Module, text_encoder: torch.nn.Module | None, cfg: AdapterConfig) -> list:
    """Attach LoRA adapters (peft) to the UNet attention and, if asked, the text encoder.

    Returns the trainable parameters. Base weights stay frozen and untouched: peft wraps the
    ``to_q/to_k/to_v/to_out.0`` Linear layers and trains only ``lora_A``/``lora_B``.
    """
    unet.add_adapter(adapter_config(cfg))
    if cfg.train_text_encoder:
        if text_encoder is None:
            raise ValueError("adapter.train_text_encoder needs the text encoder")
        text_encoder.add_adapter(adapter_config(cfg, text_encoder=True))
    models = [unet] + ([text_encoder] if cfg.train_text_encoder else [])
    params = [p for m in models for p in m.parameters() if p.requires_grad]
    if not params:
        raise InvalidInput(
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

    peft_sd = get_peft_model_state_dict(unet)
    unet_sd = convert_state_dict_to_diffusers(peft_sd)
    if any(".lora_A." in k for k in unet_sd) and any(".lora.down." in k for k in unet_sd):
        # convert_state_dict_to_diffusers respells only the attention layers (to_k.lora.down) and leaves
        # others (proj_in, ff) in peft's lora_A. diffusers' loader picks one spelling from the first key,
        # so such a mix loaded without the attention half (measured on the toy config: every to_q/k/v/out
        # LoRA silently dropped). Then the whole UNet part keeps peft's spelling, which loaders read.
        unet_sd = peft_sd
    te_sd = None
    if text_encoder is not None and getattr(text_encoder, "peft_config", None):
        te_sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder))
        te_sd = {_with_text_model(k): v for k, v in te_sd.items()}
    # Saved in fp32 whatever the training precision: the file is small (a few MB at r=4) and
    # loaders cast to the pipeline's dtype.
    unet_sd = {k: v.detach().float().cpu().contiguous() for k, v in unet_sd.items()}
    if te_sd is not None:
        te_sd = {k: v.detach().float().cpu().contiguous() for k, v in te_sd.items()}
    return unet_sd, te_sd


def _with_text_model(key: str) -> str:
    """CLIPTextModel's module path as every other stack spells it: transformers 5 flattened the class
    (``encoder.layers.0…``), transformers 4 and SD 2.x checkpoints keep ``text_model.encoder.layers.0…``.
    Without that level, diffusers 0.32 + transformers 4.54 raises IndexError on our file and diffusers
    0.39 + transformers 4.57 + peft 0.21 fails on meta tensors; with it both load the text-encoder half,
    and diffusers 0.42 + transformers 5 still does (its loader maps the level away, as for hub models)."""
    return key if key.startswith("text_model.") else f"text_model.{key}"


# The LoraConfig fields of peft 0.17 (our lowest peft). diffusers >= 0.34 builds ``LoraConfig(**metadata)``
# from a file's metadata and fails on any field the installed peft lacks ("LoraConfig class could not be
# instantiated"): peft 0.21's full to_dict() has 41 fields, 9 of them unknown to peft 0.17 and 5 to
# peft 0.18. The ones dropped are at their defaults here (lora_config sets only rank, alpha, dropout,
# init and targets), so every peft builds the same LoraConfig from what is kept.
_PORTABLE_LORA_FIELDS = frozenset(
    "alpha_pattern auto_mapping base_model_name_or_path bias corda_config eva_config exclude_modules "
    "fan_in_fan_out inference_mode init_lora_weights layer_replication layers_pattern layers_to_transform "
    "loftq_config lora_alpha lora_bias lora_dropout megatron_config megatron_core modules_to_save peft_type "
    "qalora_group_size r rank_pattern revision runtime_config target_modules target_parameters task_type "
    "trainable_token_indices use_dora use_qalora use_rslora".split()
)


def lora_metadata(cfg: AdapterConfig, *, text_encoder: bool = False) -> dict[str, Any]:
    """The LoraConfig as a dict: without it an alpha != rank LoRA reloads at the wrong scale. Only the
    fields every peft we support reads (see ``_PORTABLE_LORA_FIELDS``); the others are defaults."""
    full = lora_config(cfg, text_encoder=text_encoder).to_dict()
    return {k: v for k, v in full.items() if k in _PORTABLE_LORA_FIELDS}


# ------------------------------------------------------------------ loading LoRAs into a pipeline


class LoraMismatchError(InvalidInput):
    """A LoRA that does not fit the pipeline's model (an SD 1.x or SDXL LoRA on SD 2.x), or one with
    tensors that diffusers would drop without a word."""


class LoraNotFoundError(UserError, FileNotFoundError):
    """The LoRA path does not exist."""


def lora_file(path: str | Path) -> Path:
    p = Path(path)
    return p / "pytorch_lora_weights.safetensors" if p.is_dir() else p


# What the input widths of a LoRA's down-projections say about its model. SD 1.x: CLIP ViT-L, 768 for
# both the UNet's cross-attention and the text encoder; SD 2.x: OpenCLIP ViT-H, 1024 for both; SDXL:
# cross-attention 2048 (CLIP-L 768 + OpenCLIP bigG 1280 side by side), first text encoder 768.
_CROSS_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
_TEXT_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x"}
# Only SDXL LoRAs have these: its second text encoder, and the UNet's added-conditioning MLP
# (diffusers' add_embedding, kohya/sgm's label_emb).
_SDXL_TE2 = ("lora_te2_", "text_encoder_2.")
_SDXL_UNET = re.compile(r"add_embedding|label_emb")
_KOHYA = ("lora_unet_", "lora_te_", "lora_te1_")  # kohya/A1111 names for one UNet + one text encoder
_DIFFUSERS = ("unet.", "text_encoder.")
_DOWN = re.compile(r"(lora_down|lora_A|[._]down)\.weight$")  # kohya, peft, diffusers' old spellings
_CROSS_KV = re.compile(r"attn2[._](processor[._])?to_[kv][._]")
_TEXT_QKV = re.compile(r"[qkv]_proj[._]")
_FIRST_TE = ("lora_te_", "lora_te1_", "text_encoder.")


def _widths(shapes: dict[str, tuple[int, ...]], pattern: re.Pattern, prefixes=None) -> set[int]:
    return {
        int(shape[1])
        for k, shape in shapes.items()
        if len(shape) >= 2
        and _DOWN.search(k)
        and pattern.search(k)
        and (prefixes is None or k.startswith(prefixes))
    }


def _sdxl_keys(keys) -> list[str]:
    found = [k for k in keys if k.startswith(_SDXL_TE2) or _SDXL_UNET.search(k)]
    return sorted(found, key=lambda k: (k.endswith(".alpha"), k))  # a weight as the example, not an alpha


def architecture_mismatch(
    shapes: dict[str, tuple[int, ...]], *, cross_width: int, text_width: int
) -> str | None:
    """Which model a LoRA (kohya or diffusers keys) was made for, when it is not this one; None if it fits.

    Read from the input widths of its cross-attention k/v and text-encoder q/k/v down-projections, the
    two places where SD 1.x, SD 2.x and SDXL differ whatever the LoRA's rank or target layers. Pure
    (shapes only), so it is tested with the real SD widths without building a real model."""
    cross = _widths(shapes, _CROSS_KV)
    text = _widths(shapes, _TEXT_QKV, _FIRST_TE)
    if cross <= {cross_width} and text <= {text_width}:
        return None
    sdxl = _sdxl_keys(shapes)
    if sdxl or 2048 in cross:
        name = "SDXL"
    elif 768 in cross | text:
        name = "SD 1.x"
    elif 1024 in cross | text:
        name = "SD 2.x"
    else:
        name = "another model"
    evidence = []
    if cross - {cross_width}:
        evidence.append(f"cross-attention width {'/'.join(map(str, sorted(cross)))}")
    if text - {text_width}:
        evidence.append(f"text width {'/'.join(map(str, sorted(text)))}")
    if sdxl:
        evidence.append(f"{len(sdxl)} SDXL-only tensors such as {sdxl[0]}")
    ours = (
        _CROSS_WIDTHS.get(cross_width)
        if _TEXT_WIDTHS.get(text_width) == _CROSS_WIDTHS.get(cross_width)
        else None
    )
    return (
        f"this LoRA was made for {name} ({', '.join(evidence)}), but this pipeline's model"
        f"{f' ({ours})' if ours else ''} has cross-attention width {cross_width} and text width {text_width}. "
        f"Use a LoRA trained on {ours or 'the same base model'}"
    )


def _find_module(model, path: str):
    # transformers 5 flattened CLIPTextModel (no "text_model." level); kohya and older files keep it.
    for candidate in (path, path.removeprefix("text_model."), f"text_model.{path}"):
        try:
            return model.get_submodule(candidate)
        except AttributeError:
            continue
    return None


def _layer_widths(module) -> tuple[int, int] | None:
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, torch.nn.Conv2d):
        return module.in_channels, module.out_channels
    return None


def _to_peft(part: dict[str, torch.Tensor], *, unet: bool) -> dict[str, torch.Tensor]:
    """diffusers' own key conversions, as ``load_lora_weights`` applies them (peft keys pass unchanged)."""
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from diffusers.utils.state_dict_utils import StateDictType

    if unet:
        return convert_unet_state_dict_to_peft(part)
    old = any("to_out_lora" in k for k in part)
    return convert_state_dict_to_peft(
        part, original_type=StateDictType.DIFFUSERS_OLD if old else StateDictType.DIFFUSERS
    )


def check_lora(pipe, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse, before anything is loaded, a LoRA that would not act as trained in this pipeline.

    diffusers loads what matches and drops the rest silently (only a warning, at best): an SDXL file's
    ``text_encoder_2`` tensors, layers this UNet lacks, DoRA scales, keys it does not know. A LoRA for
    another architecture fails deep in peft with a bare size mismatch instead. Dropped tensors are an
    error, not a warning: a LoRA that loads with part of it missing gives images unlike the ones it
    was made for, and a warning scrolls away in a batch job. The fix (the right file, or the extra
    tensors removed) is the user's to make, so the message names the count and one example."""
    if not any("lora" in k.lower() or k.endswith(".alpha") for k in state_dict):
        raise LoraMismatchError(
            f"{path}: not a LoRA file (no lora_A/lora_B, lora_down/lora_up keys; e.g. {next(iter(state_dict), '?')}); "
            "is it a full model checkpoint? Pass it as the base model instead"
        )
    shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
    cross_width = pipe.unet.config.cross_attention_dim
    text_width = pipe.text_encoder.config.hidden_size
    if why := architecture_mismatch(shapes, cross_width=cross_width, text_width=text_width):
        raise LoraMismatchError(f"{path}: {why}")

    keys = _sort_lora_keys(state_dict, path)
    missing, wrong = _layers_that_do_not_fit(pipe, keys)
    _refuse_dropped_tensors(state_dict, path, keys, missing, wrong)


@dataclass
class _LoraKeys:
    """A LoRA file's tensors by what diffusers does with them."""

    te2: list[str] = field(default_factory=list)  # SDXL's second text encoder: dropped
    dora: list[str] = field(default_factory=list)  # DoRA scales: dropped
    unknown: list[str] = field(default_factory=list)  # names diffusers does not know: dropped
    ours: dict[str, torch.Tensor] = field(default_factory=dict)  # diffusers names (kohya ones converted)


def _sort_lora_keys(state_dict: dict[str, torch.Tensor], path: Path) -> _LoraKeys:
    keys, kohya = _LoraKeys(), {}
    for k, v in state_dict.items():
        if "dora_scale" in k:  # diffusers filters these out: a DoRA file would load as a plain LoRA
            keys.dora.append(k)
        elif k.startswith(_SDXL_TE2):
            keys.te2.append(k)
        elif k.startswith(_KOHYA):
            kohya[k] = v
        elif k.startswith(_DIFFUSERS):
            keys.ours[k] = v
        else:
            keys.unknown.append(k)
    # diffusers converts kohya names only when every key is a kohya name; mixed with anything else,
    # the kohya tensors are dropped with the rest.
    if kohya and (keys.ours or keys.unknown or any(k.startswith("text_encoder_2.") for k in keys.te2)):
        keys.unknown += list(kohya)
        kohya = {}
    plain = re.compile(r"\.(lora_down\.weight|lora_up\.weight|alpha)$")
    lycoris = [k for k in kohya if not plain.search(k)]  # LoHa/LoKr/(IA)^3: diffusers cannot convert them
    if lycoris:
        raise LoraMismatchError(
            f"{path}: {len(lycoris)} of {len(state_dict)} tensors are not plain LoRA tensors (e.g. {lycoris[0]}: "
            "LoHa/LoKr/LyCORIS?); diffusers loads only lora_down/lora_up/alpha. Use a plain LoRA file"
        )
    if kohya:
        from diffusers import StableDiffusionPipeline

        converted, _alphas = StableDiffusionPipeline.lora_state_dict(dict(kohya))
        keys.ours |= converted
    return keys


def _layers_that_do_not_fit(pipe, keys: _LoraKeys) -> tuple[list[str], list[str]]:
    """(tensors for layers the pipeline's models lack, tensors whose width is not the layer's); a
    name that is not a LoRA A/B tensor once in peft's naming goes to ``keys.unknown``."""
    missing, wrong = [], []
    for prefix, model in (("unet.", pipe.unet), ("text_encoder.", pipe.text_encoder)):
        part = {k[len(prefix) :]: v for k, v in keys.ours.items() if k.startswith(prefix)}
        for k, v in _to_peft(part, unet=prefix == "unet.").items():
            module_path, sep, rest = k.partition(".lora_")
            if not sep or not rest.startswith(("A.", "B.", "magnitude_vector")):
                keys.unknown.append(prefix + k)
                continue
            module = _find_module(model, module_path)
            if module is None:
                missing.append(prefix + module_path)
                continue
            widths = _layer_widths(module)
            if widths and v.ndim >= 2:
                got = v.shape[1] if rest.startswith("A.") else v.shape[0] if rest.startswith("B.") else None
                want = widths[0] if rest.startswith("A.") else widths[1]
                if got is not None and got != want:
                    wrong.append(
                        f"{prefix}{module_path} ({'input' if rest.startswith('A.') else 'output'} "
                        f"width {got}, the layer has {want})"
                    )
    return missing, wrong


def _refuse_dropped_tensors(
    state_dict: dict[str, torch.Tensor], path: Path, keys: _LoraKeys, missing: list[str], wrong: list[str]
) -> None:
    total = len(state_dict)
    sdxl = _sdxl_keys(state_dict)
    if sdxl and (missing or wrong):
        raise LoraMismatchError(
            f"{path}: this LoRA was made for SDXL ({len(sdxl)} SDXL-only tensors such as {sdxl[0]}; "
            f"{len(missing) + len(wrong)} tensors for layers this model does not have), but this pipeline's "
            "model is not SDXL. Use a LoRA trained on the same base model"
        )
    if wrong:
        raise LoraMismatchError(
            f"{path}: {len(wrong)} LoRA tensors do not fit this model's layers (e.g. {wrong[0]}); it was "
            "made for another model. Use a LoRA trained on the same base model"
        )
    parts = []
    if keys.te2:
        parts.append(
            f"{len(keys.te2)} of {total} tensors are for SDXL's second text encoder (text_encoder_2.*/lora_te2_*), "
            "which this model does not have"
        )
    if keys.dora:
        parts.append(
            f"{len(keys.dora)} of {total} tensors are DoRA scales (dora_scale), which diffusers does not load"
        )
    if keys.unknown:
        parts.append(
            f"{len(keys.unknown)} of {total} tensors are not LoRA tensors diffusers knows (e.g. {keys.unknown[0]})"
        )
    if missing:
        parts.append(
            f"{len(missing)} of {total} LoRA tensors target layers this model does not have (e.g. {missing[0]})"
        )
    if parts:
        raise LoraMismatchError(
            f"{path}: {'; '.join(parts)}. diffusers would drop them silently and the LoRA would not act as "
            "trained; use the file made for this base model, or remove those tensors from it"
        )


@contextlib.contextmanager
def _quiet_loaders():
    """Silence what the loaders say about a LoRA that fits. diffusers warns "No LoRA keys associated to
    CLIPTextModel" for a UNet-only LoRA (ours, unless the text encoder was trained); transformers 5 prints
    every base weight of the text encoder as "MISSING ... newly initialized" (the LoRA file holds only
    LoRA tensors, so each of them is "missing") plus a progress bar; peft warns "Already found a
    peft_config" for a second LoRA. All false alarms here: what diffusers would really drop is refused
    by check_lora before loading, never only logged."""
    import warnings

    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    levels = dlogging.get_verbosity(), tlogging.get_verbosity()
    bars = tlogging.is_progress_bar_enabled()
    dlogging.set_verbosity_error()
    tlogging.set_verbosity_error()
    tlogging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            yield
    finally:
        dlogging.set_verbosity(levels[0])
        tlogging.set_verbosity(levels[1])
        if bars:
            tlogging.enable_progress_bar()


def load_lora(pipe, path: str | Path, name: str) -> str:
    """Load one LoRA as adapter ``name``; on any failure the pipeline is left as it was."""
    from safetensors.torch import load_file

    file = lora_file(path)
    if not file.exists():
        raise LoraNotFoundError(f"LoRA not found: {file.resolve()}")
    if file.suffix != ".safetensors":
        raise InvalidInput(
            f"{file}: only .safetensors LoRAs are loaded (pickle files can run code); convert it to .safetensors"
        )
    try:
        state_dict = load_file(str(file))
    except Exception as e:  # truncated or not a safetensors file
        raise InvalidInput(
            f"{file}: not a readable .safetensors file ({e}); download or copy it again"
        ) from e
    if name in {a for names in pipe.get_list_adapters().values() for a in names}:
        raise InvalidInput(
            f"adapter name {name!r} is already loaded; pick another or pipe.delete_adapters({name!r})"
        )
    from dreambooth_kit.training.lycoris import load_into, read_shape

    shape = read_shape(file)
    if shape is not None:  # our LoHa/LoKr file: diffusers' loader reads LoRA and DoRA only
        with _quiet_loaders():
            load_into(pipe, file, name, shape)
        return name
    with _quiet_loaders():
        check_lora(pipe, state_dict, file)
        try:
            pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
        except Exception as e:
            if name in {a for names in pipe.get_list_adapters().values() for a in names}:
                pipe.delete_adapters(name)
            raise LoraMismatchError(f"{file}: could not be loaded into this pipeline ({e})") from e
    return name

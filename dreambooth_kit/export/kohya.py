"""Export our diffusers-format LoRA as a kohya / A1111 / ComfyUI ``.safetensors`` (the merged model: merged.py).

The key mapping goes through diffusers' own converters (``convert_unet_state_dict_to_peft``,
``convert_state_dict_to_peft``, ``convert_state_dict_to_kohya``); only what they get wrong for
SD 2.x is fixed here by hand, each fix commented where it is made:

- ``convert_state_dict_to_kohya`` writes ``alpha = rank`` (``torch.tensor(len(down))``), which loads
  at scale 1 instead of the trained ``alpha / rank`` (an r=4, alpha=8 LoRA would load at half strength);
- it names the text encoder ``lora_te1_`` (SDXL's first encoder); SD 1.x/2.x files use ``lora_te_``;
- our text-encoder keys (transformers 5) have no ``text_model.`` level, while every SD 1.x/2.x
  kohya file (and A1111/ComfyUI's key maps) spell ``lora_te_text_model_encoder_layers_…``.

The mapping is pure functions over state dicts; ``export_kohya`` does the file I/O.

Every export labels the model with the prediction type the run trained with (:func:`run_prediction_type`):
a v-prediction LoRA labelled epsilon loads in A1111/ComfyUI with the wrong sampler parameterization.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dreambooth_kit.config import ModelConfig
from dreambooth_kit.errors import InvalidInput, UserError
from dreambooth_kit.util.atomic import writing

log = logging.getLogger("dreambooth_kit")

KOHYA_KEY = re.compile(r"^lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")

ARCH_EPS = "stable-diffusion-v2-512/lora"
ARCH_V = "stable-diffusion-v2-768-v/lora"


class ExportError(InvalidInput):
    """An export that cannot be written from this input (not our LoRA format, wrong target name...)."""


class ExportInputMissing(UserError, FileNotFoundError):
    """The LoRA or run folder to export does not exist."""


# ------------------------------------------------------------------ pure state-dict mapping


def _split(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    unet, te = {}, {}
    for k, v in state_dict.items():
        if k.startswith("unet."):
            unet[k] = v
        elif k.startswith("text_encoder."):
            te[k] = v
        elif k.startswith("text_encoder_2."):
            raise ExportError(f"{k}: a second text encoder is SDXL; this exporter writes SD 1.x/2.x LoRAs")
        else:
            # save_lora_weights always prefixes unet./text_encoder.; an unprefixed key means the
            # input is not our diffusers-format LoRA (maybe it already is a kohya file).
            raise ExportError(
                f"{k}: not a diffusers-format LoRA key (expected 'unet.' or 'text_encoder.' prefix)"
            )
    return unet, te


def _to_peft(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our saved keys (``…to_k.lora.down.weight`` for the UNet, ``…q_proj.lora_linear_layer.down.weight``
    for the text encoder) -> peft's ``lora_A``/``lora_B``, which is all convert_state_dict_to_kohya reads."""
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    unet, te = _split(state_dict)
    out: dict[str, Tensor] = {}
    if unet:
        # convert_state_dict_to_peft does not know the UNet's ".lora.down" spelling (its auto-detect
        # raises "Could not automatically infer state dict type"); the UNet converter does.
        out.update(convert_unet_state_dict_to_peft(unet))
    if te:
        out.update(convert_state_dict_to_peft(te))
    # Keys already in peft form pass through both converters unchanged.
    return out


def to_kohya(state_dict: dict[str, Tensor], *, alpha: float, rank: int) -> dict[str, Tensor]:
    """Our diffusers-format LoRA state dict -> kohya keys with ``.alpha`` = the trained ``alpha``.

    ``lora_unet_<module_path_with_underscores>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``,
    text encoder as ``lora_te_text_model_<…>``. Loaders scale each module by ``alpha / dim`` with
    ``dim`` = the lora_down rows, so every module must have rank ``rank`` (our runs never use
    peft's rank_pattern); a mismatch is refused rather than written at a wrong scale.
    """
    from diffusers.utils import convert_state_dict_to_kohya

    peft_sd = _to_peft(state_dict)
    unknown = [k for k in peft_sd if not re.search(r"\.lora_[AB]\.weight$", k)]
    if unknown:
        # DoRA magnitudes, biases…: kohya's LoRA format has no place for them.
        raise ExportError(f"cannot export to kohya format: unsupported LoRA keys, e.g. {unknown[0]}")
    kohya = convert_state_dict_to_kohya(peft_sd)

    out: dict[str, Tensor] = {}
    for key, value in kohya.items():
        name, _, suffix = key.partition(".")
        # Fix 1: diffusers names the (only) SD 1.x/2.x text encoder "lora_te1_" (SDXL's first one);
        # A1111/ComfyUI/kohya read SD2 text-encoder LoRAs as "lora_te_". diffusers loads both.
        if name.startswith("lora_te1_"):
            name = "lora_te_" + name[len("lora_te1_") :]
        # Fix 2: CLIPTextModel's peft keys lose the "text_model." level under transformers 5, but
        # the kohya/A1111/ComfyUI spelling is lora_te_text_model_encoder_layers_N_…; put it back.
        if name.startswith("lora_te_") and not name.startswith("lora_te_text_model_"):
            name = "lora_te_text_model_" + name[len("lora_te_") :]
        if suffix == "alpha":
            # Fix 3: convert_state_dict_to_kohya writes alpha = rank (an int64 tensor), i.e. scale 1:
            # an r=4 alpha=8 LoRA would load at half strength. Write the trained alpha (float).
            value = torch.tensor(float(alpha), dtype=torch.float32)
        elif suffix == "lora_down.weight" and value.shape[0] != rank:
            raise ExportError(
                f"{key}: LoRA rank {value.shape[0]} differs from the run's rank {rank}; "
                "per-module ranks (rank_pattern) cannot be exported with one alpha"
            )
        new_key = f"{name}.{suffix}"
        if not KOHYA_KEY.match(new_key):
            raise ExportError(f"{new_key}: not a valid kohya LoRA key (from {key})")
        out[new_key] = value.contiguous()
    return out


@dataclass(frozen=True)
class ExportLabels:
    """What an export says about its run (kohya ``ss_*`` and ModelSpec metadata), read from the
    run's typed config by :func:`labels_for` (or given, for a LoRA without its run folder)."""

    base_model: str = ""  # model.pretrained
    prediction_type: str = "epsilon"
    resolution: int = 512
    title: str = "dreambooth-lora"
    trigger: str = ""  # the identifier(s), else the instance prompt(s)
    instance_prompt: str = ""
    rank: int | None = None  # adapter.rank/alpha: used when the LoRA file carries no metadata
    alpha: float | None = None
    buckets: bool = False  # data.buckets: trained at aspect-ratio buckets around resolution^2


def kohya_metadata(labels: ExportLabels, *, rank: int, alpha: float) -> dict[str, str]:
    """kohya ``ss_*`` keys plus ModelSpec 1.0 (what A1111/ComfyUI/civitai read). All values are strings
    (safetensors metadata is str -> str)."""
    v = labels.prediction_type == "v_prediction"
    res = labels.resolution
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": str(float(alpha)),
        "ss_v2": "True",
        "ss_base_model_version": "sd_v2",
        # kohya writes ss_v_parameterization for v-prediction models; A1111 uses it for SD2-768.
        "ss_v_parameterization": str(v),
        "ss_resolution": f"({res}, {res})",
        "ss_enable_bucket": str(labels.buckets),  # kohya's key: the photos kept their aspect ratios
        # kohya writes the base's file name here; a full local path would leak the user's folders.
        "ss_sd_model_name": model_file_name(labels.base_model),
        "ss_training_comment": "dreambooth_kit DreamBooth LoRA",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": ARCH_V if v else ARCH_EPS,
        "modelspec.implementation": "diffusers",
        "modelspec.prediction_type": str(labels.prediction_type),
        "modelspec.resolution": f"{res}x{res}",
        "modelspec.title": labels.title,
        "modelspec.date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if labels.trigger:
        meta["modelspec.trigger_phrase"] = labels.trigger
    if labels.instance_prompt:
        meta["ss_instance_prompt"] = labels.instance_prompt
    return meta


def labels_for(lora: Path) -> ExportLabels:
    """The labels of the run the LoRA belongs to: its ``lora/config.yaml``, else the run's
    ``config.yaml`` (read and validated as any config); defaults if neither is there."""
    from dreambooth_kit.config import concepts_of, load_config

    for cfg_file in (lora.parent / "config.yaml", lora.parent.parent / "config.yaml"):
        if cfg_file.is_file():
            cfg = load_config(cfg_file)
            break
    else:
        return ExportLabels()
    phrases: list[str] = []
    for c in concepts_of(cfg):
        phrase = c.identifier or c.instance_prompt
        if phrase and phrase not in phrases:
            phrases.append(phrase)
    out_dir = cfg.train.output_dir
    return ExportLabels(
        base_model=cfg.model.pretrained,
        prediction_type=run_prediction_type(cfg.model),
        resolution=cfg.data.resolution,
        title=Path(out_dir).name if out_dir else "dreambooth-lora",
        trigger=", ".join(phrases),
        instance_prompt=cfg.data.instance_prompt,
        rank=cfg.adapter.rank,
        alpha=cfg.adapter.alpha,
        buckets=cfg.data.buckets,
    )


def model_file_name(pretrained: str) -> str:
    """The base model's name without its folder: ``v2-1_512-ema-pruned.safetensors`` for a file,
    ``stable-diffusion-2-1-base`` for a hub id or a local diffusers folder (either slash)."""
    return re.split(r"[\\/]", pretrained.rstrip("\\/"))[-1] if pretrained else ""


# ------------------------------------------------------------------ file I/O


def _read_lora(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
        raw = (f.metadata() or {}).get("lora_adapter_metadata")
    return sd, (json.loads(raw) if raw else {})


def _rank_alpha(meta: dict[str, Any], prefix: str, labels: ExportLabels) -> tuple[int, float] | None:
    """rank/alpha of one component from the file's adapter metadata, else from the run config."""
    if f"{prefix}.r" in meta:
        r = int(meta[f"{prefix}.r"])
        a = meta.get(f"{prefix}.lora_alpha")
        return r, float(a if a is not None else r)
    if labels.rank is not None:
        return labels.rank, float(labels.alpha if labels.alpha is not None else labels.rank)
    return None


def run_prediction_type(model: ModelConfig) -> str:
    """The prediction type the run trained with.

    ``model.prediction_type`` of its config.yaml first: training records the resolved value there.
    Runs from before that: the base model's, read as training reads it (:func:`models.resolve_source`:
    built-in model, folder, single file, cached hub id, known SD 2.x repo; never the network); last, a
    guess from ``model.native_resolution`` (768 = v), logged, since a wrong label breaks the export's
    images."""
    if model.prediction_type:
        return model.prediction_type
    why = "no model.pretrained"
    if model.pretrained:
        from dreambooth_kit.models.source import resolve_source

        try:
            found = resolve_source(model).prediction_type
        except (OSError, ValueError, RuntimeError) as e:  # ModelLoadError is a RuntimeError
            found, why = None, f"{model.pretrained}: {e}"
        else:
            why = f"{model.pretrained}: its scheduler config is not on this machine"
        if found:
            return found
    guess = "v_prediction" if (model.native_resolution or 512) >= 768 else "epsilon"
    log.warning(
        "the run's config has no model.prediction_type and the base model's could not be read (%s); "
        "labelling the export %s from model.native_resolution",
        why,
        guess,
    )
    return guess


def _kohya_tensors(src: Path, sd: dict[str, Tensor], meta: dict[str, Any], labels: ExportLabels):
    """The kohya/LyCORIS tensors of our file and each part's (rank, alpha)."""
    from dreambooth_kit.training.lycoris import read_shape, to_lycoris

    shape = read_shape(src)
    if shape is not None:  # LoHa / LoKr: LyCORIS keys (lycoris.py)
        ra = (int(shape["rank"]), float(shape["alpha"]))
        try:
            return to_lycoris(sd, shape), {"unet": ra}
        except InvalidInput as e:
            raise ExportError(f"{src}: {e}; train again or copy the run's lora/ folder again") from None
    if any("lora_magnitude_vector" in k for k in sd):
        # A1111's Lora extension normalises a DoRA weight per input column (kohya's convention); peft,
        # which trained it, per output row. No kohya file is read right by both, and A1111 would apply
        # it wrongly without a word.
        raise ExportError(
            f"{src}: a DoRA (adapter.type dora) has no kohya export that A1111 applies as trained (A1111 "
            "normalises DoRA per input column, peft trains it per output row). For A1111 and ComfyUI "
            "export the merged model (--format single-file or merged-diffusers); diffusers loads lora/ as it is"
        )
    return _map_components(sd, meta, labels)


def _map_components(
    sd: dict[str, Tensor], meta: dict[str, Any], labels: ExportLabels
) -> tuple[dict[str, Tensor], dict[str, tuple[int, float]]]:
    """kohya keys of the UNet and text-encoder parts, each mapped with its own rank and alpha."""
    unet_sd, te_sd = _split(sd)
    out: dict[str, Tensor] = {}
    ranks: dict[str, tuple[int, float]] = {}
    # UNet and text encoder carry their own LoraConfig in the metadata; map each with its own alpha.
    for prefix, part in (("unet", unet_sd), ("text_encoder", te_sd)):
        if not part:
            continue
        ra = _rank_alpha(meta, prefix, labels)
        if ra is None:
            # No metadata and no config: diffusers itself would load this at alpha = rank, so that
            # is the faithful export (the rank read from the weights).
            r = int(next(v for k, v in part.items() if "down" in k).shape[0])
            ra = (r, float(r))
        ranks[prefix] = ra
        out.update(to_kohya(part, alpha=ra[1], rank=ra[0]))
    return out, ranks


def export_kohya(
    lora_path: Path, out_path: Path, *, fp16: bool = False, labels: ExportLabels | None = None
) -> Path:
    """Write our LoRA (file or its folder) as a kohya/A1111/ComfyUI ``.safetensors`` at ``out_path``.

    rank/alpha come from the file's ``lora_adapter_metadata``; ``labels`` (the ModelSpec metadata and
    the prediction type) default to those of the ``config.yaml`` saved beside the LoRA, else the
    run's (:func:`labels_for`). Written to a temp file in the target folder and renamed, so ``out_path`` is never half-written.
    """
    from safetensors.torch import save_file

    from dreambooth_kit.inference.pngmeta import SOURCE_HASH_KEY, lora_hash
    from dreambooth_kit.training.adapters import lora_file

    src = lora_file(lora_path)
    if not src.exists():
        raise ExportInputMissing(f"LoRA not found: {src.resolve()}")
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise ExportError(f"{out_path}: the kohya export must be a .safetensors file")
    if out_path.resolve() == src.resolve():
        raise ExportError(f"{out_path}: refusing to overwrite the source LoRA with its export")
    labels = labels_for(src) if labels is None else labels

    try:
        sd, meta = _read_lora(src)
    except Exception as e:  # safetensors raises its own SafetensorError on a truncated/foreign file
        raise ExportError(
            f"{src}: not a readable .safetensors LoRA ({e}); train again or copy it again"
        ) from e
    out, ranks = _kohya_tensors(src, sd, meta, labels)
    if not out:
        raise ExportError(f"{src}: contains no LoRA weights")
    if fp16:
        out = {k: v.to(torch.float16) for k, v in out.items()}

    rank, alpha = ranks.get("unet") or next(iter(ranks.values()))
    metadata = kohya_metadata(labels, rank=rank, alpha=alpha) | {"format": "pt"}
    # Which LoRA this is the export of (its A1111 hash): `generate` names this file in a PNG's
    # infotext only while it is the export of the very LoRA that made the image (installed_lora).
    metadata[SOURCE_HASH_KEY] = lora_hash(src)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with writing(out_path) as tmp:  # readers see the old file or the whole new one
        save_file(out, str(tmp), metadata=metadata)
    return out_path


# ------------------------------------------------------------------ merged model and the run-level entry

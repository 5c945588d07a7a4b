"""What is checked about a config's values once it is loaded: required fields, the subjects' prompts and folders,
ranges (seeds, rates, counts), and settings that only make sense together. Each check returns problems
as lines naming the key and the fix, so a user sees all of them at once."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from dreambooth_kit.config.schema import (
    CONFIG_VERSION,
    MAX_SEED,
    ConceptConfig,
    DataConfig,
    DreamBoothConfig,
    PriorConfig,
    concept_fields,
)
from dreambooth_kit.models.schedulers import SCHEDULERS


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
    for where, c in concept_fields(cfg):
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
    missing = [key or "data" for key, c in concept_fields(cfg) if not c.identifier]
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

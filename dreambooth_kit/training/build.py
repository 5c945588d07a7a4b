"""The recipe's builders: from the config, the models set up for training (adapters, precision, the
frozen parts), the data (dataset, sampler, loader), the optimizer and its learning-rate schedule, the
moving average and pivotal tuning's vectors, all handed to accelerate's prepare."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from dreambooth_kit.config import DreamBoothConfig
from dreambooth_kit.errors import MissingExtra

log = logging.getLogger("dreambooth_kit")


def build_pivots(cfg: DreamBoothConfig, comps, accelerator):
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


def build_ema(cfg: DreamBoothConfig, params):
    """train.ema: the moving average of the trained parameters (ema.py), else None."""
    from dreambooth_kit.training.ema import TrainedEMA

    return TrainedEMA(params, cfg.train.ema_decay) if cfg.train.ema else None


def apply_learning_rates(optimizer, lr_scheduler, initial: list[float]) -> None:
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


def setup_models(cfg: DreamBoothConfig, comps, accelerator):
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


def build_data(cfg: DreamBoothConfig, report, class_sets, comps, accelerator):
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


def build_optimizer(cfg: DreamBoothConfig, params, num_processes: int, text_encoder=None, pivots=None):
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


def build_lr_scheduler(cfg: DreamBoothConfig, optimizer, num_processes: int):
    from diffusers.optimization import get_scheduler

    # accelerate steps a prepared scheduler once per process per optimizer step: scale both counts.
    return get_scheduler(
        cfg.train.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.train.lr_warmup_steps * num_processes,
        num_training_steps=cfg.train.max_steps * num_processes,
    )


def prepare(accelerator, cfg, unet, text_encoder, optimizer, dataloader, lr_scheduler):
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


def restore(
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
    from dreambooth_kit.training.checkpoints import load_checkpoint
    from dreambooth_kit.training.lora_state import register_deepspeed_weights_hook, register_lora_hooks
    from dreambooth_kit.training.resume_checks import LEARNING_RATE_FIELDS, check_process_count

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
    restore_beside(cfg, accelerator, unet, text_encoder, path, state, ema, pivots)
    if optimizer is not None and set(changed) & set(LEARNING_RATE_FIELDS):
        apply_learning_rates(optimizer, lr_scheduler, wanted)
        log.warning(
            "learning rate changed on resume (train.resume_force=true): %s from step %d on, instead of "
            "the checkpoint's", ", ".join(f"{lr:g}" for lr in wanted), state["step"],
        )  # fmt: skip
    log.info("resumed from %s at step %d", path, state["step"])
    return state


def restore_beside(cfg, accelerator, unet, text_encoder, path: Path, state: dict, ema, pivots) -> None:
    """What a checkpoint holds beside accelerate's state: the pivotal vectors, the moving average."""
    from dreambooth_kit.training.lora_state import read_checkpoint_ema, read_checkpoint_pivots, trained_models

    if pivots is not None:
        read_checkpoint_pivots(pivots, path)
    if ema is not None:
        models = trained_models(accelerator, unet, text_encoder, pivots)
        lora = cfg.adapter.is_adapter
        read_checkpoint_ema(ema, path, models, lora=lora, steps=state.get("ema_steps", state["step"]))

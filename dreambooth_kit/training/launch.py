"""How a training is launched, checked before anything runs: the accelerator (precision, gradient
accumulation, trackers, the project folder), the launch itself (one process or several, torchrun or
accelerate, DeepSpeed's recipe) and the settings a launch rules out, each refusal with its fix."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from dreambooth_kit.config import DreamBoothConfig
from dreambooth_kit.errors import MissingExtra, UserError
from dreambooth_kit.training.layout import RunLayout

log = logging.getLogger("dreambooth_kit")


class LaunchError(UserError, RuntimeError):
    """The processes launched are not the processes accelerate runs; the message has the command."""


def check_pivotal_launch(cfg: DreamBoothConfig, accelerator) -> None:
    """adapter.pivotal on several processes is refused before anything is written or made."""
    if cfg.adapter.pivotal and accelerator.num_processes > 1:
        raise UserError(
            "adapter.pivotal trains on one process for now: its vectors are in no DDP module, so nothing "
            "would average their gradients across processes. Launch one process, or set adapter.pivotal: false"
        )


def make_accelerator(cfg: DreamBoothConfig, out: Path):
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


def init_trackers(cfg: DreamBoothConfig, accelerator) -> None:
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


def _flat(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(_flat(v, key + "."))
        else:
            flat[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return flat

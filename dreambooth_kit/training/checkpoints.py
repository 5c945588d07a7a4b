"""Training checkpoints: atomic saves, pruning after success, safe resume.

A checkpoint is ``<output_dir>/checkpoints/step-000250/``::

    unet_lora.safetensors          LoRA tensors only (register_lora_hooks); never the frozen base
    text_encoder_lora.safetensors  when the text encoder is trained
    model.safetensors              accelerate's own model file: full fine-tune runs only
    optimizer.bin, scheduler.bin   accelerate's save_state
    random_states_<rank>.pkl       accelerate's save_state, one per process
    state.json                     {"step": 250, **extra_state} (e.g. the data position)
    run.json                       the run's resolved config, for check_compatible()
    COMPLETE.json                  written last: step + every file's size

``accelerator.save_state`` writes files one by one into the folder it is given, so a run killed
mid-save leaves a half-written folder. Here it writes into ``checkpoints/.tmp-step-000250-<random>``,
which is renamed to ``step-000250`` only after every file is written and synced, and old checkpoints
are pruned only after that. A folder without a readable ``COMPLETE.json`` is never resumed from.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dreambooth_kit.errors import UserError
from dreambooth_kit.training.layout import CHECKPOINT_EMA
from dreambooth_kit.util.atomic import fsync_tree, publish_folder, temp_path
from dreambooth_kit.util.logs import ACCELERATE_STATE_LOGGERS, quieter

if TYPE_CHECKING:
    from accelerate import Accelerator

    from dreambooth_kit.training.ema import TrainedEMA
    from dreambooth_kit.training.loop import LoopState

log = logging.getLogger("dreambooth_kit")

CHECKPOINTS = "checkpoints"
COMPLETE = "COMPLETE.json"
STATE = "state.json"
RUN = "run.json"
LORA_SUFFIX = "_lora.safetensors"
FORMAT_VERSION = 1

_STEP_DIR = re.compile(r"^step-(\d+)$")
_LOW_SPACE = 1 << 20  # bytes free under which a failed write is taken for a full disk
# What disk_full_reason() answers: the two ways a write runs out of room.
NO_SPACE = "no space left"
FILE_SIZE_LIMIT = "file size limit"

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


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be written, found or restored; the message says what to do."""


class CheckpointSaveFailed(RuntimeError):
    """A save failed for a reason that is not the disk's (a full disk or a size limit is a
    :class:`CheckpointError`): says which checkpoint is intact, and is no UserError, so the CLI
    shows the traceback of the cause (``__cause__``), which is what a bug report needs."""


def step_name(step: int) -> str:
    return f"step-{step:06d}"


# ------------------------------------------------------------------ LoRA-only model state


def register_lora_hooks(accelerator: Accelerator, models: dict[str, torch.nn.Module]) -> None:
    """Make ``accelerator.save_state``/``load_state`` store only the LoRA tensors of ``models``.

    ``models`` maps a name to a peft-adapted model (``{"unet": unet, "text_encoder": te}``), prepared
    or not: models are matched to the accelerator's prepared ones after unwrapping, when a save or
    load runs, so this may be called before or after ``accelerator.prepare``. Each becomes
    ``<name>_lora.safetensors`` (peft's ``get_peft_model_state_dict``) and is taken out of
    accelerate's list, so the frozen base (3.4 GB at SD 2.1) is never written. Other prepared models
    are still saved by accelerate itself. Calling this again replaces the earlier registration.
    """
    for handle in getattr(accelerator, "_dreambooth_kit_lora_hooks", ()):
        handle.remove()
    accelerator._dreambooth_kit_lora_hooks = (
        accelerator.register_save_state_pre_hook(functools.partial(_save_lora_hook, accelerator, models)),
        accelerator.register_load_state_pre_hook(functools.partial(_load_lora_hook, accelerator, models)),
    )


def _lora_models(
    accelerator: Accelerator, models: dict[str, torch.nn.Module], prepared: list
) -> list[tuple[int, str, torch.nn.Module]]:
    """(index in ``prepared``, name, unwrapped model) of each registered model."""
    wanted = {id(accelerator.unwrap_model(m)): name for name, m in models.items()}
    found = []
    for i, m in enumerate(prepared):
        inner = accelerator.unwrap_model(m)
        if id(inner) in wanted:
            found.append((i, wanted.pop(id(inner)), inner))
    if wanted:
        raise CheckpointError(
            f"register_lora_hooks: {sorted(wanted.values())} not prepared by this accelerator; "
            "pass the models given to accelerator.prepare()"
        )
    return found


def _save_lora_hook(
    accelerator: Accelerator,
    models: dict[str, torch.nn.Module],
    prepared: list,
    weights: list,
    output_dir: str,
) -> None:
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    found = _lora_models(accelerator, models, prepared)
    if accelerator.is_main_process:
        for _, name, model in found:
            state = get_peft_model_state_dict(model)
            state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
            save_file(state, os.path.join(output_dir, name + LORA_SUFFIX), metadata={"format": "pt"})
    # `prepared` is accelerator._models itself: only the weights list may be shortened.
    for i, _, _ in reversed(found):
        weights.pop(i)


def _load_lora_hook(
    accelerator: Accelerator, models: dict[str, torch.nn.Module], prepared: list, input_dir: str
) -> None:
    found = _lora_models(accelerator, models, prepared)
    for _, name, model in found:
        load_lora_file(model, Path(input_dir).resolve() / (name + LORA_SUFFIX))
    # This list is a copy made by load_state: popping keeps accelerate's model files aligned.
    for i, _, _ in reversed(found):
        prepared.pop(i)


def load_lora_file(model: torch.nn.Module, path: Path) -> None:
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        state = load_file(path)
    except Exception as e:
        raise CheckpointError(
            f"{path} cannot be read ({type(e).__name__}); {_earlier_hint(path.parent)}"
        ) from e
    try:
        result = set_peft_model_state_dict(model, state)
    except RuntimeError as e:  # shape mismatch: another rank or other target modules
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), _short(e))
        raise CheckpointError(
            f"{path} does not fit the model's LoRA ({detail}); it was saved with another "
            "adapter.rank or adapter.target_modules"
        ) from e
    missing = [k for k in result.missing_keys if any(p in k for p in ADAPTER_KEY_PARTS)]
    if result.unexpected_keys or missing:
        raise CheckpointError(
            f"{path} does not fit the model's LoRA: {len(result.unexpected_keys)} unknown "
            f"and {len(missing)} missing tensors (e.g. {(result.unexpected_keys or missing)[0]})"
        )


def register_deepspeed_weights_hook(accelerator: Accelerator) -> None:
    """Under DeepSpeed, also write each prepared model's weights as ``model.safetensors`` (then
    ``model_1``, ...) in every checkpoint, as accelerate does without DeepSpeed.

    accelerate hands a DeepSpeed checkpoint to the engine, which writes the weights only inside its
    torch pickles (``pytorch_model/mp_rank_00_model_states.pt``): ``evaluate`` and anyone scoring a
    step would have to unpickle them, and loading a pickle needs an explicit opt-in here. Under
    ZeRO-2 every process holds the whole weights, so the main process writes them (fp32 for the
    SD 2.1 UNet: 3.5 GB per checkpoint, beside DeepSpeed's ~14 GB). Resuming reads DeepSpeed's own
    files; these are for reading a step's weights."""
    accelerator.register_save_state_pre_hook(functools.partial(_save_deepspeed_weights, accelerator))


def _save_deepspeed_weights(accelerator: Accelerator, prepared: list, weights: list, output_dir: str) -> None:
    from safetensors.torch import save_file

    if not accelerator.is_main_process:
        return
    for i, model in enumerate(prepared):
        state = accelerator.unwrap_model(model).state_dict()
        state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        name = "model" if i == 0 else f"model_{i}"
        save_file(state, os.path.join(output_dir, f"{name}.safetensors"), metadata={"format": "pt"})


# ------------------------------------------------------------------ saving


def save_step_checkpoint(run: LoopState) -> Path:
    """A checkpoint of the training loop's current step, with its data position (every process
    must call it); also remembered as ``run.last_checkpoint``."""
    run.last_checkpoint = save_checkpoint(
        run.accelerator,
        run.out,
        run.step,
        extra_state={
            "epoch": run.epoch,
            "batch_in_epoch": run.batch_in_epoch,
            "processes": run.accelerator.num_processes,
            "lineage": run.lineage,  # the timeline that wrote it (see lineage.py)
            "photos": run.photos,  # what it was trained on (checked on resume)
            # The guard's history (a checkpoint follows an applied step, so none are in a row).
            "skipped_steps": list(run.guard.steps),
            **({"ema_steps": run.ema.steps} if run.ema is not None else {}),
            # train.stop=auto: the scores so far, so a resumed run decides as the uninterrupted one
            **({"auto_stop": run.auto_stop.to_state()} if run.auto_stop is not None else {}),
        },
        run_config=run.settings.config_dict,
        keep_last=run.settings.checkpoint.keep_last,
        write_extra=functools.partial(_write_beside, run),
        also_keep=_best_checkpoint_folder(run),
    )
    return run.last_checkpoint


def _best_checkpoint_folder(run: LoopState) -> Path | None:
    """train.stop=auto: the best step's checkpoint so far (kept from pruning), else None."""
    best = run.auto_stop.decide().best_step if run.auto_stop is not None else None
    return None if best is None else run.out / CHECKPOINTS / step_name(best)


def _write_beside(run: LoopState, folder: Path) -> None:
    """What a checkpoint holds beside accelerate's state: adapter.pivotal's vectors
    (``pivotal.safetensors``) and train.ema's average (``ema/``)."""
    from safetensors.torch import save_file

    from dreambooth_kit.training.pivotal import CHECKPOINT_FILE, checkpoint_tensors

    if run.pivots is not None:
        save_file(checkpoint_tensors(run.pivots), str(folder / CHECKPOINT_FILE), metadata={"format": "pt"})
    if run.ema is not None:
        with run.ema.swapped_in():
            models = trained_models(run.accelerator, run.unet, run.text_encoder, run.pivots)
            write_checkpoint_ema(folder, models, lora=run.settings.adapter.is_adapter)


def read_checkpoint_pivots(pivots, folder: Path) -> None:
    """adapter.pivotal's vectors from a checkpoint (refused when it has none: trained without)."""
    from safetensors.torch import load_file

    from dreambooth_kit.training.pivotal import CHECKPOINT_FILE, load_checkpoint_tensors

    file = folder / CHECKPOINT_FILE
    if not file.is_file():
        raise CheckpointError(
            f"{folder} holds no {CHECKPOINT_FILE} (it was trained without adapter.pivotal); resume it "
            "with adapter.pivotal=false"
        )
    load_checkpoint_tensors(pivots, load_file(str(file)))


def trained_models(
    accelerator: Accelerator, unet, text_encoder=None, pivots=None
) -> dict[str, torch.nn.Module]:
    """The unwrapped trained models by name: the UNet, the text encoder when it is trained, and
    adapter.pivotal's vectors; what ``ema/`` holds, in this order."""
    return (
        {"unet": accelerator.unwrap_model(unet)}
        | ({"text_encoder": accelerator.unwrap_model(text_encoder)} if text_encoder is not None else {})
        | ({"pivotal": pivots} if pivots is not None else {})  # the vectors, not a model
    )


# ------------------------------------------------------------------ train.ema in a checkpoint


def write_checkpoint_ema(folder: Path, models: dict[str, torch.nn.Module], *, lora: bool) -> None:
    """The average (already swapped in) as ``folder/ema/``: each model's LoRA in peft keys, or a full
    fine-tune's models as accelerate names them (``model``, ``model_1``)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from dreambooth_kit.training.pivotal import CHECKPOINT_FILE, checkpoint_tensors

    dest = folder / CHECKPOINT_EMA
    dest.mkdir()
    for i, (name, model) in enumerate(models.items()):
        if name == "pivotal":
            save_file(
                checkpoint_tensors(model), os.path.join(dest, CHECKPOINT_FILE), metadata={"format": "pt"}
            )
            continue
        state = get_peft_model_state_dict(model) if lora else model.state_dict()
        state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        file = name + LORA_SUFFIX if lora else ("model" if i == 0 else f"model_{i}") + ".safetensors"
        save_file(state, os.path.join(dest, file), metadata={"format": "pt"})


def read_checkpoint_ema(
    ema: TrainedEMA, folder: Path, models: dict[str, torch.nn.Module], *, lora: bool, steps: int
) -> None:
    """A checkpoint's ``ema/`` into ``ema``; the models' own weights are left as they were."""
    from safetensors.torch import load_file

    src = folder / CHECKPOINT_EMA
    if not src.is_dir():
        raise CheckpointError(
            f"{folder} holds no {CHECKPOINT_EMA}/ (it was trained without train.ema): resume it with "
            "train.ema=false, or start a new run with train.ema=true"
        )
    ema.model.store(ema.params)
    try:
        for i, (name, model) in enumerate(models.items()):
            if name == "pivotal":
                read_checkpoint_pivots(model, src)
            elif lora:
                load_lora_file(model, src / (name + LORA_SUFFIX))
            else:
                file = ("model" if i == 0 else f"model_{i}") + ".safetensors"
                model.load_state_dict(load_file(src / file))
        ema.take_from_model(steps)
    finally:
        ema.model.restore(ema.params)


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | os.PathLike,
    step: int,
    *,
    extra_state: dict,
    run_config: dict,
    keep_last: int | None,
    write_extra: Callable[[Path], None] | None = None,
    also_keep: Path | None = None,
) -> Path:
    """Write ``output_dir/checkpoints/step-NNNNNN`` atomically; then keep the newest ``keep_last``
    (and ``also_keep``: train.stop=auto's best step, whose weights the final output takes).
    ``write_extra(folder)``: more files into the checkpoint, by the main process, before it is sealed.

    Every process must call it (each writes its own RNG file; the main process writes the rest).
    On any failure the temporary folder is removed, nothing is pruned and earlier checkpoints are
    untouched; a full disk raises ``CheckpointError("no space left while saving step-…; step-… intact …")``
    and a file-size limit (``ulimit -f``) ``CheckpointError("file size limit reached while saving …")``.
    """
    from accelerate.utils import gather_object

    if "step" in extra_state:
        raise ValueError("extra_state must not contain 'step' (it is the step argument)")
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
    state_text = json.dumps({"step": step, **extra_state}, indent=2)  # TypeError now, not mid-save
    run_text = json.dumps(run_config, indent=2, default=str)

    name = step_name(step)
    root = Path(output_dir) / CHECKPOINTS
    final = root / name
    main = accelerator.is_main_process
    # Every process must write into the same folder: the main process's random name is shared.
    tmp = root / gather_object([temp_path(root / name).name])[0]
    try:
        failure, error = _write_checkpoint(accelerator, tmp, final, step, state_text, run_text, write_extra)
    except BaseException:
        if main:  # KeyboardInterrupt and friends: still leave no temporary folder behind
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if failure is not None:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _save_error(failure, root, name) from error
    if main:
        log.info("checkpoint saved: %s", final)
        _prune(root, keep_last, keep={final, also_keep})
    return final


def _write_checkpoint(
    accelerator: Accelerator,
    tmp: Path,
    final: Path,
    step: int,
    state_text: str,
    run_text: str,
    write_extra=None,
) -> tuple[tuple[str | None, str] | None, Exception | None]:
    """accelerate's state into ``tmp``, then (main process) our files, sync and rename to ``final``.
    Returns the first failure of any process (see :func:`_describe`) and this process's error."""
    from accelerate.utils import gather_object

    error: Exception | None = None
    try:
        with quieter(*ACCELERATE_STATE_LOGGERS):
            accelerator.save_state(str(tmp))
    except Exception as e:
        error = e
    # A failure on any process fails the save on all of them (and this also waits until
    # every process has written its RNG file, before the main process marks the folder complete).
    failure = _first_failure(gather_object([_describe(error, tmp)]))
    if failure is None and accelerator.is_main_process:
        try:
            if write_extra is not None:
                write_extra(tmp)
            (tmp / STATE).write_text(state_text)
            (tmp / RUN).write_text(run_text)
            files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in _files(tmp)}
            (tmp / COMPLETE).write_text(
                json.dumps({"format": FORMAT_VERSION, "step": step, "files": files}, indent=2)
            )
            fsync_tree(tmp)
            publish_folder(tmp, final)
        except Exception as e:
            error = e
    return _first_failure(gather_object([_describe(error, tmp)])), error


def _save_error(
    failure: tuple[str | None, str], root: Path, name: str
) -> CheckpointError | CheckpointSaveFailed:
    """The one-line error for a failed save: why, which earlier checkpoint is intact, what to do."""
    complete = _scan(root, logging.DEBUG)  # incl. an earlier save of this same step, if any
    intact = f"{complete[-1][1].name} intact" if complete else "no earlier checkpoint"
    reason, text = failure
    then = "then rerun with train.resume=latest"
    if reason == FILE_SIZE_LIMIT:
        limit = _file_size_limit()
        most = f"; files may be at most {_mb(limit)} here" if limit is not None else ""
        return CheckpointError(
            f"file size limit reached while saving {name}{most}; {intact} "
            f"(raise it with `ulimit -f unlimited`, {then})"
        )
    if reason == _OS_ERROR:  # the machine's (I/O, permissions): one line says it
        return CheckpointError(f"saving {name} failed ({text}); {intact}")
    if reason is not None:
        need = f"a checkpoint takes about {_mb(_size_of(complete[-1][1]))}; " if complete else ""
        return CheckpointError(
            f"no space left while saving {name}; {intact} ({need}free space on the disk of "
            f"{root.resolve()}, {then})"
        )
    return CheckpointSaveFailed(f"saving {name} failed ({text}); {intact}")


def _describe(error: BaseException | None, folder: Path) -> tuple[str | None, str] | None:
    """(disk_full_reason, text): a picklable summary to share between processes."""
    if error is None:
        return None
    reason = disk_full_reason(error, folder) or (_OS_ERROR if isinstance(error, OSError) else None)
    return reason, f"{type(error).__name__}: {_short(error)}"


_OS_ERROR = "os error"  # a failed write that is not a full disk (EIO, EACCES, ...): not a bug


def _first_failure(summaries: list) -> tuple[str | None, str] | None:
    failures = [s for s in summaries if s is not None]
    return failures[0] if failures else None


_ERRNO_REASONS = {errno.ENOSPC: NO_SPACE, errno.EDQUOT: NO_SPACE, errno.EFBIG: FILE_SIZE_LIMIT}
_TEXT_REASONS = (
    ("No space left on device", NO_SPACE),
    ("os error 28", NO_SPACE),  # ENOSPC as Rust (safetensors) prints it
    ("Disk quota exceeded", NO_SPACE),
    ("File too large", FILE_SIZE_LIMIT),
    ("os error 27", FILE_SIZE_LIMIT),  # EFBIG
)


def disk_full_reason(error: BaseException, folder: Path) -> str | None:
    """Whether a failed write into ``folder`` ran out of room: :data:`NO_SPACE` (a full disk or
    quota), :data:`FILE_SIZE_LIMIT` (``ulimit -f``, EFBIG) or None (another failure).

    Call it before the partly written files are removed. Only Python's own writes raise
    OSError(ENOSPC/EFBIG). safetensors raises SafetensorError("... File too large (os error 27)"),
    and torch.save a RuntimeError ("[enforce fail at inline_container.cc] unexpected pos 576 vs
    534") that names neither, so the files left in ``folder`` and the space left right now are
    looked at too. (CPython ignores SIGXFSZ, so exceeding the limit is an error, not a kill.)
    """
    seen = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _ERRNO_REASONS:
            return _ERRNO_REASONS[e.errno]
        for text, reason in _TEXT_REASONS:
            if text in str(e):
                return reason
        e = e.__cause__ or e.__context__
    limit = _file_size_limit()
    # A write stopped by the limit leaves its file exactly `limit` bytes long.
    if limit is not None and folder.is_dir() and any(p.stat().st_size >= limit for p in _files(folder)):
        return FILE_SIZE_LIMIT
    try:
        if shutil.disk_usage(folder if folder.exists() else folder.parent).free < _LOW_SPACE:
            return NO_SPACE
    except OSError:
        pass
    return None


def _is_no_space(error: BaseException, folder: Path) -> bool:
    """True when the write ran out of room in any way :func:`disk_full_reason` knows (a full
    disk, a quota or a file-size limit); use that function for which one."""
    return disk_full_reason(error, folder) is not None


def _file_size_limit() -> int | None:
    """The largest file this process may write (``ulimit -f``, in bytes), or None for no limit."""
    try:
        import resource
    except ImportError:  # Windows: no such limit
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def _size_of(folder: Path) -> int:
    return sum(p.stat().st_size for p in _files(folder))


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n} bytes"


def _short(error: BaseException, limit: int = 300) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return text if len(text) <= limit else text[:limit] + "…"


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _prune(root: Path, keep_last: int | None, *, keep: set[Path | None]) -> None:
    if keep_last is None:
        return
    complete = _owned(root.parent, _scan(root, logging.DEBUG))  # never another timeline's
    kept = {p for _, p in complete[-keep_last:]} | keep
    for _, path in complete:
        if path in kept:
            continue
        # Renamed away first (atomic): a kill during the slow delete then leaves a `.tmp-*` folder
        # for clean_tmp, never a `step-*` folder that still looks complete but lost files.
        aside = temp_path(path, "pruned-")
        try:
            os.rename(path, aside)
            shutil.rmtree(aside)
            log.info("removed old checkpoint %s (checkpoint.keep_last=%d)", path.name, keep_last)
        except OSError as e:  # the new checkpoint is safe; a failed cleanup must not fail training
            log.warning("could not remove old checkpoint %s: %s", path, e)


# ------------------------------------------------------------------ finding checkpoints


def _read_complete(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / COMPLETE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("files"), dict) else None


def _scan(root: Path, level: int) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = []
    for entry in sorted(root.iterdir()):
        match = _STEP_DIR.match(entry.name)
        if entry.name.startswith(".tmp-"):
            log.log(level, "ignoring %s: left by an interrupted save (clean_tmp removes it)", entry)
        elif not match or not entry.is_dir():
            log.log(level, "ignoring %s: not a checkpoint folder of this toolkit", entry)
        elif _read_complete(entry) is None:
            log.log(level, "ignoring %s: incomplete (no readable %s)", entry, COMPLETE)
        else:
            found.append((int(match.group(1)), entry))
    return sorted(found)


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """This run's complete checkpoints in ``output_dir/checkpoints`` as ``(step, path)``, oldest
    first: those of its timeline (``lineage.json``; see :mod:`dreambooth_kit.training.lineage`). Anything else
    there (``.tmp-*``, ``checkpoint-best``, folders without ``COMPLETE.json``, another timeline's
    steps) is skipped with an INFO notice."""
    return _owned(Path(output_dir), _scan(Path(output_dir) / CHECKPOINTS, logging.INFO), logging.INFO)


def all_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Every complete checkpoint in ``output_dir/checkpoints``, whatever timeline wrote it (what
    :mod:`dreambooth_kit.training.runfolder` sorts into this run's and an abandoned one's)."""
    return _scan(Path(output_dir) / CHECKPOINTS, logging.DEBUG)


def read_state(folder: Path) -> dict:
    """A checkpoint's ``state.json``, checked: an object whose step agrees with its folder name and
    its ``COMPLETE.json`` (a state.json copied from another checkpoint would resume at the wrong step)."""
    path = folder / STATE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read ({_short(e)}); {_earlier_hint(folder)}") from None
    name = _STEP_DIR.match(folder.name)
    steps = {
        "state.json": state.get("step") if isinstance(state, dict) else None,
        COMPLETE: (_read_complete(folder) or {}).get("step"),
        "the folder name": int(name.group(1)) if name else None,
    }
    wrong_shape = not isinstance(state, dict) or not isinstance(state.get("step"), int)
    if wrong_shape or len({v for v in steps.values() if v is not None}) != 1:
        said = ", ".join(f"{k} says {v}" for k, v in steps.items())
        raise CheckpointError(
            f"{path}: does not agree with its checkpoint ({said}); it was edited or copied from another "
            f"checkpoint. {_earlier_hint(folder)}"
        )
    return state


def checkpoint_lineage(folder: Path) -> str | None:
    return _state_field(folder, "lineage")


def _owned(
    run_dir: Path, found: list[tuple[int, Path]], level: int = logging.DEBUG
) -> list[tuple[int, Path]]:
    from dreambooth_kit.training.lineage import read_lineage

    lineage = read_lineage(run_dir)
    if lineage is None:
        return found
    owned = []
    for step, path in found:
        if lineage.owns(checkpoint_lineage(path), step):
            owned.append((step, path))
        else:
            log.log(level, "ignoring %s: written by another timeline of this folder (lineage.json)", path)
    return owned


def clean_tmp(output_dir: str | os.PathLike) -> list[Path]:
    """Remove ``checkpoints/.tmp-*`` left by a killed run. Call on the main process only, before
    training starts (never while a save may be running)."""
    root = Path(output_dir) / CHECKPOINTS
    removed = []
    for entry in sorted(root.glob(".tmp-*")) if root.is_dir() else []:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        log.info("removed %s, left by an interrupted checkpoint save", entry)
        removed.append(entry)
    return removed


def _earlier_hint(folder: Path) -> str:
    step = _STEP_DIR.match(folder.name)
    earlier = [p for s, p in _scan(folder.parent, logging.DEBUG) if step and s < int(step.group(1))]
    if earlier:
        return f"the checkpoint is damaged: resume from an earlier one, e.g. train.resume={earlier[-1].resolve()}"
    return "the checkpoint is damaged: resume from an earlier one or start fresh"


def resolve_resume(output_dir: str | os.PathLike, resume: str | None) -> Path | None:
    """``None`` → None; ``"latest"`` → the newest complete checkpoint (None + a notice if there is
    none); anything else is a checkpoint folder path, used exactly as given (relative to the working
    directory, never joined onto output_dir), which must exist and be complete."""
    if resume is None:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            log.info("no checkpoint in %s; starting fresh", (Path(output_dir) / CHECKPOINTS).resolve())
            return None
        return found[-1][1].resolve()
    path = Path(resume).expanduser().resolve()
    if not path.is_dir():
        hint = ""
        guess = Path(output_dir) / CHECKPOINTS / Path(resume).name
        if _read_complete(guess) is not None:
            hint = f"; did you mean {guess.resolve()}?"
        raise CheckpointError(f"train.resume: checkpoint folder not found: {path}{hint}")
    if _read_complete(path) is None:
        complete = [str(p.resolve()) for _, p in _scan(path.parent, logging.DEBUG)]
        others = f"; complete ones beside it: {', '.join(complete)}" if complete else ""
        raise CheckpointError(
            f"{path} is not a complete checkpoint (no readable {COMPLETE}: its save was interrupted, "
            f"or it is not a checkpoint folder){others}"
        )
    return path


# ------------------------------------------------------------------ loading


def load_checkpoint(accelerator, path: str | os.PathLike, *, force: bool = False) -> dict:
    """Restore models (LoRA via register_lora_hooks), optimizer, scheduler and RNG from ``path``
    with ``accelerator.load_state``; return the ``state.json`` dict (``step`` + extra_state).

    A missing or damaged RNG file fails: the resume could not be exact (``force``: a warning)."""
    from accelerate.utils import RNG_STATE_NAME

    path = Path(path).resolve()
    complete = _read_complete(path)
    if complete is None:
        raise CheckpointError(f"{path} is not a complete checkpoint (no readable {COMPLETE})")
    # COMPLETE.json's sizes catch truncated or missing files before any state is touched.
    for rel, size in sorted(complete["files"].items()):
        file = path / rel
        if rel.startswith(RNG_STATE_NAME):  # other processes' RNG files; ours is checked below
            continue
        if not file.is_file():
            raise CheckpointError(f"{file} is missing; {_earlier_hint(path)}")
        if file.stat().st_size != size:
            raise CheckpointError(
                f"{file} is {file.stat().st_size} bytes, {size} when saved; {_earlier_hint(path)}"
            )
    rng_file = path / f"{RNG_STATE_NAME}_{accelerator.process_index}.pkl"
    rng_size = complete["files"].get(rng_file.name)
    if not rng_file.is_file() or (rng_size is not None and rng_file.stat().st_size != rng_size):
        # accelerate only logs "Could not load random states" at INFO, and goes on: the resumed run
        # then differs from an uninterrupted one, which a resume promises it does not.
        what = "damaged" if rng_file.is_file() else "missing"
        msg = (
            f"{rng_file} is {what}: the random number generators cannot be restored, so the resumed run "
            "would not be the uninterrupted one"
        )
        if not force:
            raise CheckpointError(f"{msg}; {_earlier_hint(path)}, or set train.resume_force=true to go on")
        log.warning("%s (train.resume_force=true: continuing)", msg)
    state = read_state(path)
    try:
        with quieter(*ACCELERATE_STATE_LOGGERS):
            accelerator.load_state(str(path))
    except CheckpointError:
        raise
    except Exception as e:
        file = _file_being_read(e, path)
        if file is not None:
            # Not the raw error text: torch's "Weights only load failed … re-run with
            # weights_only=False" is misleading advice for a damaged file.
            raise CheckpointError(f"{file} cannot be read ({type(e).__name__}); {_earlier_hint(path)}") from e
        if not _is_setup_mismatch(e):
            raise  # a bug, not a checkpoint problem: its traceback is what a report needs
        raise CheckpointError(
            f"{path} could not be restored ({type(e).__name__}: {_short(e)}); was it saved by a "
            "different setup (optimizer, number of trained models)?"
        ) from e
    return state


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


# ------------------------------------------------------------------ compatibility


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
    saved_photos = _state_field(path, "photos")
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


def _state_field(folder: Path, key: str):
    try:
        state = json.loads((folder / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state.get(key) if isinstance(state, dict) else None


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

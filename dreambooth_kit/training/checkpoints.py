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

import functools
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from dreambooth_kit.training.checkpoint_index import (
    CHECKPOINTS,
    COMPLETE,
    FORMAT_VERSION,
    RUN,
    STATE,
    CheckpointError,
    CheckpointSaveFailed,
    _earlier_hint,
    _owned,
    _read_complete,
    _scan,
    list_checkpoints,
    read_state,
    step_name,
)
from dreambooth_kit.training.lora_state import trained_models, write_checkpoint_ema
from dreambooth_kit.training.resume_checks import _file_being_read, _is_setup_mismatch
from dreambooth_kit.util.atomic import fsync_tree, publish_folder, temp_path
from dreambooth_kit.util.disk_space import (
    FILE_SIZE_LIMIT,
    _file_size_limit,
    _files,
    _mb,
    _short,
    _size_of,
    disk_full_reason,
)
from dreambooth_kit.util.logs import ACCELERATE_STATE_LOGGERS, quieter

if TYPE_CHECKING:
    from accelerate import Accelerator

    from dreambooth_kit.training.loop import LoopState

log = logging.getLogger("dreambooth_kit")


# ------------------------------------------------------------------ LoRA-only model state


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


# ------------------------------------------------------------------ train.ema in a checkpoint


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


# ------------------------------------------------------------------ compatibility

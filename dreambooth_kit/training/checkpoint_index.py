"""The checkpoints a run folder holds, found and read: their names (``checkpoints/step-000250/``), the
completed ones (a readable ``COMPLETE.json``) of this timeline, a checkpoint's ``state.json``, and the
error every checkpoint problem raises. Writing and restoring them is checkpoints.py."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from dreambooth_kit.errors import UserError
from dreambooth_kit.util.disk_space import (
    _short,
)

log = logging.getLogger("dreambooth_kit")

CHECKPOINTS = "checkpoints"


COMPLETE = "COMPLETE.json"


STATE = "state.json"


RUN = "run.json"


LORA_SUFFIX = "_lora.safetensors"


FORMAT_VERSION = 1


_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint could not be written, found or restored; the message says what to do."""


class CheckpointSaveFailed(RuntimeError):
    """A save failed for a reason that is not the disk's (a full disk or a size limit is a
    :class:`CheckpointError`): says which checkpoint is intact, and is no UserError, so the CLI
    shows the traceback of the cause (``__cause__``), which is what a bug report needs."""


def step_name(step: int) -> str:
    return f"step-{step:06d}"


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
    return state_field(folder, "lineage")


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


def _earlier_hint(folder: Path) -> str:
    step = _STEP_DIR.match(folder.name)
    earlier = [p for s, p in _scan(folder.parent, logging.DEBUG) if step and s < int(step.group(1))]
    if earlier:
        return f"the checkpoint is damaged: resume from an earlier one, e.g. train.resume={earlier[-1].resolve()}"
    return "the checkpoint is damaged: resume from an earlier one or start fresh"


def state_field(folder: Path, key: str):
    try:
        state = json.loads((folder / STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state.get(key) if isinstance(state, dict) else None

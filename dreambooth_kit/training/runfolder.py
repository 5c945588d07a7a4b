"""A run folder (``train.output_dir``) as one object: its config, model source, this timeline's
checkpoints, its final output and ``eval/``; and the one place that decides, when a training starts
in it, which timeline that training continues (see :mod:`dreambooth_kit.training.lineage`).

What a training start may find, and what happens:

- nothing (a new folder, or only class images): a new timeline;
- a finished or interrupted run, without ``train.resume``: refused before anything is written
  (naming what is there), unless ``train.overwrite=true``, which moves that run aside;
- ``train.resume`` at the newest checkpoint of the timeline: the same timeline goes on;
- ``train.resume`` at an earlier checkpoint (or one from another folder): a new timeline from that
  step; the later checkpoints, the final output, ``export/``, ``eval/`` and the later samples of the
  old one are moved to ``abandoned/<lineage id>-after-step-NNNNNN/``, kept, never deleted.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from dreambooth_kit.errors import UserError
from dreambooth_kit.training.layout import RunLayout
from dreambooth_kit.training.lineage import Lineage, read_lineage, write_lineage
from dreambooth_kit.util.atomic import write_json

log = logging.getLogger("dreambooth_kit")

ABANDONED = "abandoned"
_STEP = re.compile(r"^step-(\d+)$")


class RunFolderError(UserError, FileExistsError):
    """A training would mix with what its folder already holds; the message says what to do."""


@dataclass(frozen=True)
class Run:
    root: Path

    @classmethod
    def open(cls, path: str | os.PathLike) -> Run:
        return cls(Path(path))

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.root)

    @property
    def lineage(self) -> Lineage | None:
        return read_lineage(self.root)

    def config(self) -> dict | None:
        """config.yaml as a dict (None if it is missing or unreadable)."""
        import yaml

        try:
            data = yaml.safe_load(self.layout.config.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            return None
        return data if isinstance(data, dict) else None

    def model_source(self):
        from dreambooth_kit.models.source import ModelSource

        return ModelSource.read(self.root)

    def checkpoints(self) -> list[tuple[int, Path]]:
        """This timeline's complete checkpoints, oldest first."""
        from dreambooth_kit.training.checkpoint_index import list_checkpoints

        return list_checkpoints(self.root)

    def all_checkpoints(self) -> list[tuple[int, Path]]:
        """Every complete checkpoint in the folder, whatever timeline wrote it."""
        from dreambooth_kit.training.checkpoint_index import all_checkpoints

        return all_checkpoints(self.root)

    def final(self) -> Path | None:
        """The finished LoRA or pipeline folder, if there is one."""
        for folder in (self.layout.lora, self.layout.pipeline):
            if folder.is_dir() and any(folder.iterdir()):
                return folder
        return None

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    # -------------------------------------------------------------- starting a training in it

    def refuse_to_mix(self, *, resume: bool, overwrite: bool) -> None:
        """A fresh training (no ``train.resume``) into a folder holding another run's results or
        checkpoints is refused, unless ``overwrite`` (then :meth:`begin` moves that run aside)."""
        if resume or overwrite:
            return
        final, found = self.final(), self.all_checkpoints()
        if final is not None:
            what = "model" if final.name == "pipeline" else "LoRA"
            raise RunFolderError(
                f"{final.resolve()} already holds a trained {what}. Choose another train.output_dir, or "
                "set train.overwrite=true to start over (the earlier run is moved to "
                f"{self.root.resolve() / ABANDONED}/, not deleted)"
            )
        if found:
            raise RunFolderError(
                f"{self.root.resolve()} holds checkpoints of a run that did not finish (newest "
                f"{found[-1][1].name}). Continue it with train.resume=latest, choose another "
                "train.output_dir, or set train.overwrite=true to start over (its checkpoints are moved "
                f"to {self.root.resolve() / ABANDONED}/, not deleted)"
            )

    def begin(self, resume_from: Path | None) -> Lineage:
        """Decide the timeline of a training starting now (main process only, after every check
        passed) and move aside what is not part of it; returns it, written to lineage.json."""
        from dreambooth_kit.training.checkpoint_index import checkpoint_lineage, read_state

        current = self.lineage or Lineage(Lineage.new_id())
        if resume_from is None:
            self._move_aside(current.id, None, self.all_checkpoints())
            lineage = Lineage(Lineage.new_id())
        else:
            step = read_state(resume_from)["step"]
            origin = checkpoint_lineage(resume_from)
            ours = [(s, p) for s, p in self.all_checkpoints() if p.resolve() != resume_from.resolve()]
            inside = resume_from.resolve().parent == self.layout.checkpoints.resolve()
            # From another folder's checkpoint, nothing here is that timeline's history.
            later = [
                (s, p) for s, p in ours
                if not inside or s > step or not current.owns(checkpoint_lineage(p), s)
            ]  # fmt: skip
            if inside and not later and current.owns(origin, step):
                lineage = current  # the newest step of this timeline: it goes on
            else:
                self._move_aside(origin or current.id, step, later)
                lineage = current.branch(origin, step)
                log.info(
                    "resuming from %s starts a new timeline of %s (lineage %s)",
                    resume_from.name,
                    self.root,
                    lineage.id,
                )
        write_lineage(self.root, lineage)
        return lineage

    def _move_aside(
        self, lineage_id: str, step: int | None, checkpoints: list[tuple[int, Path]]
    ) -> Path | None:
        """Move ``checkpoints`` and the outputs made after ``step`` (None: all of them) into
        ``abandoned/<id>[-after-step-N]/``; returns that folder (None if there was nothing)."""
        layout = self.layout
        later_samples = [
            p for p in sorted(layout.samples.glob("step-*"))
            if (m := _STEP.match(p.name)) and (step is None or int(m.group(1)) > step)
        ]  # fmt: skip
        finals = [layout.lora, layout.pipeline, layout.final_ema("lora"), layout.final_ema("full")]
        outputs = [p for p in (*finals, layout.export, self.eval_dir) if p.exists()]
        moving = [p for _, p in checkpoints] + later_samples + outputs
        if not moving:
            return None
        name = lineage_id + (f"-after-step-{step:06d}" if step is not None else "")
        aside = self.root / ABANDONED / name
        if aside.exists():  # the same point abandoned twice: keep both
            aside = aside.with_name(f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
        for path in moving:
            target = aside / path.relative_to(self.root)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(path, target)  # same file system: atomic, nothing copied
        record = {
            "lineage": lineage_id,
            "after_step": step,
            "moved": [p.relative_to(self.root).as_posix() for p in moving],
        }
        write_json(aside / "ABANDONED.json", record, indent=2)  # what was moved, and from which timeline
        log.warning(
            "moved %d item(s) of an earlier timeline aside to %s (kept, not deleted): %s",
            len(moving), aside, ", ".join(p.relative_to(self.root).as_posix() for p in moving[:6]),
        )  # fmt: skip
        return aside

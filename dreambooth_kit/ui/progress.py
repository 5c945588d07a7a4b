"""What a run folder says about its training, for the UI's live view: the steps and losses the
trainer appends to ``progress.jsonl`` (one line per optimizer step), the time left at the measured
pace, the validation grids (``samples/step-*/grid.png``) and the state of the UI's jobs in it.

Everything is read from files, so a training started on the command line shows too, and a UI server
started later sees one an earlier server started.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from dreambooth_kit.training.runreport import duration
from dreambooth_kit.ui.jobs import STOPPED, Job, jobs

# As the training loop writes it (dreambooth_kit/training/loop.py; a test keeps the two the same).
PROGRESS_FILE = "progress.jsonl"
PACE_STEPS = 20  # the pace is the median of the latest steps' seconds
_STEP_FOLDER = re.compile(r"^step-(\d+)$")


@dataclass
class Progress:
    step: int
    max_steps: int
    losses: list[tuple[int, float]]  # (step, loss) of this timeline, non-finite steps left out
    pace: float | None  # seconds a step, measured on the latest steps
    last_time: float  # when the latest step ended (unix time)

    def eta(self) -> str:
        if self.pace is None or self.step >= self.max_steps:
            return ""
        left = duration(self.pace * (self.max_steps - self.step))
        return f"about {left} left ({self.pace:.2f} s a step, plus validation and checkpoints)"


def read_progress(run_dir: Path) -> Progress | None:
    """The latest timeline's steps (a resume continues a timeline, a fresh start begins another);
    None before the first step. A line cut short by a write in progress is skipped."""
    try:
        text = (Path(run_dir) / PROGRESS_FILE).read_text(encoding="utf-8")
    except OSError:
        return None
    lines = []
    for raw in text.splitlines():
        try:
            line = json.loads(raw)
        except ValueError:
            continue
        if isinstance(line, dict) and isinstance(line.get("step"), int):
            lines.append(line)
    if not lines:
        return None
    lineage = lines[-1].get("lineage")
    by_step = {x["step"]: x for x in lines if x.get("lineage") == lineage}  # a step written twice: the later
    steps = [by_step[s] for s in sorted(by_step)]
    last = lines[-1]
    recent = [x["seconds"] for x in steps[-PACE_STEPS:] if isinstance(x.get("seconds"), (int, float))]
    return Progress(
        step=last["step"],
        max_steps=int(last.get("max_steps") or last["step"]),
        losses=[(x["step"], x["loss"]) for x in steps if isinstance(x.get("loss"), (int, float))],
        pace=statistics.median(recent[1:] or recent) if recent else None,  # the first step pays warm-up
        last_time=float(last.get("time") or 0.0),
    )


def grids(run_dir: Path) -> list[tuple[Path, int]]:
    """The validation grids so far, by step: (grid.png, step)."""
    found = []
    for folder in (Path(run_dir) / "samples").glob("step-*"):
        m = _STEP_FOLDER.match(folder.name)
        if m and (folder / "grid.png").is_file():
            found.append((folder / "grid.png", int(m.group(1))))
    return sorted(found, key=lambda g: g[1])


@dataclass
class RunStatus:
    state: str  # none | starting | running | finished | stopped | failed
    message: str
    progress: Progress | None = None
    grids: list[tuple[Path, int]] = field(default_factory=list)
    log: str = ""
    job: Job | None = None

    @property
    def active(self) -> bool:
        return self.state in ("starting", "running")


def run_status(run_dir: Path) -> RunStatus:
    """The state of the run's newest job that matters (a running one before a newer one that was
    refused), its progress, grids and the tail of its log."""
    run_dir = Path(run_dir)
    found = jobs(run_dir)
    progress, shown = read_progress(run_dir), grids(run_dir)
    if not found:
        done = any((run_dir / d).is_dir() for d in ("lora", "pipeline"))
        message = "a finished run" if done else "no training started here from the UI yet"
        return RunStatus("finished" if done else "none", message, progress, shown)
    job = next((j for j in reversed(found) if j.running()), found[-1])
    state, message = _job_state(job, progress)
    if found[-1] is not job and found[-1].returncode() not in (None, 0):
        message += f"; a later start was refused: {_last_error(found[-1])}"
    if state == "starting":
        progress = None  # the steps on file are an earlier training's
    return RunStatus(state, message, progress, shown, job.log_tail(), job)


def _job_state(job: Job, progress: Progress | None) -> tuple[str, str]:
    started = float(job.info().get("started") or time.time())
    if job.running():
        if progress is None or progress.last_time < started:
            return "starting", "starting: " + (job.log_tail(1) or "loading")
        return "running", f"training: step {progress.step} of {progress.max_steps}"
    code = job.returncode()
    if code == 0:
        made = [d for d in ("lora", "pipeline") if (job.folder.parents[1] / d).is_dir()]
        return "finished", f"its result is in the run folder's {made[0]}/" if made else "done"
    if code in STOPPED:
        step = f" at step {progress.step}" if progress else ""
        return "stopped", f"stopped{step} with a checkpoint ({STOPPED[code]}); Resume continues it"
    if code is None:
        return (
            "failed",
            "ended without an exit code (its process was killed); Resume continues from its last checkpoint",
        )
    return "failed", f"failed (exit code {code}): {_last_error(job)}"


def _last_error(job: Job) -> str:
    """The last ``error: ...`` line of the job's log (the one-line message of a UserError), else its last line."""
    tail = job.log_tail(200).splitlines()
    errors = [line.removeprefix("error: ") for line in tail if line.startswith("error: ")]
    return errors[-1] if errors else (tail[-1] if tail else "no output")

"""Trainings started from the UI, each in a process of its own that outlives the browser and the UI
server.

A job is a folder ``<run>/ui-jobs/<started>/``: ``job.json`` (the command, its process group, when
it started), ``train.log`` (everything the training printed) and, once it has ended, ``exit.json``
(its exit code). The command runs under a small keeper, this module's :func:`main`
(``python -m dreambooth_kit.ui.jobs FOLDER -- COMMAND...``), in a session and process group of its
own: a Ctrl-C in the UI server's terminal, or the server's end, does not reach it. The keeper is
there because the trainer asks the kernel for SIGTERM when its parent ends (``die_with_parent``,
for ``accelerate launch``): with the UI server, or one of its worker threads, as that parent, a
training would be stopped whenever the server let a thread go. The keeper lives exactly as long as
the training, waits for it and writes its exit code.

Stop is SIGTERM to the whole group: the trainer finishes its step, writes a checkpoint and exits
with 143; the keeper ignores the signal and records that code. Every status is read from these files
(and the process group), so a UI server started later sees the jobs an earlier one started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from dreambooth_kit.util.atomic import write_json

JOBS = "ui-jobs"
# The exit codes of a training stopped by a signal after its checkpoint (128 + the signal).
STOPPED = {128 + signal.SIGTERM: "SIGTERM", 128 + signal.SIGINT: "SIGINT"}


@dataclass(frozen=True)
class Job:
    folder: Path

    @property
    def log(self) -> Path:
        return self.folder / "train.log"

    @property
    def info_file(self) -> Path:
        return self.folder / "job.json"

    @property
    def exit_file(self) -> Path:
        return self.folder / "exit.json"

    def info(self) -> dict:
        return _read_json(self.info_file)

    def returncode(self) -> int | None:
        """The command's exit code once it has ended, else None."""
        code = _read_json(self.exit_file).get("returncode")
        return code if isinstance(code, int) else None

    def running(self) -> bool:
        """Not ended, and its process group is alive (a job whose keeper was killed with -9 is not)."""
        if self.exit_file.exists():
            return False
        pgid = self.info().get("pgid")
        if not isinstance(pgid, int):
            return not self.info_file.exists()  # between the start and job.json: starting
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # alive, another user's: not ours to stop, but running
            return True
        return True

    def stop(self) -> bool:
        """SIGTERM to the job's process group: the training checkpoints and ends. False if it had ended."""
        pgid = self.info().get("pgid")
        if not self.running() or not isinstance(pgid, int):
            return False
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            return False
        return True

    def log_tail(self, lines: int = 40, max_bytes: int = 64_000) -> str:
        """The log's last ``lines`` lines; a progress bar's carriage-return updates count as lines,
        so only its latest state shows."""
        try:
            with open(self.log, "rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
                text = f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        rows = [next((s for s in reversed(r.split("\r")) if s.strip()), "") for r in text.split("\n")]
        return "\n".join([r for r in rows if r][-lines:])


def jobs(run_dir: Path) -> list[Job]:
    """The run folder's jobs, oldest first."""
    folder = Path(run_dir) / JOBS
    if not folder.is_dir():
        return []
    return [Job(p) for p in sorted(folder.iterdir()) if p.is_dir()]


def running_job(run_dir: Path) -> Job | None:
    return next((j for j in reversed(jobs(run_dir)) if j.running()), None)


def start(run_dir: Path, command: list[str], *, cwd: Path, env: dict | None = None) -> Job:
    """Start ``command`` under the keeper as a new job of ``run_dir``; returns at once."""
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 10**9:09d}"
    job = Job(Path(run_dir) / JOBS / stamp)
    job.folder.mkdir(parents=True)
    env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    keeper = [sys.executable, "-m", "dreambooth_kit.ui.jobs", str(job.folder), "--", *command]
    with open(job.log, "ab") as log:
        proc = subprocess.Popen(
            keeper, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    write_json(job.info_file, {"pgid": proc.pid, "command": command, "cwd": str(cwd), "started": time.time()})
    # Reaped when it ends (no zombie while this server runs); nothing else waits for it.
    threading.Thread(target=proc.wait, name=f"reap-{proc.pid}", daemon=True).start()
    return job


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def main(argv: list[str] | None = None) -> int:
    """The keeper: run the command after ``--``, wait for it through any signal (the command, in the
    same process group, gets the same signal and ends in its own way), write its exit code."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 3 or args[1] != "--":
        print("usage: python -m dreambooth_kit.ui.jobs JOB_FOLDER -- COMMAND...", file=sys.stderr)
        return 2
    job = Job(Path(args[0]))
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)  # a handler, not SIG_IGN: the command starts with the default
    try:
        code = subprocess.Popen(args[2:]).wait()
    except OSError as e:  # the command could not start at all
        print(f"error: {args[2]}: {e}", file=sys.stderr)
        code = 127
    write_json(job.exit_file, {"returncode": code, "ended": time.time()})
    return code


if __name__ == "__main__":
    raise SystemExit(main())

"""What stops training cleanly: preemption signals and non-finite losses.

Colab disconnects, SLURM/Kubernetes preemption and Ctrl-C arrive as SIGTERM/SIGINT. The handler only
sets a flag; the loop finishes the step in flight, writes a checkpoint and raises
:class:`TrainingInterrupted`, which the entry points turn into exit code 128 + signal (143, 130).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading

from dreambooth_kit.errors import NonFiniteError, UserError

log = logging.getLogger("dreambooth_kit")


class TrainingInterrupted(UserError, RuntimeError):
    """SIGTERM/SIGINT stopped training after a checkpoint; the message has the command that resumes.
    A stop the user (or their scheduler) asked for, not a failure: printed without ``error:``, and the
    exit code is 128 + the signal, as a shell reports a process killed by it (143, 130)."""

    prefix = ""

    def __init__(self, step: int, signum: int, checkpoint, resume_hint: str):
        self.step, self.signum, self.checkpoint = step, signum, checkpoint
        self.exit_code = 128 + signum
        super().__init__(f"interrupted at step {step}; resume with: {resume_hint}")


class NonFiniteLossError(NonFiniteError):
    """More non-finite losses in a row than train.max_nonfinite_steps allows. Exit code 1, not 2:
    the config was valid and the run diverged, and scripts tell a bad config (2) from that."""

    exit_code = 1


class StopSignals:
    """Context manager: SIGTERM/SIGINT set ``self.signum`` instead of killing the process.

    A second SIGINT restores the default behaviour (KeyboardInterrupt), so a user who presses Ctrl-C
    twice is never stuck behind a slow checkpoint. Outside the main thread (signal handlers can only
    be installed there) it does nothing.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning(
            "received %s: finishing the current step, then saving a checkpoint", signal.Signals(signum).name
        )

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)


def die_with_parent() -> None:
    """Ask Linux to send us SIGTERM when our parent process dies.

    ``accelerate launch`` (single process) starts the trainer with ``subprocess.Popen`` and does not
    forward SIGTERM: the launcher dies and the trainer runs on, orphaned, until the machine is taken
    away. With PR_SET_PDEATHSIG the kernel delivers SIGTERM to the trainer the moment the launcher
    dies, and our handler checkpoints. (torchrun's agent forwards SIGTERM itself.)
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:  # not glibc: no parent-death signal, SIGTERM to the trainer itself still works
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


class NonFiniteGuard:
    """Counts steps whose loss or gradient norm is NaN/inf (each such step is skipped); after
    ``limit`` in a row it raises, listing the steps."""

    def __init__(self, limit: int):
        self.limit = limit
        self.steps: list[int] = []  # every skipped step
        self.in_a_row = 0

    def record(self, step: int, finite: bool, what: str = "loss") -> None:
        if finite:
            self.in_a_row = 0
            return
        self.steps.append(step)
        self.in_a_row += 1
        log.warning("non-finite %s at step %d: step skipped (%d in a row)", what, step, self.in_a_row)
        if self.in_a_row >= self.limit:
            recent = self.steps[-self.in_a_row :]
            raise NonFiniteLossError(
                f"non-finite loss at steps {recent}: stopped after {self.in_a_row} in a row "
                f"(train.max_nonfinite_steps={self.limit}). No LoRA or model was written from these "
                "weights. Lower train.learning_rate, use train.mixed_precision=bf16 or no, or resume "
                "from the last checkpoint."
            )

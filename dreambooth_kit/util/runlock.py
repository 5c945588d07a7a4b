"""One training per output folder (and one class-image generator per class folder).

A Colab cell run twice or two terminals pointed at one ``output_dir`` used to both exit 0: the second
silently replaced the first one's LoRA, ``config.yaml`` and ``lora/`` came from different runs and both
wrote every checkpoint. The lock is an OS file lock (filelock's ``flock``): the kernel releases it when
the holder dies, however it dies, so a killed run never blocks the next one. Beside it a small JSON
file names the holder (pid, host, start time, command) for the refusal message; finding that file
while the lock itself is free means its holder died: the lock is taken over with a notice.
On filesystems without ``flock`` filelock falls back to a lock file that exists while held.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from dreambooth_kit.errors import UserError
from dreambooth_kit.util.atomic import write_json

log = logging.getLogger("dreambooth_kit")

LOCK_NAME = ".dreambooth_kit.lock"
HOLDER_NAME = ".dreambooth_kit.lock.json"


class FolderInUse(UserError, RuntimeError):
    """Another live process holds the folder's lock; the message names it."""


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started))
        if isinstance(started, (int, float))
        else "?"
    )
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {when}"


def _read_holder(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class FolderLock:
    """``with FolderLock(folder, "training"):`` holds ``folder/.dreambooth_kit.lock`` or raises
    :class:`FolderInUse` at once (never waits: a second run should not sit silently behind a
    training that takes hours)."""

    def __init__(self, folder: str | os.PathLike, purpose: str, *, setting: str = "train.output_dir"):
        self.folder = Path(folder)
        self.purpose, self.setting = purpose, setting
        self._lock = None

    @property
    def holder_file(self) -> Path:
        return self.folder / HOLDER_NAME

    def acquire(self) -> FolderLock:
        from filelock import FileLock, Timeout

        self.folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.folder / LOCK_NAME), timeout=0, thread_local=False)
        try:
            lock.acquire()
        except Timeout:
            holder = _read_holder(self.holder_file)
            who = _describe(holder) if holder else "another process"
            command = f" ({holder['command']})" if holder and holder.get("command") else ""
            raise FolderInUse(
                f"{self.folder.resolve()} is in use by another {holder.get('purpose', 'run') if holder else 'run'}: "
                f"{who}{command}. Wait for it to finish or stop it, or choose another {self.setting}."
            ) from None
        stale = _read_holder(self.holder_file)
        if stale is not None:
            log.warning(
                "taking over the lock of %s: %s held it for %s and is no longer running",
                self.folder,
                _describe(stale),
                stale.get("purpose", "a run"),
            )
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "purpose": self.purpose,
            "command": " ".join(sys.argv)[:300],
        }
        write_json(self.holder_file, holder, indent=2)
        self._lock = lock
        return self

    def release(self) -> None:
        if self._lock is None:
            return
        try:
            self.holder_file.unlink(missing_ok=True)  # first: a present file with a free lock means "died"
        finally:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

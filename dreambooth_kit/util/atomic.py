"""Atomic writes: a file or folder is either the old one or the whole new one, never half-written.

Every write goes to a temporary name in the same folder (``.tmp-<name>-<random>``, so the cleanups that
remove ``.tmp-*`` leftovers of a killed run find it) and is then renamed over the final name. A file
is replaced with ``os.replace``; a folder, which ``os.replace`` cannot replace when it is non-empty,
with Linux's atomic exchange (``renameat2(RENAME_EXCHANGE)``: Python has no wrapper for it) where the
filesystem has it, else by moving the old folder aside first. Checkpoints, the final LoRA or
pipeline, exports, class images, PNGs, manifests, configs and caches all write through here.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TMP_PREFIX = ".tmp-"


def temp_path(final: str | Path, tag: str = "") -> Path:
    """A fresh temporary name beside ``final``: ``.tmp-<tag><name>-<8 hex digits>``."""
    final = Path(final)
    return final.with_name(f"{TMP_PREFIX}{tag}{final.name}-{secrets.token_hex(4)}")


@contextlib.contextmanager
def writing(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; write the file there. On success it replaces
    ``final``; on any error it is removed and ``final`` is untouched."""
    final = Path(final)
    tmp = temp_path(final)
    try:
        yield tmp
        with_umask(tmp)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def with_umask(path: Path) -> None:
    """Give a written file (or every file and folder under a written folder) the permissions a
    plain ``open()``/``mkdir`` gives under the process's umask: 0644/0755 under the usual 022.
    safetensors (0.8) creates its files owner-only (0600) whatever the umask, so a LoRA copied to
    an A1111 or ComfyUI that runs as another user (Docker, a shared server) could not be read."""
    mask = os.umask(0)
    os.umask(mask)  # reading the umask means setting it: put it straight back
    paths = [path] + (sorted(path.rglob("*")) if path.is_dir() else [])
    for p in paths:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with writing(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    with writing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj: Any, **dumps: Any) -> Path:
    return write_text(path, json.dumps(obj, **dumps) + "\n")


@contextlib.contextmanager
def writing_folder(final: str | Path, *, durable: bool = False) -> Iterator[Path]:
    """Yield a new temporary folder beside ``final``; fill it. On success it replaces ``final``
    (see :func:`publish_folder`); on any error it is removed and ``final`` is untouched.
    ``durable``: fsync every file first (checkpoints and final outputs: a power cut after the
    rename must not leave a folder of empty files)."""
    final = Path(final)
    tmp = temp_path(final)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if durable:
            fsync_tree(tmp)
        publish_folder(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; the old folder after an exchange


def publish_folder(tmp: Path, final: Path) -> None:
    """Rename the finished temporary folder to its final name, replacing an existing one atomically."""
    with_umask(tmp)  # before it is visible under its final name
    if not final.exists():
        os.rename(tmp, final)
    elif exchange(tmp, final):  # now `tmp` holds the replaced folder
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        # os.replace cannot replace a non-empty folder. Without an atomic exchange, move the old one
        # aside first: a kill between the two renames loses the new folder (a checkpoint: this step),
        # never one that was complete before.
        aside = temp_path(final, "replaced-")
        os.rename(final, aside)
        try:
            os.rename(tmp, final)
        except OSError:
            os.rename(aside, final)  # put the earlier one back
            raise
        shutil.rmtree(aside, ignore_errors=True)
    fsync_dir(final.parent)


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two folders (Linux renameat2 RENAME_EXCHANGE; Python has no wrapper for it).
    False where unsupported (other systems, old kernels, some filesystems)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def fsync_tree(folder: Path) -> None:
    """A rename is only durable once the data it points to is: flush every file, then the folders."""
    files = [p for p in Path(folder).rglob("*") if p.is_file()]
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for d in sorted({p.parent for p in files} | {Path(folder)}, key=lambda p: -len(p.parts)):
        fsync_dir(d)


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory; its renames are not fsync-able anyway
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

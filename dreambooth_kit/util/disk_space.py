"""Why a write failed, when it ran out of room: a full disk, a quota or a file-size limit (``ulimit -f``),
told apart from other failures so the error can name the fix. Used where checkpoints and final outputs
are written."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

_LOW_SPACE = 1 << 20  # bytes free under which a failed write is taken for a full disk


# What disk_full_reason() answers: the two ways a write runs out of room.
NO_SPACE = "no space left"


FILE_SIZE_LIMIT = "file size limit"


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

"""SHA-256 of model files, computed once per file version and remembered on disk.

SD 2.1's single-file checkpoint is 5.2 GB and its UNet file 3.5 GB: ~10-15 s each to hash on 2 CPU
cores. A run needs the hash in several places (the single-file cache folder's name, A1111's "Model
hash" in every PNG, the run's model record), so it is remembered by (path, size, mtime), in this
process and in ``<cache>/hashes.json``, as A1111 remembers its own hashes: each file version is read
once per machine. hashlib does the hashing; only the remembering is written here, because no
library keeps such an index.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

from dreambooth_kit.util.atomic import write_json

# How many times a file was actually read in this process (tests assert a run hashes a file once).
reads = 0


def sha256_file(path: str | Path, *, after_header: bool = False) -> str:
    """The file's SHA-256 as 64 hex digits. ``after_header``: of the bytes after a safetensors
    header (the LoRA hash A1111 and civitai show: editing the metadata, which lives in the header,
    keeps it)."""
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns, after_header)


@lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime: int, after_header: bool) -> str:
    from dreambooth_kit.util.cache_dir import cache_root

    global reads
    index = cache_root() / "hashes.json"
    key = f"{path}|{size}|{mtime}|sha256" + ("|after-header" if after_header else "")
    try:
        known = json.loads(index.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    reads += 1
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if after_header:
            # safetensors layout: 8-byte little-endian header length N, N bytes of JSON, then the data.
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    _remember(index, key, digest)
    return digest


def _remember(index: Path, key: str, digest: str) -> None:
    """Add one entry: re-read under a lock, then write whole. Processes hash at once (two ranks, a
    run beside `dreambooth-kit generate`); each writing the index it read before hashing (seconds
    earlier, for a 5 GB file) dropped the entries the others added meanwhile."""
    from filelock import FileLock, Timeout

    try:
        index.parent.mkdir(parents=True, exist_ok=True)
        # A lock held longer than a minute is a stuck process: skip remembering rather than wait.
        with FileLock(f"{index}.lock", timeout=60):
            try:
                known = json.loads(index.read_text())
            except (OSError, ValueError):
                known = {}
            known = known if isinstance(known, dict) else {}
            known[key] = digest
            write_json(index, known)
    except (OSError, Timeout):  # a read-only cache only costs the hash again next time
        pass


def forget() -> None:
    """Drop this process's memory of hashes (the disk index stays): for tests."""
    _sha256.cache_clear()

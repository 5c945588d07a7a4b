"""The toolkit's cache folder: built-in models, converted single files, remembered file hashes."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$DREAMBOOTH_KIT_CACHE, else $XDG_CACHE_HOME/dreambooth_kit (~/.cache/dreambooth_kit)."""
    root = os.environ.get("DREAMBOOTH_KIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "dreambooth_kit"
    )
    return Path(root)

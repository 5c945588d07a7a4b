"""File hashes remembered on disk (dreambooth_kit.util.hashing)."""

from __future__ import annotations

import json

from dreambooth_kit.util import hashing


def test_an_entry_added_by_another_process_while_hashing_is_kept(tmp_path, monkeypatch, _cache_dir):
    """Before, the index read before hashing was written back after it: an entry another process
    added meanwhile (two ranks hashing at once) was lost. The other process is played by the hash
    itself, which adds an entry to the index on its first chunk: an event, not a timing."""
    import hashlib

    index = _cache_dir / "hashes.json"
    real = hashlib.sha256

    class Racing:
        def __init__(self):
            self.h, self.first = real(), True

        def update(self, chunk):
            if self.first:
                known = json.loads(index.read_text()) if index.exists() else {}
                index.write_text(json.dumps({**known, "other-process|1|1|sha256": "f" * 64}))
                self.first = False
            self.h.update(chunk)

        def hexdigest(self):
            return self.h.hexdigest()

    monkeypatch.setattr(hashlib, "sha256", Racing)
    hashing.forget()
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"x" * 1000)
    digest = hashing.sha256_file(f)
    known = json.loads(index.read_text())
    assert "other-process|1|1|sha256" in known
    assert digest in known.values() and digest == real(b"x" * 1000).hexdigest()

"""Atomic writes: the old file/folder or the whole new one, never half of either, and no leftovers."""

from __future__ import annotations

import pytest

from dreambooth_kit.util import atomic


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = atomic.write_text(tmp_path / "config.yaml", "old\n")
    with pytest.raises(RuntimeError), atomic.writing(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]
    atomic.write_json(path, {"a": 1})
    assert path.read_text() == '{"a": 1}\n'


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    final = tmp_path / "lora"
    with atomic.writing_folder(final) as tmp:
        (tmp / "weights").write_text("v1")
        (tmp / "extra").write_text("only in v1")
    with pytest.raises(RuntimeError), atomic.writing_folder(final) as tmp:
        (tmp / "weights").write_text("v2, half")
        raise RuntimeError("killed")
    assert sorted(p.name for p in final.iterdir()) == ["extra", "weights"]
    assert (final / "weights").read_text() == "v1"
    with atomic.writing_folder(final, durable=True) as tmp:
        (tmp / "weights").write_text("v2")
    assert [p.name for p in final.iterdir()] == ["weights"] and (final / "weights").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["lora"]  # no .tmp-* left behind


def test_without_an_atomic_exchange_the_old_folder_is_moved_aside_first(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)  # other systems, old kernels
    final = tmp_path / "pipeline"
    for version in ("v1", "v2"):
        with atomic.writing_folder(final) as tmp:
            (tmp / "model").write_text(version)
    assert (final / "model").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["pipeline"]


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_written_files_get_the_umasks_permissions(tmp_path, umask, file_mode, dir_mode):
    """Before, every .safetensors we wrote was owner-only (safetensors 0.8 creates 0600 whatever the
    umask): a LoRA copied to an A1111/ComfyUI running as another user did not load."""
    import os
    import stat

    import torch
    from safetensors.torch import save_file

    from dreambooth_kit.util.atomic import writing, writing_folder

    old = os.umask(umask)
    try:
        with writing(tmp_path / "lora.safetensors") as tmp:
            save_file({"a": torch.zeros(1)}, str(tmp))
        with writing_folder(tmp_path / "out") as tmp:
            (tmp / "sub").mkdir()
            save_file({"a": torch.zeros(1)}, str(tmp / "sub" / "w.safetensors"))
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "lora.safetensors") == file_mode
    assert mode(tmp_path / "out" / "sub" / "w.safetensors") == file_mode
    assert mode(tmp_path / "out" / "sub") == dir_mode and mode(tmp_path / "out") == dir_mode

"""One training per output folder: the second is refused naming the first; a dead holder's lock is
taken over with a notice; the first run's LoRA stays intact."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import E2E_TIMEOUT, REPO, tiny_cfg
from safetensors.torch import load_file

from dreambooth_kit.util.runlock import HOLDER_NAME, FolderInUse, FolderLock

# A child that holds the lock, says so on stdout, and waits for its stdin to close.
HOLD = """
import sys
from dreambooth_kit.util.runlock import FolderLock
lock = FolderLock(sys.argv[1], "training").acquire()
print("locked", flush=True)
sys.stdin.read()
"""


def _holder(folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout.readline().strip() == "locked"  # synchronised on the child's own line
    return proc


def test_second_lock_is_refused_naming_the_holder(tmp_path):
    proc = _holder(tmp_path)
    try:
        with pytest.raises(FolderInUse) as e:
            FolderLock(tmp_path, "training").acquire()
        msg = str(e.value)
        assert f"pid {proc.pid} on host" in msg and "started 20" in msg and "train.output_dir" in msg
        assert "\n" not in msg
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)
    with FolderLock(tmp_path, "training"):  # released when the holder exits
        assert json.loads((tmp_path / HOLDER_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / HOLDER_NAME).exists()


def test_lock_of_a_killed_process_is_taken_over_with_a_notice(tmp_path, caplog):
    proc = _holder(tmp_path)
    proc.send_signal(signal.SIGKILL)  # no clean-up runs: the holder file stays behind
    proc.wait(timeout=60)
    assert json.loads((tmp_path / HOLDER_NAME).read_text())["pid"] == proc.pid
    with caplog.at_level(logging.WARNING, logger="dreambooth_kit"):
        with FolderLock(tmp_path, "training"):
            pass
    assert f"taking over the lock of {tmp_path}: pid {proc.pid}" in caplog.text
    assert "no longer running" in caplog.text


@pytest.mark.slow
def test_second_training_into_one_folder_is_refused_and_the_first_lora_is_intact(
    tmp_path, tiny_model, photos, monkeypatch
):
    """Two trainings into one output_dir (a Colab cell run twice): the second is refused with exit
    code 2 while the first runs; the first finishes, and its LoRA is the one it trained."""
    import dreambooth_kit.training.loop as loop_mod
    from dreambooth_kit.training.train import train

    cfg = tiny_cfg(tmp_path, tiny_model, photos, **{"train.max_steps": 2, "train.overwrite": True})
    seen = {}
    real_step = loop_mod._step

    def step_then_second_run(ctx, *a, **k):
        out = real_step(ctx, *a, **k)
        if "second" not in seen:  # a second process starts while the first is inside its first step
            seen["second"] = subprocess.run(
                [sys.executable, "-m", "dreambooth_kit", "train", "--config", str(tmp_path / "run" / "config.yaml"),
                 "train.learning_rate=0.5"],
                capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=E2E_TIMEOUT,
            )  # fmt: skip
        return out

    monkeypatch.setattr(loop_mod, "_step", step_then_second_run)
    result = train(cfg)
    second = seen["second"]
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"is in use by another training: pid {os.getpid()}" in second.stderr
    assert "Traceback" not in second.stderr
    assert result.steps == 2 and result.lora_path.exists()
    assert all(torch.isfinite(v).all() for v in load_file(result.lora_path).values())
    assert "learning_rate: 0.5" not in (tmp_path / "run" / "config.yaml").read_text()  # not the second's
    assert "learning_rate: 0.5" not in (result.lora_dir / "config.yaml").read_text()
    assert not (tmp_path / "run" / HOLDER_NAME).exists()  # released at the end


def test_class_folder_is_locked_while_images_are_made(tmp_path, tiny_model, photos):
    from dreambooth_kit.training.train import train

    shared = tmp_path / "shared_class_images"
    with FolderLock(shared, "class-image generation", setting="prior.class_dir"):
        cfg = tiny_cfg(tmp_path, tiny_model, photos, **{"prior.class_dir": str(shared)})
        with pytest.raises(FolderInUse, match=r"class-image generation.*prior\.class_dir"):
            train(cfg)
    assert not list(shared.glob("*.png"))


def test_what_the_folder_holds_is_judged_under_its_lock(tmp_path, tiny_model, photos):
    """Before, the finished-run check ran before the folder lock was taken: while another process
    trained in the folder (say a resume, replacing its LoRA), a new run was told what the folder held
    a moment ago. Now the lock comes first: the run is refused naming the process that holds it."""
    from dreambooth_kit.training.train import train

    first = train(tiny_cfg(tmp_path, tiny_model, photos, **{"train.max_steps": 1}))
    proc = _holder(first.output_dir)
    try:
        with pytest.raises(FolderInUse, match=f"pid {proc.pid}"):
            train(tiny_cfg(tmp_path, tiny_model, photos, **{"train.max_steps": 1}))
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)

"""Preemption and exact resume, with real signals in real subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import E2E_TIMEOUT, REPO
from safetensors.torch import load_file

# Loaded into the child through PYTHONPATH: the 4th training step (the 4th loss) says "gate reached"
# and waits until the test, having sent the signal at that line and seen the trainer log that it
# arrived, creates the file $DBK_TEST_GO. The signal thus always lands inside step 4, on any machine
# and at any load: no timing decides the outcome. (Sending it at the "step 3/6" line raced with step
# 3's own stop check, so the checkpoint was sometimes step 3.)
GATED_STEP = """
import os, pathlib, sys, time, torch.nn.functional as F
_mse, _calls = F.mse_loss, [0]
def _gated(*a, **k):
    _calls[0] += 1
    if _calls[0] == 4:
        print("dbk-test: gate reached", file=sys.stderr, flush=True)
        go = pathlib.Path(os.environ["DBK_TEST_GO"])
        while not go.exists():  # waits for an event (the file), not for a time
            time.sleep(0.01)
    return _mse(*a, **k)
F.mse_loss = _gated
"""


def _args(tmp_path: Path, tiny_model: Path, photos: Path, out: Path, steps: int) -> list[str]:
    return [
        "--config", "tiny.yaml",
        f"model.pretrained={tiny_model}", f"data.instance_dir={photos}",
        f"prior.class_dir={tmp_path / 'cls'}", "prior.num_class_images=3", "prior.sample_steps=1",
        f"train.output_dir={out}", f"train.max_steps={steps}", "train.log_every=1",
        "train.learning_rate=1e-2",
    ]  # fmt: skip


def _env(tmp_path: Path) -> dict:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(GATED_STEP)
    return {
        **os.environ,
        "PYTHONPATH": f"{site}{os.pathsep}{REPO}",
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "DBK_TEST_GO": str(tmp_path / "go"),
    }


def _run_until_step(cmd: list[str], env: dict, cwd: Path, step: int, sig: int, target_pid=None):
    """Start cmd; when step `step` + 1 reaches the gate, send `sig` to it (or to target_pid); once
    the trainer logs that it received the signal, let the gated step go on (see GATED_STEP)."""
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=cwd)
    lines, sent = [], False
    for line in proc.stderr:
        lines.append(line)
        if not sent and "dbk-test: gate reached" in line:
            os.kill(target_pid or proc.pid, sig)
            sent = True
        elif sent and f"received {signal.Signals(sig).name}" in line:
            Path(env["DBK_TEST_GO"]).touch()
            break
    out, err = proc.communicate(timeout=E2E_TIMEOUT)  # a hang guard only: nothing waits on it to pass
    return proc.returncode, "".join(lines) + err + out


def _lora(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "lora" / "pytorch_lora_weights.safetensors")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_model):
    """The uninterrupted 6-step run to compare against."""
    import shutil

    from conftest import DEMO_PHOTOS

    tmp = tmp_path_factory.mktemp("straight")
    photos = tmp / "photos"
    shutil.copytree(DEMO_PHOTOS, photos)
    out = tmp / "run"
    cmd = [sys.executable, "-m", "dreambooth_kit.training.train", *_args(tmp, tiny_model, photos, out, 6)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=E2E_TIMEOUT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"lora": _lora(out), "photos": photos, "cls": tmp / "cls"}


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_then_resume_is_bit_identical(tmp_path, tiny_model, straight, sig):
    import shutil

    shutil.copytree(straight["cls"], tmp_path / "cls")  # same class images, no regeneration
    out = tmp_path / "run"
    args = _args(tmp_path, tiny_model, straight["photos"], out, 6)
    cmd = [sys.executable, "-m", "dreambooth_kit.training.train", *args]
    code, log = _run_until_step(cmd, _env(tmp_path), tmp_path, 3, sig)
    assert code == 128 + sig, log[-3000:]
    assert "interrupted at step" in log and "resume with: dreambooth-kit train --config" in log
    assert "train.resume=latest" in log
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert ckpts, log[-2000:]
    assert ckpts[-1].name == "step-000004" and "interrupted at step 4" in log  # the gated step
    assert not (out / "lora").exists()  # no final LoRA from an interrupted run

    resumed = subprocess.run(
        [*cmd, "train.resume=latest"],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=E2E_TIMEOUT,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {ckpts[-1]}" in resumed.stderr
    a, b = straight["lora"], _lora(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed LoRA differs from the uninterrupted run"


@pytest.mark.slow
def test_sigterm_to_accelerate_launcher_reaches_the_trainer(tmp_path, tiny_model, straight):
    """`accelerate launch` does not forward SIGTERM; the trainer asks the kernel for a parent-death
    signal (guards.die_with_parent), so killing only the launcher still checkpoints."""
    import shutil

    shutil.copytree(straight["cls"], tmp_path / "cls")
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_config.yaml"),
        "-m", "dreambooth_kit.training.train", *_args(tmp_path, tiny_model, straight["photos"], out, 6),
    ]  # fmt: skip
    code, log = _run_until_step(cmd, _env(tmp_path), tmp_path, 3, signal.SIGTERM)
    assert code == -signal.SIGTERM  # the launcher itself just dies ...
    # ... and the orphaned trainer checkpoints on its way out. communicate() returned only when the
    # orphan closed the inherited pipe (it exited), so its checkpoint and its lines are complete here.
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == ["step-000004"], log[-2000:]
    assert (ckpts[-1] / "COMPLETE.json").exists()
    assert "interrupted at step 4" in log, log[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize(
    "augment",
    [{"data.random_flip": True}, {"data.random_flip": True, "data.center_crop": False}],
    ids=["flips", "flips+random-crops"],
)
def test_resume_with_random_flips_and_crops_is_bit_identical(tmp_path, tiny_model, photos, augment):
    """Before, flips and crop offsets came from torch's global RNG and accelerate's loader fetches
    one batch ahead: the RNG state a checkpoint saved already held the next batch's draws, so a
    resumed run flipped and cropped other images (and drew other noise) than the uninterrupted one.
    6 steps straight against 3 steps, then a resume to 6 (an epoch boundary at step 5)."""
    from conftest import tiny_cfg

    from dreambooth_kit.training.train import train

    def cfg(name: str, steps: int, **kw):
        over = {**augment, "prior.class_dir": str(tmp_path / "cls"), "train.learning_rate": 1e-2,
                "train.output_dir": str(tmp_path / name), "train.max_steps": steps, **kw}  # fmt: skip
        return tiny_cfg(tmp_path, tiny_model, photos, **over)

    straight = train(cfg("straight", 6))
    train(cfg("resumed", 3))
    resumed = train(cfg("resumed", 6, **{"train.resume": "latest"}))
    assert resumed.losses == straight.losses[3:]
    a, b = _lora(straight.output_dir), _lora(resumed.output_dir)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed LoRA differs from the uninterrupted run"

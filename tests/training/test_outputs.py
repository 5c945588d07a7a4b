"""The final output: written by an atomic exchange, never lost to a full disk at the very end."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from conftest import tiny_cfg
from safetensors.torch import load_file

from dreambooth_kit.training.outputs import FinalSaveError


def _lora(path) -> dict[str, torch.Tensor]:
    return load_file(path / "lora" / "pytorch_lora_weights.safetensors")


def _full_disk_once(monkeypatch, exc: BaseException):
    """The first final LoRA write fails as a full disk does (safetensors raises its own error type,
    so both the OSError and the text-only form are exercised by the parametrization)."""
    from diffusers import StableDiffusionPipeline

    real = StableDiffusionPipeline.save_lora_weights
    calls = {"n": 0}

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            raise exc
        return real(*a, **k)

    monkeypatch.setattr(StableDiffusionPipeline, "save_lora_weights", staticmethod(failing))
    return calls


class SafetensorError(Exception):  # the shape of safetensors' error: no errno, only the text
    pass


@pytest.mark.slow
@pytest.mark.parametrize(
    "exc, reason",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "no space left"),
        (SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                         'message: "No space left on device" })'), "no space left"),
        (OSError(errno.EFBIG, "File too large"), "file size limit"),
        (PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
    ],
)  # fmt: skip
def test_failed_final_save_keeps_a_checkpoint_and_resume_finishes_the_same_lora(
    tmp_path, tiny_model, photos, monkeypatch, exc, reason
):
    from dreambooth_kit.training.train import train

    straight = train(
        tiny_cfg(tmp_path / "a", tiny_model, photos, **{"prior.class_dir": str(tmp_path / "cls")})
    )
    cfg = tiny_cfg(tmp_path / "b", tiny_model, photos, **{"prior.class_dir": str(tmp_path / "cls")})
    _full_disk_once(monkeypatch, exc)
    with pytest.raises(FinalSaveError) as e:
        train(cfg)
    msg = str(e.value)
    out = tmp_path / "b" / "run"
    assert reason in msg and "it needs about" in msg and "MB free" in msg
    assert f"safe in {out / 'checkpoints' / 'step-000003'}" in msg
    assert f"--config {out / 'config.yaml'} train.resume=latest" in msg
    assert "\n" not in msg
    assert not (out / "lora").exists() and not list(out.glob(".tmp-*"))

    from dreambooth_kit.config import load_config

    resumed = train(load_config(out / "config.yaml", ["train.resume=latest"]))
    assert resumed.steps == 3 and resumed.losses == []  # nothing retrained: the checkpoint was final
    a, b = _lora(straight.output_dir), _lora(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_final_output_replaced_by_exchange_leaves_no_temp_folder(tmp_path, tiny_model, photos):
    from dreambooth_kit.training.train import train

    cfg = tiny_cfg(tmp_path, tiny_model, photos, **{"train.max_steps": 1})
    first = train(cfg)
    inode = os.stat(first.lora_dir).st_ino
    again = train(tiny_cfg(tmp_path, tiny_model, photos, **{"train.max_steps": 2, "train.overwrite": True}))
    assert again.lora_dir == first.lora_dir and os.stat(again.lora_dir).st_ino != inode
    assert not list(again.output_dir.glob(".tmp-*"))
    assert "max_steps: 2" in (again.lora_dir / "config.yaml").read_text()


def test_killed_final_save_leftovers_are_removed_at_the_next_start(tmp_path):
    from dreambooth_kit.training.outputs import clean_tmp_outputs

    for name in (".tmp-lora-1a2b3c4d", ".tmp-pipeline-5e6f7a8b", ".tmp-replaced-lora-0badcafe"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.safetensors").write_bytes(b"partial")
    (tmp_path / "lora").mkdir()
    removed = clean_tmp_outputs(tmp_path)
    assert len(removed) == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["lora"]


def test_the_lora_folder_and_each_checkpoint_hold_the_runs_resolved_config(trained_run):
    """The config beside the LoRA is the run's config.yaml byte for byte, and run.json (what a resume
    is checked against) holds the same: both as resolved, with the model's prediction type."""
    import json

    import yaml

    result = trained_run["result"]
    run_config = (result.output_dir / "config.yaml").read_bytes()
    assert (result.lora_dir / "config.yaml").read_bytes() == run_config
    checkpoints = sorted((result.output_dir / "checkpoints").glob("step-*"))
    assert checkpoints
    for path in checkpoints:
        assert json.loads((path / "run.json").read_text()) == yaml.safe_load(run_config), path

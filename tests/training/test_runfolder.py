"""A run folder and its timeline when a training starts in it (dreambooth_kit.training.runfolder)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_cfg
from safetensors.torch import load_file

from dreambooth_kit.training.checkpoint_index import CheckpointError, list_checkpoints
from dreambooth_kit.training.checkpoints import resolve_resume
from dreambooth_kit.training.runfolder import ABANDONED, Run, RunFolderError
from dreambooth_kit.training.train import train


def _cfg(tmp_path, tiny_model, photos, **kw):
    base = {"train.learning_rate": 1e-2, "checkpoint.every_steps": 2, "checkpoint.keep_last": None}
    return tiny_cfg(tmp_path, tiny_model, photos, **{**base, **kw})


def _files(folder):
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _optimizer_lr(checkpoint) -> float:
    state = torch.load(checkpoint / "optimizer.bin", map_location="cpu", weights_only=True)
    return state["param_groups"][0]["lr"]


@pytest.mark.slow
def test_resume_from_an_earlier_checkpoint_with_another_learning_rate_starts_a_new_timeline(
    tmp_path, tiny_model, photos, caplog
):
    """Before, resuming from step 2 of a finished 6-step run kept the old step-4/step-6 checkpoints
    as the new run's: the final save found 'its' step-6 checkpoint and wrote nothing new, evaluate
    scored it, resume=latest picked it; and the learning rate stayed the checkpoint's while
    config.yaml recorded the new one."""
    first = train(_cfg(tmp_path, tiny_model, photos, **{"train.max_steps": 6}))
    out = first.output_dir
    old_lora = first.lora_path.read_bytes()
    old_step6 = (out / "checkpoints" / "step-000006" / "unet_lora.safetensors").read_bytes()
    step2 = out / "checkpoints" / "step-000002"
    before = {
        name: (out / name).read_bytes() for name in ("config.yaml", "model_source.json", "lineage.json")
    }
    old_id = Run.open(out).lineage.id

    changed = {"train.max_steps": 6, "train.resume": str(step2), "train.learning_rate": 5e-2}
    with pytest.raises(CheckpointError, match="train.learning_rate: 0.01 in the checkpoint, 0.05 now"):
        train(_cfg(tmp_path, tiny_model, photos, **changed))
    # Refused before anything was written: the run folder is as the finished run left it.
    assert {name: (out / name).read_bytes() for name in before} == before
    assert not (out / ABANDONED).exists()

    with caplog.at_level("WARNING", logger="dreambooth_kit"):
        second = train(_cfg(tmp_path, tiny_model, photos, **changed, **{"train.resume_force": True}))
    assert second.steps == 6 and len(second.losses) == 4  # steps 3..6 trained again
    assert "learning rate changed on resume" in caplog.text

    run = Run.open(out)
    assert run.lineage.id != old_id and run.lineage.ancestors == ((old_id, 2),)
    (aside,) = (out / ABANDONED).iterdir()
    assert aside.name == f"{old_id}-after-step-000002"
    assert (aside / "lora" / "pytorch_lora_weights.safetensors").read_bytes() == old_lora
    assert (aside / "checkpoints" / "step-000006" / "unet_lora.safetensors").read_bytes() == old_step6
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step-000004", "step-000006"]
    record = json.loads((aside / "ABANDONED.json").read_text())
    assert record["lineage"] == old_id and record["after_step"] == 2 and "lora" in record["moved"]

    # The newest checkpoint and the final LoRA are the new timeline's.
    steps = list_checkpoints(out)
    assert [s for s, _ in steps] == [2, 4, 6] and steps[0][1] == step2
    new6 = out / "checkpoints" / "step-000006"
    assert json.loads((new6 / "state.json").read_text())["lineage"] == run.lineage.id
    assert (new6 / "unet_lora.safetensors").read_bytes() != old_step6
    assert resolve_resume(out, "latest") == new6.resolve()
    assert second.lora_path.read_bytes() != old_lora
    assert _optimizer_lr(new6) == pytest.approx(5e-2) and _optimizer_lr(step2) == pytest.approx(1e-2)
    final = load_file(second.lora_path)
    assert all(torch.isfinite(t).all() for t in final.values())


@pytest.mark.slow
def test_resuming_the_newest_checkpoint_keeps_the_timeline(tmp_path, tiny_model, photos):
    first = train(_cfg(tmp_path, tiny_model, photos, **{"train.max_steps": 2}))
    line = Run.open(first.output_dir).lineage
    train(_cfg(tmp_path, tiny_model, photos, **{"train.max_steps": 4, "train.resume": "latest"}))
    assert Run.open(first.output_dir).lineage == line and not (first.output_dir / ABANDONED).exists()
    assert [s for s, _ in list_checkpoints(first.output_dir)] == [2, 4]


@pytest.mark.slow
def test_a_fresh_run_never_mixes_with_an_interrupted_one(tmp_path, tiny_model, photos):
    """Before, a fresh run (no train.resume) into an interrupted run's folder replaced or pruned
    its checkpoints and mixed the two runs."""
    import shutil

    first = train(_cfg(tmp_path, tiny_model, photos, **{"train.max_steps": 2}))
    out = first.output_dir
    shutil.rmtree(first.lora_dir)  # as a kill before the final save leaves it: checkpoints only
    kept = _files(out / "checkpoints")
    with pytest.raises(
        RunFolderError, match=r"did not finish \(newest step-000002\)\. Continue it with train.resume=latest"
    ):
        train(_cfg(tmp_path, tiny_model, photos, **{"train.max_steps": 2}))
    assert _files(out / "checkpoints") == kept

    train(_cfg(tmp_path, tiny_model, photos, **{"train.max_steps": 2, "train.overwrite": True}))
    (aside,) = (out / ABANDONED).iterdir()
    assert _files(aside / "checkpoints") == kept  # the interrupted run's, moved whole
    assert json.loads((out / "checkpoints" / "step-000002" / "state.json").read_text())["lineage"] == (
        Run.open(out).lineage.id
    )


@pytest.mark.slow
def test_resume_with_other_photos_is_refused_before_anything_is_written(tmp_path, tiny_model, photos):
    from PIL import Image

    first = train(_cfg(tmp_path, tiny_model, photos, **{"train.max_steps": 2}))
    config = (first.output_dir / "config.yaml").read_bytes()
    with Image.open(photos / "01.jpg") as im:
        im.rotate(90).save(photos / "01.jpg")  # the same name, other pixels
    with pytest.raises(CheckpointError, match="the photos .* are not the ones the checkpoint was trained on"):
        train(_cfg(tmp_path, tiny_model, photos, **{"train.max_steps": 4, "train.resume": "latest"}))
    assert (first.output_dir / "config.yaml").read_bytes() == config

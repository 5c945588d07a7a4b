"""The Photos and Train handlers without a browser: uploads checked per photo before any model loads,
the form turned into the trainer's overrides (paths confined, bad settings refused before anything
starts), and a second training in a folder refused by the run lock, naming the holder."""

from __future__ import annotations

import os
import shutil

import pytest
from conftest import DEMO_PHOTOS
from test_jobs import wait_for

from dreambooth_kit.config import ConfigError
from dreambooth_kit.errors import InvalidInput
from dreambooth_kit.ui import handlers, jobs
from dreambooth_kit.ui.paths import OutsideRoots, Roots


@pytest.fixture
def roots(tmp_path) -> Roots:
    return Roots.of([tmp_path])


def test_uploaded_photos_are_copied_and_checked_one_by_one(roots, tmp_path):
    files = [str(p) for p in sorted(DEMO_PHOTOS.glob("*.jpg"))]
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    check = handlers.save_uploads(roots, [*files, str(tmp_path / "broken.jpg")], "photos/dog", "tiny.yaml")
    assert check.folder == tmp_path / "photos" / "dog"
    assert sorted(p.name for p in check.folder.iterdir()) == [
        "01.jpg",
        "02.jpg",
        "03.jpg",
        "04.jpg",
        "05.jpg",
        "broken.jpg",
    ]
    rows = {r.path.name: r for r in check.rows}
    assert [rows[f"0{i}.jpg"].verdict for i in range(1, 6)] == ["ok"] * 5
    assert rows["01.jpg"].size and rows["01.jpg"].caption.startswith("01.jpg · ")
    assert rows["broken.jpg"].verdict.startswith("error: broken.jpg") and rows["broken.jpg"].size == ""
    assert check.summary.startswith("5 usable photos, 0 warnings, 1 errors (checked for 64 px training")


def test_a_captions_note_goes_on_its_photos_row(roots, tmp_path):
    from dreambooth_kit.toy.world import write_subject_photos

    write_subject_photos(tmp_path / "up")  # 01.png ... 05.png, captions 01.txt, 03.txt, 05.txt
    (tmp_path / "up" / "orphan.txt").write_text("a caption without its photo")
    files = [str(p) for p in sorted((tmp_path / "up").iterdir())]
    check = handlers.save_uploads(roots, files, "photos", "toy.yaml")
    rows = {r.path.name: r.verdict for r in check.rows}
    assert sorted(rows) == ["01.png", "02.png", "03.png", "04.png", "05.png", "orphan.txt"]
    assert (
        rows["01.png"].startswith("ok\n01.txt: caption of 01.png: 'a photo of zwx ball on a")
        and rows["02.png"] == "ok"
    )
    assert check.summary.startswith("5 usable photos, 1 warnings, 0 errors (checked for 32 px training")


def test_uploads_take_photos_and_captions_only_into_the_roots(roots, tmp_path):
    page = tmp_path / "page.html"
    page.write_text("<script>")
    with pytest.raises(InvalidInput, match=r"page\.html: not a photo or caption"):
        handlers.save_uploads(roots, [str(page)], "photos", "tiny.yaml")
    with pytest.raises(OutsideRoots):
        handlers.save_uploads(roots, [str(DEMO_PHOTOS / "01.jpg")], "/tmp/elsewhere", "tiny.yaml")
    hidden = tmp_path / ".env.png"
    shutil.copy(DEMO_PHOTOS / "01.jpg", hidden)
    with pytest.raises(OutsideRoots, match="hidden"):
        handlers.save_uploads(roots, [str(hidden)], "photos", "tiny.yaml")
    with pytest.raises(OutsideRoots):
        handlers.check_photos(roots, "../", "tiny.yaml")
    with pytest.raises(OutsideRoots):
        handlers.check_photos(roots, "photos", "/etc/passwd")  # a config outside the roots


def _form(tmp_path, **kw) -> handlers.TrainForm:
    shutil.copytree(DEMO_PHOTOS, tmp_path / "photos", dirs_exist_ok=True)
    base = {"config": "toy.yaml", "run": "runs/zwx", "photos": "photos", "identifier": "zwx",
            "class_noun": "ball", "steps": 4, "validation_every": 2}  # fmt: skip
    return handlers.TrainForm(**{**base, **kw})


def test_the_form_becomes_the_trainers_overrides(roots, tmp_path):
    o = handlers.training_overrides(
        roots, _form(tmp_path, model="builtin:toy-sd2", extra="adapter.rank=2\n# note")
    )
    assert o == [
        f"data.instance_dir={tmp_path / 'photos'}",
        f"train.output_dir={tmp_path / 'runs' / 'zwx'}",
        "model.pretrained=builtin:toy-sd2",
        "data.identifier=zwx",
        "data.instance_prompt=a photo of zwx ball",
        "prior.class_prompt=a photo of a ball",
        "train.max_steps=4",
        "train.stop=never",
        "adapter.type=lora",
        "prior.with_prior_preservation=True",
        "prior.mode=class_images",
        "validation.every_steps=2",
        "checkpoint.every_steps=null",
        "adapter.rank=2",
    ]
    o = handlers.training_overrides(roots, _form(tmp_path, stop_auto=True, adapter="full", prior="teacher"))
    assert {"train.stop=auto", "adapter.type=full", "prior.mode=teacher"} <= set(o)
    assert "prior.with_prior_preservation=False" in handlers.training_overrides(
        roots, _form(tmp_path, prior="off")
    )


@pytest.mark.parametrize(
    ("extra", "error", "match"),
    [
        ("data.instance_dir=/etc", InvalidInput, "set data.instance_dir with the Photos folder field"),
        ("prior.class_dir=/etc", OutsideRoots, "prior.class_dir '/etc'"),
        ("evaluate.prompts=../../prompts.txt", OutsideRoots, r"'\.\.' is not allowed"),
        ("concepts=[]", InvalidInput, "several subjects"),
        ("train.max_steps 4", InvalidInput, "is not key=value"),
    ],
)
def test_more_settings_keep_paths_inside_the_roots(roots, tmp_path, extra, error, match):
    with pytest.raises(error, match=match):
        handlers.training_overrides(roots, _form(tmp_path, extra=extra))


def test_a_bad_setting_is_refused_before_anything_starts(roots, tmp_path):
    with pytest.raises(ConfigError, match="train.learning_rate"):
        handlers.start_training(roots, _form(tmp_path, extra="train.learning_rate=fast"))
    with pytest.raises(InvalidInput, match="identifier and class: give both"):
        handlers.start_training(roots, _form(tmp_path, class_noun=""))
    assert not (tmp_path / "runs").exists()  # no job was started
    assert handlers.stop_training(roots, "runs/zwx").startswith("no training")
    with pytest.raises(InvalidInput, match="no config.yaml"):
        handlers.resume_training(roots, "runs/zwx")


def test_a_second_training_in_a_folder_is_refused_naming_the_holder(roots, tmp_path):
    """The trainer's own run lock refuses it; the run's status shows the holder (here this process)."""
    from dreambooth_kit.util.runlock import FolderLock

    run = tmp_path / "runs" / "zwx"
    with FolderLock(run, "training"):
        said = handlers.start_training(roots, _form(tmp_path))
        assert said.startswith("started (process group ")
        (job,) = jobs.jobs(run)
        wait_for(job.exit_file.exists)
    status = handlers.training_status(roots, "runs/zwx")
    assert status.state == "failed" and job.returncode() == 2
    assert f"is in use by another training: pid {os.getpid()} on host" in status.message
    assert "Wait for it to finish or stop it, or choose another train.output_dir" in status.message


def test_suggested_identifiers_for_the_class_typed(tmp_path, tiny_model):
    roots = Roots.of([tmp_path, tiny_model.parent])
    rows = handlers.suggest_identifiers(roots, "dog", "tiny.yaml", str(tiny_model), n=3, pool=12)
    assert [r[0] for r in rows] == [1, 2, 3]
    assert all(r[3] == f"a photo of {r[1]} dog" for r in rows)
    with pytest.raises(InvalidInput, match="class noun: empty"):
        handlers.suggest_identifiers(roots, " ", "tiny.yaml", "")


def test_resume_starts_the_runs_own_config_from_its_latest_checkpoint(roots, tmp_path, monkeypatch):
    (tmp_path / "runs" / "zwx").mkdir(parents=True)
    (tmp_path / "runs" / "zwx" / "config.yaml").write_text("version: 1\n")
    started = {}
    monkeypatch.setattr(
        jobs, "start", lambda run, command, cwd: started.update(run=run, command=command) or jobs.Job(run)
    )
    handlers.resume_training(roots, "runs/zwx")
    assert started["run"] == tmp_path / "runs" / "zwx"
    assert started["command"][1:] == [
        "-m", "dreambooth_kit.training.train", "--config", str(tmp_path / "runs" / "zwx" / "config.yaml"),
        "train.resume=latest",
    ]  # fmt: skip


@pytest.mark.slow
def test_stop_ends_the_training_with_a_checkpoint(roots, tmp_path):
    """The real trainer: Stop (SIGTERM to its group) ends it after a checkpoint of the step it was
    on, and the run's status says so. (Resuming from it: the trainer's own tests, and the command
    above.)"""
    from dreambooth_kit.ui.progress import read_progress

    run = tmp_path / "runs" / "zwx"
    handlers.start_training(roots, _form(tmp_path, steps=500, validation_every=0, prior="off"))
    wait_for(lambda: (p := read_progress(run)) is not None and p.step >= 1)
    assert handlers.training_status(roots, "runs/zwx").state == "running"
    assert handlers.stop_training(roots, "runs/zwx").startswith("stopping")
    (job,) = jobs.jobs(run)
    wait_for(job.exit_file.exists)
    stopped = read_progress(run)
    status = handlers.training_status(roots, "runs/zwx")
    assert job.returncode() == 143 and status.state == "stopped", job.log_tail()
    assert (
        f"stopped at step {stopped.step} with a checkpoint (SIGTERM); Resume continues it" == status.message
    )
    assert (run / "checkpoints" / f"step-{stopped.step:06d}").is_dir()
    assert "interrupted at step" in job.log_tail()

"""The live view reads a run folder: progress.jsonl (the latest timeline, half-written lines skipped),
the pace and time left, the grids by step, and the state of the UI's jobs there."""

from __future__ import annotations

import json
import os
import time

import pytest

from dreambooth_kit.ui import jobs
from dreambooth_kit.ui.progress import PROGRESS_FILE, grids, read_progress, run_status


def _line(step, loss=0.5, lineage="b", seconds=0.2, t=None, max_steps=10):
    return json.dumps(
        {"step": step, "max_steps": max_steps, "loss": loss, "lr": 1e-4, "seconds": seconds,
         "time": t or time.time(), "lineage": lineage}
    )  # fmt: skip


def test_the_progress_file_name_is_the_trainers():
    from dreambooth_kit.training.loop import PROGRESS_FILE as WRITTEN

    assert PROGRESS_FILE == WRITTEN


def test_progress_of_the_latest_timeline_with_its_pace(tmp_path):
    lines = [_line(s, lineage="a") for s in (1, 2, 3)]  # an abandoned earlier run
    lines += [_line(1, 0.9, seconds=5.0), _line(2, 0.8), _line(3, None), _line(2, 0.7), _line(4, 0.6)]
    (tmp_path / PROGRESS_FILE).write_text("\n".join(lines) + '\n{"step": 5, "lo')  # cut short
    p = read_progress(tmp_path)
    assert (p.step, p.max_steps) == (4, 10)
    assert p.losses == [(1, 0.9), (2, 0.7), (4, 0.6)]  # step 2 written twice: the later; step 3 NaN
    assert p.pace == pytest.approx(0.2)  # the first step's warm-up left out
    assert p.eta() == "about 1 s left (0.20 s a step, plus validation and checkpoints)"
    assert read_progress(tmp_path / "none") is None


def test_grids_by_step(tmp_path):
    for step in (20, 100, 5):
        (tmp_path / "samples" / f"step-{step:06d}").mkdir(parents=True)
        (tmp_path / "samples" / f"step-{step:06d}" / "grid.png").write_bytes(b"png")
    (tmp_path / "samples" / "step-000007").mkdir()  # no grid yet
    assert [s for _, s in grids(tmp_path)] == [5, 20, 100]


def _job(run, name, *, code=None, pgid=None, log="", started=None):
    folder = run / jobs.JOBS / name
    folder.mkdir(parents=True)
    info = {
        "pgid": pgid if pgid is not None else 999_999_999,
        "command": [],
        "started": started or time.time(),
    }
    (folder / "job.json").write_text(json.dumps(info))
    (folder / "train.log").write_text(log)
    if code is not None:
        (folder / "exit.json").write_text(json.dumps({"returncode": code}))
    return jobs.Job(folder)


def test_states_of_finished_stopped_and_failed_jobs(tmp_path):
    assert run_status(tmp_path).state == "none"
    (tmp_path / "lora").mkdir()
    assert run_status(tmp_path).state == "finished"
    (tmp_path / PROGRESS_FILE).write_text(_line(3) + "\n")
    _job(tmp_path, "1", code=143, log="WARNING interrupted at step 3\n")
    s = run_status(tmp_path)
    assert s.state == "stopped" and "at step 3" in s.message and "Resume" in s.message and not s.active
    _job(tmp_path, "2", code=2, log="INFO x\nerror: data.instance_dir: photos: not found\n")
    s = run_status(tmp_path)
    assert s.state == "failed" and s.message.endswith("data.instance_dir: photos: not found")
    _job(tmp_path, "3", code=0)
    assert run_status(tmp_path).state == "finished"
    _job(tmp_path, "4", pgid=999_999_999)  # its process group is gone, no exit code
    assert "killed" in run_status(tmp_path).message


def test_a_running_job_shows_before_a_later_start_that_was_refused(tmp_path):
    started = time.time()
    own = os.getpgid(0)  # a live process group stands in for the training's
    _job(tmp_path, "1", pgid=own, log="INFO training plan\n", started=started)
    s = run_status(tmp_path)
    assert s.state == "starting" and s.active and s.progress is None and "training plan" in s.message
    (tmp_path / PROGRESS_FILE).write_text(_line(2, t=started + 1) + "\n")
    refusal = "/x/run is in use by another training: pid 4242 on host h, started 2026-12-05 (train)"
    _job(tmp_path, "2", code=2, log=f"error: {refusal}\n")
    s = run_status(tmp_path)
    assert s.state == "running" and s.progress.step == 2
    assert s.message == f"training: step 2 of 10; a later start was refused: {refusal}"
    assert s.job.folder.name == "1"

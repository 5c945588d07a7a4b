"""A training started from the UI runs under a keeper in a session of its own: it outlives the server
that started it (even with the trainer's die-with-parent signal), stops on SIGTERM to its group, and
leaves its exit code on file. Commands here stand in for the trainer (no torch)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dreambooth_kit.ui import jobs

# Stands in for the trainer: asks for SIGTERM when its parent ends (as the trainer does), writes a
# marker once it is ready, then waits; SIGTERM ends it with 143, as the trainer after its checkpoint.
TRAINER = (
    "import signal, sys\n"
    "from pathlib import Path\n"
    "from dreambooth_kit.training.guards import die_with_parent\n"
    "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\n"
    "die_with_parent()\n"
    "Path(sys.argv[1]).write_text('ready')\n"
    "print('step 1/4 loss 0.5', flush=True)\n"
    "signal.pause()\n"
)


def wait_for(condition) -> None:
    """Until ``condition()`` holds (pytest's timeout ends a hang)."""
    while not condition():
        time.sleep(0.05)


def test_a_job_outlives_the_server_that_started_it_and_stops_on_sigterm(tmp_path):
    run, ready = tmp_path / "run", tmp_path / "ready"
    command = [sys.executable, "-c", TRAINER, str(ready)]
    server = f"from pathlib import Path; from dreambooth_kit.ui import jobs; jobs.start(Path({str(run)!r}), {command!r}, cwd=Path({str(tmp_path)!r}))"
    subprocess.run([sys.executable, "-c", server], check=True)  # the "server" starts the job and ends
    (job,) = jobs.jobs(run)
    wait_for(ready.exists)
    assert job.running() and jobs.running_job(run) == job
    pgid = job.info()["pgid"]
    assert os.getsid(pgid) == pgid != os.getsid(0)  # a session of its own: a Ctrl-C of the server misses it
    wait_for(lambda: "step 1/4" in job.log_tail())
    assert job.stop()
    wait_for(job.exit_file.exists)
    assert job.returncode() == 143 and not job.running() and not job.stop()
    assert job.info()["command"] == command and job.info()["cwd"] == str(tmp_path)


def test_the_keeper_records_a_command_that_cannot_start(tmp_path):
    job = jobs.start(tmp_path / "run", [str(tmp_path / "no-such-program")], cwd=tmp_path)
    wait_for(job.exit_file.exists)
    assert job.returncode() == 127 and "no-such-program" in job.log_tail()
    assert jobs.main(["only-a-folder"]) == 2


def test_a_job_whose_group_is_gone_is_not_running(tmp_path):
    folder = tmp_path / "run" / jobs.JOBS / "20261205-000000-000000001"
    folder.mkdir(parents=True)
    job = jobs.Job(folder)
    assert job.running()  # no job.json yet: it is being started
    gone = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    gone.wait()
    (folder / "job.json").write_text(f'{{"pgid": {gone.pid}}}')
    assert not job.running() and job.returncode() is None and not job.stop()


def test_the_log_tail_keeps_a_progress_bars_latest_state(tmp_path):
    job = jobs.Job(tmp_path)
    job.log.write_text("INFO one\ntrain:  10%|#  | 1/10\rtrain:  20%|## | 2/10\r\nINFO two\n")
    assert job.log_tail() == "INFO one\ntrain:  20%|## | 2/10\nINFO two"
    assert job.log_tail(1) == "INFO two"
    assert jobs.Job(tmp_path / "none").log_tail() == ""


def test_signals_to_the_keeper_do_not_end_it_before_its_command(tmp_path):
    """SIGTERM reaches the keeper too (the whole group gets it): it waits for the command's own end."""
    ready = tmp_path / "ready"
    slow = (
        "import signal, sys, time\nfrom pathlib import Path\n"
        "signal.signal(signal.SIGTERM, lambda *a: (time.sleep(0.5), sys.exit(143)))\n"
        "Path(sys.argv[1]).write_text('ready')\nsignal.pause()\n"
    )
    job = jobs.start(tmp_path / "run", [sys.executable, "-c", slow, str(ready)], cwd=tmp_path)
    wait_for(ready.exists)
    os.killpg(job.info()["pgid"], signal.SIGTERM)
    wait_for(job.exit_file.exists)
    assert job.returncode() == 143
    assert Path(job.log).exists()

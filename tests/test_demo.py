"""The demo works from an installed package (a wheel), in an empty folder, offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import E2E_TIMEOUT, REPO

from dreambooth_kit.demo import demo_photos


def test_demo_photos_are_package_data():
    photos = demo_photos()
    assert photos.parent == Path(__import__("dreambooth_kit").__file__).parent
    assert sorted(p.name for p in photos.iterdir()) == [f"0{i}.jpg" for i in range(1, 6)]


@pytest.mark.slow
def test_installed_wheel_runs_the_demo_in_an_empty_folder(tmp_path):
    wheels, target, empty = tmp_path / "wheels", tmp_path / "site", tmp_path / "empty"
    empty.mkdir()
    pip = [sys.executable, "-m", "pip", "-q"]
    build = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(REPO)],
        capture_output=True, text=True, timeout=E2E_TIMEOUT,
    )  # fmt: skip
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("dreambooth_kit-*.whl")
    install = subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=E2E_TIMEOUT,
    )  # fmt: skip
    assert install.returncode == 0, install.stderr[-2000:]
    # The installed copy, not this checkout: PYTHONPATH puts it before the editable install.
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    code = "import dreambooth_kit.cli as c, sys; print(c.__file__); sys.exit(c.main(sys.argv[1:]))"
    proc = subprocess.run(
        [sys.executable, "-c", code, "demo", "--steps", "2"],
        capture_output=True, text=True, timeout=E2E_TIMEOUT, cwd=empty, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0].startswith(str(target))
    assert f"photos       : {empty / 'runs' / 'demo' / 'photos'}" in proc.stdout  # rendered at run time
    assert "model        : builtin:toy-sd2" in proc.stdout  # its weights came from the wheel
    assert len(list((empty / "runs" / "demo" / "samples").glob("*.png"))) == 4
    assert (empty / "runs" / "demo" / "lora" / "pytorch_lora_weights.safetensors").exists()

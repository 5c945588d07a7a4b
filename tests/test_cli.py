from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dreambooth_kit.cli import main


def _common(tmp_path, tiny_model, photos) -> list[str]:
    return [
        f"model.pretrained={tiny_model}",
        f"data.instance_dir={photos}",
        f"prior.class_dir={tmp_path / 'cls'}",
        "prior.num_class_images=2",
        "prior.sample_steps=1",
        f"train.output_dir={tmp_path / 'run'}",
        "train.max_steps=2",
    ]


def test_train_command_with_overrides(tmp_path, tiny_model, photos, capsys):
    assert main(["train", "--config", "tiny.yaml", *_common(tmp_path, tiny_model, photos)]) == 0
    lora = tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors"
    assert lora.exists()
    assert f"LoRA: {lora}" in capsys.readouterr().out
    assert "max_steps: 2" in (tmp_path / "run" / "config.yaml").read_text()


def test_unknown_override_key_exits_2_with_suggestion(capsys):
    assert main(["train", "--config", "tiny.yaml", "train.max_step=5"]) == 2
    err = capsys.readouterr().err
    assert "train.max_step: unknown key; did you mean 'train.max_steps'?" in err


def test_check_data_names_missing_folder(tmp_path, tiny_model, capsys):
    missing = tmp_path / "no-such-photos"
    rc = main(
        [
            "check-data",
            "--config",
            "tiny.yaml",
            f"model.pretrained={tiny_model}",
            f"data.instance_dir={missing}",
        ]
    )
    assert rc == 2
    assert str(missing.resolve()) in capsys.readouterr().err


def test_check_data_ok_on_demo_photos(tiny_model, photos, capsys):
    assert (
        main(
            [
                "check-data",
                "--config",
                "tiny.yaml",
                f"model.pretrained={tiny_model}",
                f"data.instance_dir={photos}",
            ]
        )
        == 0
    )
    assert "5 usable images" in capsys.readouterr().out


def test_generate_command_is_reproducible(tmp_path, tiny_model, capsys):
    args = [
        "generate",
        "--base",
        str(tiny_model),
        "--prompt",
        "a photo of zwx toy",
        "--steps",
        "2",
        "--num-images",
        "2",
    ]
    assert main([*args, "--seed", "9", "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--seed", "9", "--out", str(tmp_path / "b")]) == 0
    for name in ("9.png", "10.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with Image.open(tmp_path / "a" / "10.png") as im:
        assert "Seed: 10" in im.text["parameters"]


def test_generate_missing_base_path_is_named(tmp_path, capsys):
    rc = main(["generate", "--base", str(tmp_path / "nope"), "--prompt", "x", "--steps", "1"])
    assert rc == 2
    assert "path not found" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_command_end_to_end(tmp_path):
    """What `make demo` runs, as a user would: the installed console script, in a subprocess."""
    exe = Path(sys.executable).with_name("dreambooth-kit")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "dreambooth_kit"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [*cmd, "demo", "--out", str(tmp_path / "demo"), "--steps", "3"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dreambooth-kit demo: done" in proc.stdout
    demo = tmp_path / "demo"
    assert (demo / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert len(list((demo / "class_images").glob("class-*.png"))) == 10
    assert sorted(p.name for p in (demo / "samples").glob("*.png")) == [
        "1557.png",
        "1558.png",
        "1559.png",
        "1560.png",
    ]

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import E2E_TIMEOUT
from PIL import Image, PngImagePlugin

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


def test_check_data_warns_for_the_768_v_hub_model_below_640(photos, caplog):
    """sd21_768_lora.yaml names its model by hub id. Before, the prediction type of a hub id was
    never known before the download, so training the 768-v model at 512 px (broken images) passed
    the check silently; the known SD 2.x repos' prediction types now say it offline."""
    rc = main(
        ["check-data", "--config", "sd21_768_lora.yaml", f"data.instance_dir={photos}", "data.resolution=512"]
    )
    assert rc == 0
    assert any("data.resolution=512 on a 768px v-prediction model" in r.getMessage() for r in caplog.records)


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
    progress = capsys.readouterr().err  # a bar over the images, not one per denoising step
    assert "generate: 100%" in progress and "2/2" in progress
    assert main([*args, "--seed", "9", "--out", str(tmp_path / "b")]) == 0
    for name in ("9.png", "10.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with Image.open(tmp_path / "a" / "10.png") as im:
        assert "Seed: 10" in im.text["parameters"]


def test_from_png_of_an_old_two_lora_image_loads_both_with_their_scales(
    tmp_path, tiny_model, trained_run, capsys
):
    """Before: an older PNG that stored its two LoRAs as "a.safetensors, b.safetensors" was read back as
    "a.safetensors" and " b.safetensors" (no such file): --from-png failed with LoRA not found."""
    import json
    import shutil
    from dataclasses import asdict

    import numpy as np

    from dreambooth_kit.inference.generate import generate
    from dreambooth_kit.inference.pipeline import load_pipeline
    from dreambooth_kit.inference.pngmeta import JSON_KEY, read_metadata

    a = trained_run["result"].lora_path
    b = shutil.copy(a, tmp_path / "second.safetensors")
    pipe = load_pipeline(str(tiny_model), lora=[a, b], lora_scale=0.5)
    ((img, params),) = generate(pipe, "a photo of zwx toy", seed=5, steps=2)
    old = {k: v for k, v in asdict(params).items() if k not in ("loras", "lora_scales", "lora_hashes")}
    old |= {"lora": f"{a}, {b}", "lora_scale": 0.5}  # how an older version recorded two LoRAs
    info = PngImagePlugin.PngInfo()
    info.add_text(JSON_KEY, json.dumps(old))
    png = tmp_path / "old.png"
    img.save(png, pnginfo=info)

    assert main(["generate", "--from-png", str(png), "--out", str(tmp_path / "again")]) == 0
    (out,) = capsys.readouterr().out.split()
    again = read_metadata(out)["params"]
    assert again.loras == [str(a), str(b)] and again.lora_scales == [0.5, 0.5]
    with Image.open(out) as im:
        assert np.array_equal(np.asarray(im), np.asarray(img))  # the same image, both LoRAs at 0.5
    # --lora-scale replaces the recorded scales (it used to be ignored with --from-png).
    args = ["generate", "--from-png", str(png), "--lora-scale", "0.7", "0.3", "--out", str(tmp_path / "s")]
    assert main(args) == 0
    (out,) = capsys.readouterr().out.split()
    assert read_metadata(out)["params"].lora_scales == [0.7, 0.3]


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
        timeout=E2E_TIMEOUT,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dreambooth-kit demo: done" in proc.stdout
    demo = tmp_path / "demo"
    assert (demo / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert len(list((demo / "class_images").glob("class-*.png"))) == 50  # configs/toy.yaml
    assert (demo / "demo_grid.png").exists() and len(list((demo / "photos").glob("*.png"))) == 5
    assert sorted(p.name for p in (demo / "samples").glob("*.png")) == [
        "1557.png",
        "1558.png",
        "1559.png",
        "1560.png",
    ]


# ------------------------------------------------------------------ one error path: a line, exit 2


def _err_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def _no_model(monkeypatch):
    import dreambooth_kit.models.source as models

    fail = lambda *a, **k: pytest.fail("a model was resolved or loaded")  # noqa: E731
    monkeypatch.setattr(models, "resolve_model", fail)
    monkeypatch.setattr(models, "load_components", fail)


def test_config_that_is_a_folder(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path)]) == 2
    assert _err_line(capsys) == f"error: {tmp_path}: is a folder, not a config file; pass a .yaml file"


def test_config_that_is_not_utf8(tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_bytes(b"train:\n  output_dir: caf\xe9\n")
    assert main(["check-data", "--config", str(cfg)]) == 2
    assert _err_line(capsys) == (
        f"error: {cfg}: not UTF-8 text (byte 0xe9 at position {cfg.read_bytes().index(0xE9)}); save it as UTF-8 "
        "(or check that it is the YAML file you meant)"
    )


def test_nan_and_out_of_range_values_fail_at_load_naming_each_key(capsys, monkeypatch):
    _no_model(monkeypatch)
    rc = main(
        ["train", "--config", "tiny.yaml", "train.learning_rate=nan", "train.seed=-1", "data.num_workers=-1"]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        "error: 3 config problems:",
        "  - train.learning_rate: 'nan' is not a finite number; give a real value",
        "  - data.num_workers: -1 must be >= 0 (0 = load images in the training process)",
        "  - train.seed: -1 must be in 0..4294967295 (the seed range numpy and torch generators share)",
    ]


def test_instance_dir_that_is_a_symlink_loop(tmp_path, capsys):
    loop = tmp_path / "photos"
    os.symlink(loop, loop)
    assert main(["check-data", "--config", "tiny.yaml", f"data.instance_dir={loop}"]) == 2
    assert _err_line(capsys) == (
        f"error: data.instance_dir: {loop}: a symbolic link on this path loops back on itself; point the "
        "setting at the real folder (`ls -l` shows where each link goes)"
    )


def test_symlink_loop_inside_the_photo_folder_is_named(photos, capsys):
    os.symlink(photos / "loop.jpg", photos / "loop.jpg")
    os.symlink(photos, photos / "up")  # a link back to the folder: a subfolder, skipped, no endless walk
    assert main(["check-data", str(photos)]) == 2
    err = capsys.readouterr().err
    assert (
        f"ERROR {photos.resolve() / 'loop.jpg'}: a symbolic link that loops back on itself; replace it "
        in err
    )
    assert "Traceback" not in err


@pytest.mark.parametrize("where", ["is-file", "under-file"])
def test_output_dir_that_is_a_file_fails_before_anything_loads(tmp_path, photos, monkeypatch, capsys, where):
    _no_model(monkeypatch)
    afile = tmp_path / "notes.txt"
    afile.write_text("mine")
    out = afile if where == "is-file" else afile / "run"
    rc = main(["train", "--config", "tiny.yaml", f"data.instance_dir={photos}", f"train.output_dir={out}"])
    assert rc == 2
    expected = (
        f"error: train.output_dir: {out} is a file, not a folder; choose another train.output_dir or move the file away"
        if where == "is-file"
        else f"error: train.output_dir: {out} cannot be created: {afile} is a file, not a folder; "
        "choose another train.output_dir"
    )
    assert _err_line(capsys) == expected
    assert afile.read_text() == "mine"


def test_class_dir_under_a_file_is_named(tmp_path, photos, monkeypatch, capsys):
    _no_model(monkeypatch)
    afile = tmp_path / "f"
    afile.write_text("x")
    args = [
        f"data.instance_dir={photos}",
        f"train.output_dir={tmp_path / 'run'}",
        f"prior.class_dir={afile}/cls",
    ]
    assert main(["train", "--config", "tiny.yaml", *args]) == 2
    assert _err_line(capsys).startswith(
        f"error: prior.class_dir: {afile}/cls cannot be created: {afile} is a file"
    )
    assert not (tmp_path / "run").exists()  # checked before the run folder was made


def _as_unprivileged() -> list[str]:
    """A command prefix that takes away root's permission override (CAP_DAC_OVERRIDE), so a 0555
    folder refuses writes as it does for any user; [] when not root."""
    if os.geteuid() != 0:
        return []
    import shutil

    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: root writes into read-only folders")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search"]


def test_output_dir_without_write_permission(tmp_path, photos):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        prefix = _as_unprivileged()
        probe = subprocess.run([*prefix, sys.executable, "-c", f"open({str(locked / 'x')!r}, 'w')"])
        if probe.returncode == 0:
            pytest.skip("this environment lets the process write into a 0555 folder")
        proc = subprocess.run(
            [*prefix, sys.executable, "-m", "dreambooth_kit", "train", "--config", "tiny.yaml",
             f"data.instance_dir={photos}", f"train.output_dir={locked / 'run'}",
             f"prior.class_dir={tmp_path / 'cls'}"],
            capture_output=True, text=True, timeout=E2E_TIMEOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
    finally:
        locked.chmod(0o755)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: train.output_dir: {locked / 'run'} cannot be created: {locked} is not writable (permission "
        "denied or a read-only disk); choose a folder you can write to, e.g. train.output_dir=~/dreambooth-runs/x"
    )
    assert "Traceback" not in proc.stderr


def test_manifest_that_is_a_json_list(tmp_path, tiny_model, photos, capsys):
    cls = tmp_path / "cls"
    cls.mkdir()
    (cls / "manifest.json").write_text('["class-00000.png"]')
    assert main(["train", "--config", "tiny.yaml", *_common(tmp_path, tiny_model, photos)]) == 2
    assert _err_line(capsys) == (
        f"error: {cls / 'manifest.json'}: not a class-image manifest (a JSON list, expected an object); "
        "delete it and rerun (the images are kept and the manifest is written again from the prior.* "
        "settings), or use another prior.class_dir"
    )


def test_ctrl_c_during_class_images_keeps_finished_ones_and_exits_130(
    tmp_path, tiny_model, photos, monkeypatch, capsys
):
    import dreambooth_kit.inference.pngmeta as inference

    real_save = inference.save_png
    calls = {"n": 0}

    def ctrl_c_on_third(img, params, path):
        calls["n"] += 1
        if calls["n"] == 3:  # Ctrl-C while the 3rd PNG is written: its temp file exists
            path.with_name(f".tmp-{path.name}").write_bytes(b"\x89PNG partial")
            raise KeyboardInterrupt
        return real_save(img, params, path)

    monkeypatch.setattr(inference, "save_png", ctrl_c_on_third)
    args = [
        "train",
        "--config",
        "tiny.yaml",
        *_common(tmp_path, tiny_model, photos),
        "prior.num_class_images=4",
    ]
    args += ["prior.sample_batch_size=2"]
    assert main(args) == 130
    cls = tmp_path / "cls"
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"interrupted while generating class images: 2 written this run, 2 of 4 now in {cls.resolve()}; "
        "run the same command again to generate the other 2"
    )
    assert sorted(p.name for p in cls.iterdir() if not p.name.startswith(".dreambooth_kit")) == [
        "class-00000.png",
        "class-00001.png",
        "manifest.json",
    ]  # no partial file
    assert not (tmp_path / "run" / "lora").exists()


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
    from dreambooth_kit.errors import MissingExtra, UserError, user_errors_to_exit_code

    def raise_(e):
        raise e

    assert user_errors_to_exit_code(raise_, UserError("x.yaml: fix it")) == 2
    assert capsys.readouterr().err == "error: x.yaml: fix it\n"
    assert user_errors_to_exit_code(raise_, MissingExtra("needs bitsandbytes: pip install bitsandbytes")) == 2
    assert capsys.readouterr().err == "error: needs bitsandbytes: pip install bitsandbytes\n"
    assert (
        user_errors_to_exit_code(raise_, FileNotFoundError(2, "No such file or directory", "/p/x.png")) == 2
    )
    assert capsys.readouterr().err == "error: /p/x.png: No such file or directory\n"
    assert user_errors_to_exit_code(raise_, KeyboardInterrupt()) == 130
    assert capsys.readouterr().err == "interrupted (Ctrl-C)\n"
    # Not user errors: a ValueError or ImportError from inside a library is a bug to see in full.
    with pytest.raises(ValueError, match="internal"):
        user_errors_to_exit_code(raise_, ValueError("internal"))
    with pytest.raises(ImportError, match="broken install"):
        user_errors_to_exit_code(raise_, ImportError("broken install"))


@pytest.mark.parametrize(
    "bug", [ValueError("bad shape"), ImportError("broken install"), FloatingPointError("nan")]
)
def test_a_builtin_error_from_a_bug_keeps_its_traceback_through_main(bug, tmp_path, monkeypatch, capsys):
    """A built-in exception raised by code (not a UserError) is a bug: main() lets it through with its
    traceback instead of printing ``error: ...`` and exiting 2. A plain FloatingPointError used to be
    turned into one line, so a NaN from a bug looked like bad input."""
    import dreambooth_kit.models.tiny as tiny

    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(tiny, "build_tiny_sd2", broken)
    with pytest.raises(type(bug), match=str(bug)):
        main(["build-tiny", str(tmp_path / "m")])
    assert "error:" not in capsys.readouterr().err


def test_every_user_error_carries_its_exit_code(capsys):
    """The early stops of training are UserErrors too, each with the exit code users saw before."""
    from dreambooth_kit.errors import NonFiniteError, UserError, user_errors_to_exit_code
    from dreambooth_kit.training.guards import NonFiniteLossError, TrainingInterrupted

    def raise_(e):
        raise e

    stop = TrainingInterrupted(
        7, 15, None, "dreambooth-kit train --config run/config.yaml train.resume=latest"
    )
    assert user_errors_to_exit_code(raise_, stop) == 143  # 128 + SIGTERM
    assert capsys.readouterr().err == (
        "interrupted at step 7; resume with: dreambooth-kit train --config run/config.yaml train.resume=latest\n"
    )  # a requested stop, not an error: no "error:" prefix
    assert user_errors_to_exit_code(raise_, NonFiniteLossError("non-finite loss at steps [1, 2]")) == 1
    assert capsys.readouterr().err == "error: non-finite loss at steps [1, 2]\n"
    assert user_errors_to_exit_code(raise_, NonFiniteError("non-finite latents; use dtype=fp32")) == 2
    assert capsys.readouterr().err == "error: non-finite latents; use dtype=fp32\n"
    assert issubclass(NonFiniteError, FloatingPointError) and UserError.exit_code == 2


# ------------------------------------------------------------------ check-data without a config


def test_check_data_with_only_a_folder_checks_photos_offline_without_a_model(photos, monkeypatch, capsys):
    import dreambooth_kit.data.preflight as preflight

    _no_model(monkeypatch)
    monkeypatch.setattr(preflight, "load_tokenizer_only", lambda *a, **k: pytest.fail("tokenizer loaded"))
    assert main(["check-data", str(photos)]) == 0
    assert capsys.readouterr().out == (
        "5 usable images, 5 warnings, 0 errors (photos only, checked for 512 px training; "
        "add --config to check prompts too)\n"
    )  # the demo photos are 128 px: each warns against 512 px training
    assert main(["check-data", str(photos), "data.resolution=128"]) == 0
    assert capsys.readouterr().out.startswith("5 usable images, 0 warnings, 0 errors")


def test_check_data_folder_errors_and_usage(tmp_path, photos, capsys):
    assert main(["check-data", str(tmp_path / "nope")]) == 2
    assert _err_line(capsys) == f"error: data.instance_dir: image folder not found: {tmp_path / 'nope'}"
    assert main(["check-data"]) == 2
    assert (
        _err_line(capsys)
        == "error: check-data: give the photo folder (dreambooth-kit check-data photos/) or --config"
    )
    assert main(["check-data", str(photos), str(tmp_path)]) == 2
    assert _err_line(capsys).startswith("error: check-data takes one photo folder, got 2")


def test_check_data_with_hub_config_skips_prompts_when_tokenizer_not_local(photos, capsys, caplog):
    import logging

    # HF_HUB_OFFLINE=1 (conftest) and an empty cache: the tokenizer of the hub model is not here.
    with caplog.at_level(logging.INFO, logger="dreambooth_kit"):
        rc = main(["check-data", "--config", "sd21_base_lora.yaml", str(photos)])
    assert rc == 0
    assert capsys.readouterr().out.endswith("0 errors (prompts not checked)\n")
    assert any(
        r.getMessage().startswith("prompt checks skipped: the tokenizer of sd2-community")
        for r in caplog.records
    )


# ------------------------------------------------------------------ what every command prints


def test_log_lines_carry_the_level_once(photos):
    proc = subprocess.run(
        [sys.executable, "-m", "dreambooth_kit", "check-data", str(photos)],
        capture_output=True, text=True, timeout=E2E_TIMEOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 5 and all(ln.startswith(f"WARNING {photos.resolve()}/0") for ln in lines), lines
    assert not any(ln.startswith(("WARNING WARNING", "INFO INFO", "ERROR ERROR")) for ln in lines)


@pytest.mark.slow
def test_known_transformers_noise_is_silenced_and_other_warnings_are_not(tmp_path, tiny_model):
    import importlib.util

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: transformers has no fallback notice to print")
    proc = subprocess.run(
        [sys.executable, "-m", "dreambooth_kit", "generate", "--base", str(tiny_model), "--prompt", "x",
         "--steps", "1", "--n", "1", "--height", "32", "--width", "32", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=E2E_TIMEOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "requires torchvision" not in proc.stderr
    import logging

    from dreambooth_kit.util.logs import _DropKnownNoise

    keep = logging.LogRecord("transformers", logging.WARNING, "", 0, "some other warning", None, None)
    assert _DropKnownNoise().filter(keep)


@pytest.mark.parametrize("args", [["--help"], ["check-data", "PHOTOS"], ["class-images", "list"]])
def test_commands_that_need_no_model_start_without_torch(args, photos, tmp_path):
    """`--help`, `check-data PHOTOS` and `class-images list` import neither torch nor diffusers
    (~2 s of imports): they answer in a fraction of a second."""
    code = (
        "import sys\nfrom dreambooth_kit.cli import main\n"
        f"try:\n    main({[str(photos) if a == 'PHOTOS' else a for a in args]!r})\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    env = {**os.environ, "DREAMBOOTH_KIT_CLASS_STORE": str(tmp_path / "store")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr

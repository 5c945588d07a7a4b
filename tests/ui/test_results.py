"""The Evaluate, Generate and Export handlers without a browser, on the shared tiny run: an image the
UI makes has the pixels `dreambooth-kit generate` makes with that seed, its settings come back from
the PNG, and the kohya export is a file to download."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

from dreambooth_kit.errors import InvalidInput, UserError
from dreambooth_kit.ui import results
from dreambooth_kit.ui.paths import OutsideRoots, Roots


@pytest.fixture
def run(trained_run, tmp_path):
    """A private copy of the tiny run (the shared one stays read-only)."""
    src = trained_run["result"].output_dir
    return shutil.copytree(src, tmp_path / "runs" / "tiny", ignore=shutil.ignore_patterns("class_images"))


def _pixels(path) -> bytes:
    with Image.open(path) as im:
        return im.convert("RGB").tobytes()


def test_the_ui_image_is_the_clis_image_for_the_seed_and_its_settings_come_back(run, tmp_path, tiny_model):
    from dreambooth_kit.cli import main

    roots = Roots.of([tmp_path, tiny_model.parent])
    form = results.GenerateForm("runs/tiny", "a photo of zwx toy", seed=9, steps=1, guidance_scale=5.0)
    path, infotext = results.generate_image(roots, form)
    assert path.parent == tmp_path / "outputs" and "Seed: 9" in infotext and "Steps: 1" in infotext
    cli = ["generate", "--base", str(tiny_model), "--lora", str(run / "lora"), "--prompt", "a photo of zwx toy",
           "--seed", "9", "--n", "1", "--steps", "1", "--guidance-scale", "5", "--out", str(tmp_path / "cli")]  # fmt: skip
    assert main(cli) == 0
    assert _pixels(path) == _pixels(tmp_path / "cli" / "9.png")
    again, _ = results.generate_image(roots, form)  # the cached pipeline gives the same image
    assert again != path and _pixels(again) == _pixels(path)

    s = results.reuse_settings(str(path))
    assert (s["prompt"], s["seed"], s["steps"], s["guidance_scale"]) == ("a photo of zwx toy", 9, 1, 5.0)
    assert s["base"] == str(tiny_model) and s["loras"].endswith("pytorch_lora_weights.safetensors")
    assert s["use_run_lora"] is False and s["lora_scales"] == "1"
    reused = results.GenerateForm("", s["prompt"], seed=s["seed"], steps=s["steps"], guidance_scale=s["guidance_scale"],
                                  base=s["base"], use_run_lora=False, loras=s["loras"])  # fmt: skip
    assert _pixels(results.generate_image(roots, reused)[0]) == _pixels(path)


def test_generate_checks_what_it_is_given(run, tmp_path):
    roots = Roots.of([tmp_path])
    with pytest.raises(InvalidInput, match="prompt: empty"):
        results.generate_image(roots, results.GenerateForm("runs/tiny", " "))
    with pytest.raises(OutsideRoots):  # the run's model lies outside these roots
        results.generate_image(roots, results.GenerateForm("runs/tiny", "x", base="/etc/model"))
    with pytest.raises(InvalidInput, match="base model: empty"):
        results.generate_image(roots, results.GenerateForm("", "x"))
    with pytest.raises(InvalidInput, match="not a training run"):
        results.generate_image(roots, results.GenerateForm("photos", "x"))
    assert results._scales("1, 0.5", 2) == [1.0, 0.5] and results._scales("0.8", 3) == [0.8] * 3
    with pytest.raises(InvalidInput, match="2 values for 3 LoRAs"):
        results._scales("1 2", 3)
    png = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(png)
    with pytest.raises(InvalidInput, match="plain.png: holds no dreambooth_kit settings"):
        results.reuse_settings(str(png))


def test_the_kohya_export_is_a_file_to_download(run, tmp_path):
    roots = Roots.of([tmp_path])
    (kohya,) = results.export_run(roots, "runs/tiny", ["kohya"])
    assert kohya == run / "export" / "tiny_kohya.safetensors" and kohya.stat().st_size > 0
    with pytest.raises(InvalidInput, match="tick at least one format"):
        results.export_run(roots, "runs/tiny", [])


def test_a_folder_export_is_zipped_beside_itself(tmp_path):
    import zipfile

    folder = tmp_path / "merged-diffusers"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "w.safetensors").write_bytes(b"w" * 10)
    (folder / "model_index.json").write_text("{}")
    z = results._zipped(folder)
    assert z == tmp_path / "merged-diffusers.zip"
    with zipfile.ZipFile(z) as f:
        assert sorted(f.namelist()) == ["model_index.json", "unet/w.safetensors"]
        assert f.read("unet/w.safetensors") == b"w" * 10


def test_the_best_checkpoint_is_starred(tmp_path, monkeypatch):
    import dreambooth_kit
    from dreambooth_kit.evaluation.evaluate import EvalResult

    (tmp_path / "runs" / "x").mkdir(parents=True)
    rows = [
        {"checkpoint": "base", "step": 0, "subject_fidelity": 0.2, "subject_fidelity_se": 0.01, "pres": None,
         "images": 8, "settings": "s"},
        {"checkpoint": "step-000400", "step": 400, "subject_fidelity": 0.61234, "subject_fidelity_se": 0.01,
         "pres": None, "images": 8, "settings": "s"},
    ]  # fmt: skip
    asked = {}

    def fake(run, **kw):
        asked.update(run=run, **kw)
        return EvalResult(
            rows, rows[1], "highest subject fidelity", run / "eval", files={"plot": run / "p.png"}
        )

    monkeypatch.setattr(dreambooth_kit, "evaluate", fake)
    view = results.evaluate_run(Roots.of([tmp_path]), "runs/x", "all", 2, "evaluate.steps=4")
    assert asked == {
        "run": tmp_path / "runs" / "x",
        "checkpoints": "all",
        "seeds": 2,
        "overrides": ["evaluate.steps=4"],
    }
    assert view.headers == ["best", "checkpoint", "step", "subject_fidelity"]  # no empty or error columns
    assert view.rows == [["", "base", 0, 0.2], ["★", "step-000400", 400, 0.612]]
    assert view.best == "best: step-000400 (step 400): highest subject fidelity"
    assert view.plot == tmp_path / "runs" / "x" / "p.png"


def test_evaluate_needs_a_run_and_takes_only_evaluate_settings(tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(InvalidInput, match="train.max_steps=3 is not an evaluate.. setting"):
        results.evaluate_run(Roots.of([tmp_path]), "photos", extra="train.max_steps=3")
    with pytest.raises(UserError, match="not a training run"):
        results.evaluate_run(Roots.of([tmp_path]), "photos")


def test_the_sampler_names_are_generates():
    from dreambooth_kit.models.schedulers import SCHEDULERS

    assert results.SCHEDULERS == tuple(SCHEDULERS)

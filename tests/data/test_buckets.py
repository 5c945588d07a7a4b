"""Aspect-ratio buckets (data.buckets): the bucket list, the photo check's buckets, the bucketed
batches (one shape each, every row once an epoch, exact resume, several processes), bucket-shaped
class images, and tiny training runs with them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import DEMO_PHOTOS, tiny_cfg
from PIL import Image

from dreambooth_kit.data.buckets import bucket_sizes, class_image_counts, crop_share, nearest_bucket
from dreambooth_kit.data.dataset import BucketBatchSampler, preprocess


# --- the bucket list -------------------------------------------------------------------------------
def test_sd2_base_buckets_are_the_widths_tallest_heights_within_the_area():
    # by hand, 512 px / 64: width 384 -> 262144 // 384 = 682 -> 640; 448 -> 585 -> 576; 512 -> 512;
    # 320 -> 768 (2.4:1) and 704 -> 320 (2.2:1) are wider than 2:1
    assert bucket_sizes(512, 64) == [(384, 640), (448, 576), (512, 512), (576, 448), (640, 384)]


@pytest.mark.parametrize("resolution,step", [(512, 64), (768, 64), (1024, 64), (32, 8), (64, 16)])
def test_every_bucket_keeps_the_rules(resolution, step):
    sizes = bucket_sizes(resolution, step)
    assert (resolution, resolution) in sizes
    for w, h in sizes:
        assert w % step == 0 and h % step == 0
        assert w * h <= resolution**2
        assert max(w, h) <= 2 * min(w, h)
        assert (h, w) in sizes  # portrait and landscape alike
    aspects = [w / h for w, h in sizes]
    assert aspects == sorted(aspects)


def test_a_step_larger_than_the_resolution_is_refused():
    with pytest.raises(ValueError, match="at most the resolution"):
        bucket_sizes(32, 64)


@pytest.mark.parametrize(
    "photo,bucket",
    [((4032, 3024), (576, 448)), ((3024, 4032), (448, 576)), ((1920, 1080), (640, 384)),
     ((3000, 1000), (640, 384)), ((900, 1000), (512, 512)), ((100, 100), (512, 512))],
    ids=["4:3", "3:4", "16:9", "3:1", "9:10", "square"],
)  # fmt: skip
def test_a_photo_goes_to_the_bucket_nearest_its_aspect_ratio(photo, bucket):
    assert nearest_bucket(photo, bucket_sizes(512, 64)) == bucket


def test_crop_share_is_what_the_bucket_keeps():
    assert crop_share((4032, 3024), (576, 448)) == pytest.approx((576 / 448) / (4 / 3))  # width cut
    assert crop_share((1000, 500), (640, 384)) == pytest.approx((640 / 384) / 2)
    assert crop_share((640, 384), (640, 384)) == 1.0


def test_class_images_are_shared_in_proportion_to_the_photos():
    photos = [(32, 32)] * 3 + [(40, 24), (24, 40)]
    assert class_image_counts(photos, 100) == {(24, 40): 20, (32, 32): 60, (40, 24): 20}
    # 7: 4.2 / 1.4 / 1.4 -> 4 / 1 / 1, and the one left to a largest remainder (0.4; a tie: the size)
    assert class_image_counts(photos, 7) == {(24, 40): 2, (32, 32): 4, (40, 24): 1}
    # fewer class images than buckets: every bucket used still gets one (a batch holds one size)
    assert class_image_counts(photos, 2) == {(24, 40): 1, (32, 32): 1, (40, 24): 1}


# --- preprocess into a bucket ----------------------------------------------------------------------
def test_a_photo_of_the_buckets_aspect_ratio_keeps_its_whole_frame():
    """A 2:1 photo with a red left edge and a blue right edge, into a 2:1 bucket: both edges stay
    (a centre square crop would cut both)."""
    arr = np.full((40, 80, 3), 128, np.uint8)
    arr[:, :8] = (255, 0, 0)
    arr[:, -8:] = (0, 0, 255)
    img = Image.fromarray(arr)
    t = preprocess(img, (64, 32))
    assert t.shape == (3, 32, 64)
    assert t[0, :, 0].min() > 0.9 and t[2, :, -1].min() > 0.9  # red at the left, blue at the right
    square = preprocess(img, 32)
    assert square[0, :, 0].max() < 0.1 and square[2, :, -1].max() < 0.1  # the square crop lost both


def test_a_bucket_crop_takes_the_slack_from_the_offset():
    arr = np.zeros((40, 100, 3), np.uint8)
    arr[:, :20] = 255  # white at the left fifth
    img = Image.fromarray(arr)  # 2.5:1 into a 2:1 bucket: 20 px of slack
    left = preprocess(img, (80, 40), crop_offset=(0.0, 0.5))
    right = preprocess(img, (80, 40), crop_offset=(1.0, 0.5))
    assert left[0, 0, :20].min() > 0.9 and right[0].max() < -0.9


# --- the bucketed sampler --------------------------------------------------------------------------
SIZES = [(64, 64)] * 7 + [(80, 48)] * 3 + [(48, 80)] * 2


def _rows(batches):
    return [i for b in batches for _, i in b]


def test_every_batch_holds_one_size_and_every_row_comes_once_an_epoch():
    s = BucketBatchSampler(SIZES, batch_size=2, seed=5)
    for epoch in range(3):
        batches = s.batches(epoch)
        assert all(len({SIZES[i] for _, i in b}) == 1 for b in batches)
        assert sorted(_rows(batches)) == list(range(len(SIZES)))
        assert {e for b in batches for e, _ in b} == {epoch}
    assert s.batches(1) == BucketBatchSampler(SIZES, 2, seed=5).batches(1)  # (seed, epoch) alone
    assert s.batches(1) != s.batches(2)
    # the buckets interleave instead of coming one after another
    first = [SIZES[b[0][1]] for b in s.batches(0)]
    assert any(first[i] != first[i + 1] and first[i] in first[i + 2 :] for i in range(len(first) - 2))


def test_resume_at_skips_exactly_the_batches_trained_on():
    s = BucketBatchSampler(SIZES, batch_size=2, seed=5)
    full = s.batches(2)
    s.resume_at(2, 3)
    assert list(s) == full[3:] and len(s) == len(full) - 3


def test_several_processes_train_one_size_in_whole_batches(monkeypatch):
    """Through accelerate's own sharding (process r gets batches r, r + world, ...): in every step
    both processes hold a full batch of one size, and together they cover every row."""
    from accelerate.data_loader import BatchSamplerShard

    world, batch = 2, 2
    s = BucketBatchSampler(SIZES, batch_size=batch, seed=5, world=world)
    shards = [list(BatchSamplerShard(s, world, r)) for r in range(world)]
    assert len(shards[0]) == len(shards[1])
    for step in zip(*shards, strict=True):
        assert all(len(b) == batch for b in step)
        assert len({SIZES[i] for b in step for _, i in b}) == 1
    assert set(_rows([b for shard in shards for b in shard])) == set(range(len(SIZES)))
    s.resume_at(0, 2)  # two steps of both processes trained: each process goes on at its 3rd batch
    assert [list(BatchSamplerShard(s, world, r)) for r in range(world)] == [sh[2:] for sh in shards]


# --- training --------------------------------------------------------------------------------------
def _framed_photos(folder: Path) -> Path:
    """The demo photos, the 2nd cut to 128x80 (landscape) and the 4th to 80x128 (portrait)."""
    folder.mkdir(parents=True)
    for i, f in enumerate(sorted(DEMO_PHOTOS.iterdir())):
        img = Image.open(f)
        img = img.crop((0, 24, 128, 104)) if i == 1 else img.crop((24, 0, 104, 128)) if i == 3 else img
        img.save(folder / f.name)
    return folder


BUCKETED = {"data.buckets": True, "data.bucket_step": 16, "train.batch_size": 2}


def test_a_bucketed_run_trains_each_batch_at_one_of_the_photos_sizes(
    tmp_path, tiny_model, monkeypatch, caplog
):
    """Tiny model, 64 px, step 16: buckets 48x80, 64x64, 80x48. Every UNet input of the run is one
    bucket's latents (8x VAE: 6x10, 8x8, 10x6), instance and class rows alike; the class images are
    made at each bucket's size, in proportion (4: 1 + 2 + 1), each bucket's folder with its manifest."""
    import dreambooth_kit.training.loop as loop_mod
    from dreambooth_kit.training.train import train

    shapes = []
    real = loop_mod._latents

    def spy(ctx, batch, cache, rows):
        latents = real(ctx, batch, cache, rows)
        shapes.append(tuple(latents.shape))
        return latents

    monkeypatch.setattr(loop_mod, "_latents", spy)
    photos = _framed_photos(tmp_path / "photos")
    with caplog.at_level("INFO", logger="dreambooth_kit"):
        r = train(tiny_cfg(tmp_path, tiny_model, photos, **BUCKETED, **{"train.max_steps": 6}))
    assert r.steps == 6
    assert "('a photo of zwx toy', buckets: 1 at 48x80, 3 at 64x64, 1 at 80x48)" in caplog.text  # the plan
    # with prior preservation a batch is 2 photos + their 2 class images, or a bucket's last 1 + 1
    assert {s[0] for s in shapes} <= {2, 4} and {s[1:] for s in shapes} <= {(4, 8, 8), (4, 10, 6), (4, 6, 10)}
    assert {s[2:] for s in shapes} >= {(10, 6), (6, 10)}, shapes  # both non-square buckets trained
    cls = tmp_path / "class_images"
    for folder, size, n in [(cls, (64, 64), 2), (cls / "80x48", (80, 48), 1), (cls / "48x80", (48, 80), 1)]:
        images = sorted(folder.glob("class-*.png"))
        assert len(images) == n and all(Image.open(p).size == size for p in images)
        assert json.loads((folder / "manifest.json").read_text())["size"] == (
            64 if size == (64, 64) else "x".join(map(str, size))
        )
    assert r.class_images_generated == 4
    # the kohya export says so, as kohya's own files do
    from dreambooth_kit.export.kohya import kohya_metadata, labels_for

    assert kohya_metadata(labels_for(r.lora_path), rank=4, alpha=8)["ss_enable_bucket"] == "True"
    from dreambooth_kit.training.card import model_card  # and the model card

    assert "| Resolution | 64 (aspect-ratio buckets, sides in steps of 16) |" in model_card(r.output_dir)


def test_bucketed_losses_are_the_same_cached_and_uncached(tmp_path, tiny_model):
    """The latent cache encodes each image at its own bucket's size: the same training as encoding
    every step (the posterior sample is drawn the same way either way)."""
    from dreambooth_kit.training.train import train

    photos = _framed_photos(tmp_path / "photos")
    common = {**BUCKETED, "train.max_steps": 4, "prior.class_dir": str(tmp_path / "cls")}
    a = train(tiny_cfg(tmp_path / "a", tiny_model, photos, **common))
    b = train(tiny_cfg(tmp_path / "b", tiny_model, photos, **common, **{"data.cache_latents": False}))
    assert a.vae_encodes == 5 + 4 and b.vae_encodes is None
    assert a.losses == pytest.approx(b.losses, rel=1e-4, abs=1e-6)


def test_a_bucketed_run_resumes_bit_for_bit(tmp_path, tiny_model):
    """6 steps straight against 3, then a resume to 6: the same batches (the bucket order is a
    function of seed and epoch, the position a count of batches), the same LoRA."""
    from safetensors.torch import load_file

    from dreambooth_kit.training.train import train

    photos = _framed_photos(tmp_path / "photos")

    def cfg(name: str, steps: int, **kw):
        over = {**BUCKETED, "data.random_flip": True, "prior.class_dir": str(tmp_path / "cls"),
                "train.learning_rate": 1e-2, "train.output_dir": str(tmp_path / name), "train.max_steps": steps,
                "checkpoint.every_steps": 3, **kw}  # fmt: skip
        return tiny_cfg(tmp_path, tiny_model, photos, **over)

    straight = train(cfg("straight", 6))
    train(cfg("resumed", 3))
    resumed = train(cfg("resumed", 6, **{"train.resume": "latest"}))
    assert resumed.losses == straight.losses[3:]
    a = load_file(straight.lora_path)
    b = load_file(resumed.lora_path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_photo_check_shows_each_photos_bucket_before_any_model_loads(tmp_path):
    from dreambooth_kit.data.photo_checks import check_images

    photos = _framed_photos(tmp_path / "photos")
    wide = Image.open(DEMO_PHOTOS / "05.jpg").crop((0, 40, 128, 80))  # 128x40: 3.2:1
    wide.save(photos / "06.jpg")
    report = check_images(photos, resolution=64, buckets=bucket_sizes(64, 16))
    assert report.buckets[photos / "02.jpg"] == (80, 48) and report.buckets[photos / "04.jpg"] == (48, 80)
    assert report.buckets[photos / "01.jpg"] == (64, 64)
    infos = [str(i) for i in report.infos]
    assert any("02.jpg: 128x80: trains at 80x48 (data.buckets)" in i for i in infos), infos
    # the 3.2:1 photo: its 80x48 bucket keeps 52% of it
    warning = " ".join(str(w) for w in report.warnings if "06.jpg" in str(w))
    assert "its bucket 80x48 keeps only 52%" in warning and "crop it around the subject" in warning
    # without buckets the square crop's warning says what buckets would do
    plain = check_images(photos, resolution=64)
    assert not plain.buckets
    assert any("set data.buckets: true" in str(w) for w in plain.warnings if "06.jpg" in str(w))


def test_bad_bucket_settings_are_refused_with_the_fix(tmp_path, tiny_model, photos):
    from dreambooth_kit.config import ConfigError
    from dreambooth_kit.training.train import train

    with pytest.raises(ConfigError, match=r"data.bucket_step: 12 must be a positive multiple of 8"):
        tiny_cfg(tmp_path, tiny_model, photos, **{"data.buckets": True, "data.bucket_step": 12})
    with pytest.raises(ConfigError, match=r"does not divide data.resolution 64.*data.bucket_step=64"):
        tiny_cfg(tmp_path, tiny_model, photos, **{"data.buckets": True, "data.bucket_step": 48})
    # the tiny model halves sizes 8x in its VAE and 2x in its UNet: sides in multiples of 16
    cfg = tiny_cfg(tmp_path, tiny_model, photos, **{"data.buckets": True, "data.bucket_step": 8})
    with pytest.raises(ConfigError, match=r"multiples of 16 .*data.bucket_step=16"):
        train(cfg)
    assert not (tmp_path / "class_images").exists()  # refused before any class image is made

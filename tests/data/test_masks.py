"""data.masks: the per-photo masks that weight the instance loss; checked before any model loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import tiny_cfg
from PIL import Image

from dreambooth_kit.data.dataset import preprocess
from dreambooth_kit.data.masks import loss_weights, mask_problems
from dreambooth_kit.training.losses import diffusion_loss


def test_a_mask_of_zeros_leaves_the_instance_loss_at_the_unmasked_weight_times_the_plain_loss():
    torch.manual_seed(0)
    pred, target = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)  # 2 instance + 2 class rows
    plain, plain_parts = diffusion_loss(pred, target, num_instance=2)
    zeros = torch.full((2, 1, 8, 8), 0.1)  # loss_weights of an all-black mask at unmasked_weight 0.1
    masked, parts = diffusion_loss(pred, target, num_instance=2, instance_weights=zeros)
    assert parts["loss_instance"] == pytest.approx(0.1 * plain_parts["loss_instance"], rel=1e-6)
    assert parts["loss_prior"] == pytest.approx(plain_parts["loss_prior"], rel=1e-6)  # class rows untouched
    ones = torch.ones(2, 1, 8, 8)
    assert diffusion_loss(pred, target, num_instance=2, instance_weights=ones)[0].item() == pytest.approx(
        plain.item()
    )
    half = torch.ones(2, 1, 64, 64)  # at the image's size (8x the latents'): pooled down by the loss
    half[..., 32:] = 0.0  # only the left half of each instance row counts
    err = (pred[:2] - target[:2]) ** 2
    want = (err[..., :4].sum() / err.numel()).item()
    assert diffusion_loss(pred, target, num_instance=2, instance_weights=half)[1][
        "loss_instance"
    ] == pytest.approx(want, rel=1e-5)


def test_the_weights_follow_the_photos_crop_and_flip_down_to_the_latent_grid():
    mask = Image.new("L", (64, 32), 0)
    mask.paste(255, (0, 0, 16, 32))  # the left quarter of a wide photo is the subject
    left = loss_weights(mask, 32, preprocess, unmasked_weight=0.1, crop_offset=(0.0, 0.5))
    assert left.shape == (1, 32, 32)
    assert torch.allclose(left[0, :, :16], torch.ones(32, 16)) and torch.allclose(
        left[0, :, 16:], torch.full((32, 16), 0.1)
    )
    flipped = loss_weights(mask, 32, preprocess, unmasked_weight=0.1, crop_offset=(0.0, 0.5), flip=True)
    assert torch.allclose(flipped, left.flip(-1))
    right = loss_weights(mask, 32, preprocess, unmasked_weight=0.1, crop_offset=(1.0, 0.5))
    assert torch.allclose(right, torch.full((1, 32, 32), 0.1))  # the crop holds none of the subject


def _photo(folder, name, size=(40, 40), alpha=False):
    img = Image.new("RGBA" if alpha else "RGB", size, (200, 100, 50, 255) if alpha else (200, 100, 50))
    if alpha:
        img.putpixel((5, 5), (0, 0, 0, 0))
    img.save(folder / name)
    return folder / name


def test_every_bad_mask_is_named_with_its_fix(tmp_path):
    photos, masks = tmp_path / "photos", tmp_path / "masks"
    photos.mkdir()
    masks.mkdir()
    a, b, c, d = (_photo(photos, f"{n}.png") for n in "abcd")
    Image.new("L", (40, 40), 255).save(masks / "a.png")  # fine
    Image.new("L", (20, 20), 255).save(masks / "b.png")  # another size
    Image.new("L", (40, 40), 0).save(masks / "c.png")  # all black
    problems = dict(mask_problems([a, b, c, d], str(masks), photos))
    assert set(problems) == {masks / "b.png", masks / "c.png", masks / "d.png"}
    assert "is 20x20, the photo 40x40; a mask must have its photo's size" in problems[masks / "b.png"]
    assert "is all black: nothing of it would train at full weight" in problems[masks / "c.png"]
    assert f"no mask for d.png: expected {masks / 'd.png'}" in problems[masks / "d.png"]
    assert "has no alpha channel" in dict(mask_problems([a], "alpha", photos))[a]
    cut = _photo(photos, "cut.png", alpha=True)
    assert mask_problems([cut], "alpha", photos) == []
    assert "is the photo folder" in mask_problems([a], str(photos), photos)[0][1]


def test_training_refuses_a_missing_mask_before_any_model_loads(tmp_path, tiny_model, photos, monkeypatch):
    from dreambooth_kit.data.preflight import PreflightError
    from dreambooth_kit.models import source as models

    monkeypatch.setattr(models, "load_components", lambda *a, **k: pytest.fail("a model was loaded"))
    (tmp_path / "masks").mkdir()
    with pytest.raises(PreflightError) as e:
        from dreambooth_kit.training.train import train

        train(tiny_cfg(tmp_path, tiny_model, photos, **{"data.masks": str(tmp_path / "masks")}))
    assert re.search(
        r"data.masks: no mask for 01\.jpg: expected .*masks/01\.png",
        "\n".join(i.text for i in e.value.issues),
    )


@pytest.mark.parametrize("kind", ["folder", "alpha"])
def test_a_run_with_masks_weights_each_photo_by_its_own_mask(tmp_path, tiny_model, photos, monkeypatch, kind):
    """A 2-step run, batch 3: each instance row carries its own photo's weights (photo k's mask is
    white on its left k/8 of the width), 1 there and unmasked_weight on the rest."""
    from dreambooth_kit.training import loop
    from dreambooth_kit.training.train import train

    masks = tmp_path / "masks"
    masks.mkdir()
    white = {}  # photo stem -> white columns at the 64 px training size
    for k, p in enumerate(sorted(photos.glob("*.jpg")), start=1):
        with Image.open(p) as img:
            w, h = img.size
            white[p.stem] = 64 * k // 8
            if kind == "alpha":
                rgba = img.convert("RGBA")
                rgba.putalpha(Image.new("L", (w, h), 0))
                rgba.paste(img.crop((0, 0, w * k // 8, h)), (0, 0))  # opaque left part
                rgba.save(p.with_suffix(".png"))
                p.unlink()
            else:
                m = Image.new("L", (w, h), 0)
                m.paste(255, (0, 0, w * k // 8, h))
                m.save(masks / (p.stem + ".png"))
    seen = []
    real = loop._loss
    monkeypatch.setattr(
        loop,
        "_loss",
        lambda ctx, batch, *a: (
            seen.append((batch["keys"], batch["instance_weights"])),
            real(ctx, batch, *a),
        )[1],
    )
    cfg = tiny_cfg(
        tmp_path, tiny_model, photos,
        **{"data.masks": "alpha" if kind == "alpha" else str(masks), "train.unmasked_weight": 0.25,
           "train.max_steps": 2, "train.batch_size": 3},
    )  # fmt: skip
    result = train(cfg)
    assert result.steps == 2 and len(seen) == 2
    for keys, weights in seen:
        # One row per photo of the batch (3, then the epoch's last 2), at the image's size: the loss
        # pools it to the latents'.
        assert weights.shape[1:] == (1, 64, 64) and len(weights) == len(keys) // 2
        for (path, _flip), row in zip(keys, weights, strict=False):  # the instance rows come first
            edge = white[Path(path).stem]
            assert torch.allclose(row[..., : edge - 1], torch.ones_like(row[..., : edge - 1]), atol=0.02)
            assert torch.allclose(
                row[..., edge + 1 :], torch.full_like(row[..., edge + 1 :], 0.25), atol=0.02
            )


def test_an_unmasked_weight_out_of_range_is_refused_naming_the_field():
    from dreambooth_kit.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape("train.unmasked_weight: 1.5 must be in [0, 1]")):
        load_config("tiny.yaml", {"train.unmasked_weight": 1.5})


def test_the_toy_models_4x_vae_takes_masks_too(tmp_path):
    """Seen failing: the weights were pooled 8x (SD's VAE) before the loss, and the toy model's VAE
    downsamples 4x (a size error at the first step). Now the loss pools them to whatever grid the
    latents have: 2 steps of configs/toy.yaml on the cluttered photos with their masks."""
    from dreambooth_kit.config import load_config
    from dreambooth_kit.toy import world
    from dreambooth_kit.training.train import train

    world.write_subject_photos(tmp_path / "photos", clutter=True, masks=tmp_path / "masks")
    cfg = load_config(
        "toy.yaml",
        {"data.instance_dir": str(tmp_path / "photos"), "data.masks": str(tmp_path / "masks"),
         "prior.with_prior_preservation": False, "train.output_dir": str(tmp_path / "run"), "train.max_steps": 2},
    )  # fmt: skip
    assert train(cfg).steps == 2


def test_a_resume_notices_a_mask_changed_since_the_checkpoint(tmp_path, tiny_model, photos):
    """A mask weights the loss as much as its photo: the checkpoint's photo digest covers the mask
    files (data.masks a folder), so a resume after one was repainted is refused like a changed photo.
    Without masks the digest is what it was before masks were counted (old checkpoints still match)."""
    import hashlib

    from dreambooth_kit.training.checkpoint_index import CheckpointError
    from dreambooth_kit.training.resume_checks import photo_digest
    from dreambooth_kit.training.train import train

    masks = tmp_path / "masks"
    masks.mkdir()
    images = sorted(photos.glob("*.jpg"))
    for p in images:
        with Image.open(p) as img:
            m = Image.new("L", img.size, 0)
            m.paste(255, (0, 0, img.size[0] // 2, img.size[1]))
            m.save(masks / (p.stem + ".png"))
    old = hashlib.sha256()
    for p in images:  # the digest as it was computed before masks were counted
        old.update(f"{p.name}={hashlib.sha256(p.read_bytes()).hexdigest()}\n".encode())
    assert photo_digest(images, captions=False) == old.hexdigest()
    assert photo_digest(images, captions=False, masks="alpha") == old.hexdigest()  # in the photo's bytes
    with_masks = photo_digest(images, captions=False, masks=str(masks))
    assert with_masks != old.hexdigest()

    common = {"data.masks": str(masks), "checkpoint.every_steps": 2}
    train(tiny_cfg(tmp_path, tiny_model, photos, **common, **{"train.max_steps": 2}))
    Image.new("L", Image.open(images[0]).size, 255).save(masks / (images[0].stem + ".png"))  # repainted
    assert photo_digest(images, captions=False, masks=str(masks)) != with_masks
    with pytest.raises(
        CheckpointError, match="the photos .*with their captions and masks.* are not the ones"
    ):
        train(
            tiny_cfg(
                tmp_path, tiny_model, photos, **common, **{"train.max_steps": 4, "train.resume": "latest"}
            )
        )

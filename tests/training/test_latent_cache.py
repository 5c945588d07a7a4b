from __future__ import annotations

import pytest
from conftest import tiny_cfg

from dreambooth_kit.training.latent_cache import latent_cache_decision


def test_cache_decision_follows_augmentation(tmp_path, tiny_model, photos):
    on, why = latent_cache_decision(tiny_cfg(tmp_path, tiny_model, photos).data)
    assert on and "center crops" in why
    on, why = latent_cache_decision(tiny_cfg(tmp_path, tiny_model, photos, **{"data.random_flip": True}).data)
    assert on and "both flips" in why
    on, why = latent_cache_decision(
        tiny_cfg(tmp_path, tiny_model, photos, **{"data.center_crop": False}).data
    )
    assert not on and "random crops" in why
    on, why = latent_cache_decision(
        tiny_cfg(tmp_path, tiny_model, photos, **{"data.cache_latents": False}).data
    )
    assert not on


def _count_encodes(monkeypatch) -> dict:
    from diffusers import AutoencoderKL

    real = AutoencoderKL.encode
    calls = {"images": 0}

    def counting(self, x, *a, **k):
        calls["images"] += x.shape[0]
        return real(self, x, *a, **k)

    monkeypatch.setattr(AutoencoderKL, "encode", counting)
    return calls


def test_vae_encoder_runs_once_per_image(tmp_path, tiny_model, photos, monkeypatch):
    from dreambooth_kit.training.train import train

    cfg = tiny_cfg(tmp_path, tiny_model, photos, **{"prior.num_class_images": 4, "train.max_steps": 10})
    train(cfg)  # generates the 4 class images first (encodes nothing: generation only decodes)
    calls = _count_encodes(monkeypatch)
    cfg = tiny_cfg(
        tmp_path,
        tiny_model,
        photos,
        **{"prior.num_class_images": 4, "train.max_steps": 10, "train.overwrite": True},
    )
    r = train(cfg)  # 10 steps = 2 epochs over 5 rows (5 photos, 4 class images)
    assert calls["images"] == 9 == r.vae_encodes  # 5 + 4 distinct images, each encoded once
    calls["images"] = 0
    r = train(tiny_cfg(tmp_path, tiny_model, photos, **{"prior.num_class_images": 4, "train.max_steps": 10, "train.overwrite": True, "data.cache_latents": False}))  # fmt: skip
    assert calls["images"] == 20 and r.vae_encodes is None  # uncached: 2 images every step


def test_cached_loss_sequence_equals_uncached(tmp_path, tiny_model, photos):
    from dreambooth_kit.training.train import train

    common = {"prior.num_class_images": 3, "train.max_steps": 6}
    a = train(tiny_cfg(tmp_path / "a", tiny_model, photos, **common))
    b = train(tiny_cfg(tmp_path / "b", tiny_model, photos, **common, **{"data.cache_latents": False}))
    assert a.vae_encodes is not None and b.vae_encodes is None
    assert a.losses == pytest.approx(b.losses, rel=1e-4, abs=1e-6)


def test_frozen_models_released_only_without_validation(tmp_path, tiny_model, photos, caplog):
    import logging

    from dreambooth_kit.training.train import train

    with caplog.at_level(logging.INFO, logger="dreambooth_kit"):
        r = train(tiny_cfg(tmp_path / "a", tiny_model, photos, **{"train.max_steps": 2}))
    assert "released the frozen text encoder and VAE" in caplog.text
    assert r.vae_encodes == 5 + 4  # every photo and class image, encoded up front, once
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dreambooth_kit"):
        train(tiny_cfg(tmp_path / "b", tiny_model, photos, **{"train.max_steps": 2, "validation.every_steps": 2, "validation.steps": 1, "validation.num_images": 1}))  # fmt: skip
    assert "released the frozen" not in caplog.text

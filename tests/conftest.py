"""Session fixtures: the tiny SD2-shaped model built once (saved to disk so the real loading path is
used) and one short LoRA training run shared by the tests that only read its outputs."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub: tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# A test's time limit catches hangs; it is never a speed assertion. A unit test that takes 300 s
# hangs. An end-to-end test (marked slow, or using a shared trained fixture, which the first test to
# ask for it pays for: the toy-world fixture trains 400 steps, 57 s on 2 quiet cores and over 300 s
# on a shared one) and a subprocess that trains get 45 minutes: half of CI's 90, so a real hang
# still ends with its traceback inside CI's time.
UNIT_TIMEOUT = 300
E2E_TIMEOUT = 2700


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("timeout") is None and is_end_to_end(item):
            item.add_marker(pytest.mark.timeout(E2E_TIMEOUT))


def is_end_to_end(item) -> bool:
    """Marked slow, or using a fixture shared by a module or the session (built once, paid by the
    first test that asks: a trained run, a built model)."""
    shared = any(
        d.scope in ("module", "session", "package")
        for defs in item._fixtureinfo.name2fixturedefs.values()
        for d in defs
        if not d.argname.startswith("_")  # the autouse session cache folder costs nothing
    )
    return item.get_closest_marker("slow") is not None or shared


DEMO_PHOTOS = REPO / "dreambooth_kit" / "demo_subject"


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    # builtin:tiny-sd2 is built into this cache, never into the user's ~/.cache.
    d = tmp_path_factory.mktemp("dbk-cache")
    os.environ["DREAMBOOTH_KIT_CACHE"] = str(d)
    yield d


@pytest.fixture(autouse=True)
def _class_store(tmp_path, monkeypatch):
    # prior.store=auto: each test (and the trainers it starts) gets its own class-image store, so
    # no test reuses another's class images.
    monkeypatch.setenv("DREAMBOOTH_KIT_CLASS_STORE", str(tmp_path / "class-store"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from dreambooth_kit.models.tiny import build_tiny_sd2

    return build_tiny_sd2(tmp_path_factory.mktemp("models") / "tiny-sd2")


@pytest.fixture
def photos(tmp_path) -> Path:
    """A private copy of the demo photos (tests may add junk to it)."""
    d = tmp_path / "photos"
    shutil.copytree(DEMO_PHOTOS, d)
    return d


def tiny_cfg(tmp_path: Path, model: Path, photos: Path, **overrides):
    from dreambooth_kit.config import load_config

    base = {
        "model.pretrained": str(model),
        "data.instance_dir": str(photos),
        "prior.class_dir": str(tmp_path / "class_images"),
        "prior.num_class_images": 4,
        "prior.sample_steps": 2,
        "train.output_dir": str(tmp_path / "run"),
        "train.max_steps": 3,
        "train.log_every": 1,
    }
    base.update(overrides)
    return load_config("tiny.yaml", base)


def train_tiny(tmp: Path, model: Path, **overrides):
    """A tiny run in ``tmp`` on its own copy of the demo photos (``tmp/photos``): what a module-scoped
    fixture shares read-only."""
    from dreambooth_kit.training.train import train

    photos = tmp / "photos"
    shutil.copytree(DEMO_PHOTOS, photos)
    return train(tiny_cfg(tmp, model, photos, **overrides))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, tiny_model):
    """One 3-step LoRA run (rank 4, alpha 8, prior preservation on), shared read-only."""
    from dreambooth_kit.training.train import train

    tmp = tmp_path_factory.mktemp("trained")
    photos = tmp / "photos"
    shutil.copytree(DEMO_PHOTOS, photos)
    unet_file = tiny_model / "unet" / "diffusion_pytorch_model.safetensors"
    before = unet_file.read_bytes()
    cfg = tiny_cfg(tmp, tiny_model, photos, **{"train.learning_rate": 1e-2})
    result = train(cfg)
    return {"result": result, "cfg": cfg, "unet_bytes_before": before, "unet_file": unet_file}


def patch_diffusion_loss(monkeypatch, transform) -> None:
    """Wrap loop.diffusion_loss: ``transform(n, loss)`` gets the 1-based call number and the loss
    and returns the loss to use (NaN injection, fp16 overflow spikes)."""
    import dreambooth_kit.training.loop as loop_mod  # where the training step looks diffusion_loss up

    real = loop_mod.diffusion_loss
    calls = {"n": 0}

    def wrapped(*a, **k):
        calls["n"] += 1
        loss, parts = real(*a, **k)
        return transform(calls["n"], loss), parts

    monkeypatch.setattr(loop_mod, "diffusion_loss", wrapped)


def with_variant_files(tiny_model: Path, dest: Path) -> Path:
    """A copy of the tiny model whose text encoder, VAE and UNet also have "fp16"-variant files with other
    weights (doubled), as a hub repo's variant files are other files than its default ones."""
    import shutil

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    shutil.copytree(tiny_model, dest)
    for sub, cls in (("text_encoder", CLIPTextModel), ("vae", AutoencoderKL), ("unet", UNet2DConditionModel)):
        model = cls.from_pretrained(dest / sub)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(2)
        model.save_pretrained(dest / sub, variant="fp16")
    return dest

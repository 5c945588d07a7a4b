"""run_validation: sample files and grid, PNG metadata, determinism, tracker logging, and the promise
that validation leaves training untouched (RNG streams, module modes, dtypes)."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_cfg
from PIL import Image

from dreambooth_kit.config import AdapterConfig, validation_prompts
from dreambooth_kit.training.adapters import add_lora
from dreambooth_kit.training.train import run_settings
from dreambooth_kit.training.validation import run_validation

PROMPTS = ["a photo of zwx toy", "a zwx toy on a beach", "a drawing of zwx toy"]


def _accelerator(**kwargs):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # accelerate's singletons outlive an Accelerator; other tests in this process create their own.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(**kwargs)


@pytest.fixture
def models(tiny_model) -> SimpleNamespace:
    """The training-time components: frozen base, a random (non-zero) LoRA, UNet in train mode."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    unet.requires_grad_(False)
    add_lora(unet, None, AdapterConfig(rank=4, alpha=8, init_lora_weights=False))
    unet.train()
    return SimpleNamespace(
        unet=unet,
        text_encoder=CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder").eval(),
        vae=AutoencoderKL.from_pretrained(tiny_model, subfolder="vae").eval(),
        tokenizer=AutoTokenizer.from_pretrained(tiny_model, subfolder="tokenizer"),
        scheduler=DDPMScheduler.from_pretrained(tiny_model, subfolder="scheduler"),
    )


def _cfg(tmp_path: Path, tiny_model: Path, photos: Path, prompts=PROMPTS, **overrides):
    overrides = {"validation.prompts": prompts, "validation.num_images": 2, "validation.steps": 2} | overrides
    return tiny_cfg(tmp_path, tiny_model, photos, **overrides)


def _run(cfg, models, accelerator, tmp_path: Path, step: int = 250) -> list[Path]:
    return run_validation(
        run_settings(cfg), **vars(models), step=step, output_dir=tmp_path / "run", accelerator=accelerator
    )


def test_files_grid_and_png_metadata(tmp_path, tiny_model, photos, models):
    cfg = _cfg(tmp_path, tiny_model, photos)
    paths = _run(cfg, models, _accelerator(), tmp_path)
    folder = tmp_path / "run" / "samples" / "step-000250"
    expected = [f"p{j}-{s}.png" for j in range(3) for s in (1557, 1558)] + ["grid.png"]
    assert paths == [folder / name for name in expected]
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected)  # no temp files left
    for path in paths[:-1]:
        img = Image.open(path)
        assert img.size == (64, 64)
        j, seed = path.stem[1:].split("-")
        assert PROMPTS[int(j)] in img.text["parameters"]
        assert f"Seed: {seed}," in img.text["parameters"]
        assert f"Model: {tiny_model.name}" in img.text["parameters"]  # the base model being trained
    grid = Image.open(paths[-1])
    assert grid.size == (2 * 64, 3 * 64)  # columns = seeds, rows = prompts
    grid_px = np.asarray(grid.convert("RGB"))
    for j in range(3):
        for i, seed in enumerate((1557, 1558)):
            tile = grid_px[j * 64 : (j + 1) * 64, i * 64 : (i + 1) * 64]
            assert np.array_equal(tile, np.asarray(Image.open(folder / f"p{j}-{seed}.png").convert("RGB")))


def test_same_weights_same_step_give_identical_bytes_and_the_lora_is_used(
    tmp_path, tiny_model, photos, models
):
    cfg = _cfg(tmp_path, tiny_model, photos, prompts=PROMPTS[:1])
    acc = _accelerator()
    first = [p.read_bytes() for p in _run(cfg, models, acc, tmp_path)]
    second = [p.read_bytes() for p in _run(cfg, models, acc, tmp_path)]
    assert first == second
    assert first[0] != first[1]  # seed + i: the two columns differ
    with torch.no_grad():  # what one optimizer step does: only LoRA weights move
        for name, p in models.unet.named_parameters():
            if "lora_B" in name:
                p.mul_(3.0)
    third = [p.read_bytes() for p in _run(cfg, models, acc, tmp_path)]
    assert third[0] != first[0]  # the live training UNet is sampled, not a stale copy


def test_rng_streams_modes_and_dtypes_are_untouched(tmp_path, tiny_model, photos, models):
    cfg = _cfg(tmp_path, tiny_model, photos, prompts=PROMPTS[:1])
    acc = _accelerator()
    models.text_encoder.train()  # as when the text encoder is trained too
    dtypes = {n: p.dtype for n, p in models.unet.named_parameters()}

    def draws():
        return torch.rand(4).tolist(), torch.randn(2).tolist(), random.random(), np.random.rand()

    def seed_all():
        torch.manual_seed(7)
        random.seed(7)
        np.random.seed(7)

    seed_all()
    without = draws()

    # Sampling with per-image CPU generators draws nothing from the global streams, but schedulers
    # or layers that do (SDE samplers, dropout) would: stand one in, so a missing restore shows.
    def consume_global_rng(*_) -> None:
        draws()

    hook = models.unet.register_forward_pre_hook(consume_global_rng)
    seed_all()
    _run(cfg, models, acc, tmp_path)
    hook.remove()
    assert draws() == without
    assert all(m.training for m in models.unet.modules())
    assert all(m.training for m in models.text_encoder.modules())
    assert not models.vae.training
    assert {n: p.dtype for n, p in models.unet.named_parameters()} == dtypes
    models.unet.eval()
    _run(cfg, models, acc, tmp_path)
    assert not any(m.training for m in models.unet.modules())  # eval stays eval


def test_half_precision_base_autocasts_without_casting_the_unet(tmp_path, tiny_model, photos, models):
    """bf16 frozen base + fp32 LoRA (a bf16 run; fp16 on CUDA takes the same path), fp32 VAE."""
    for name, p in models.unet.named_parameters():
        if "lora_" not in name:
            p.data = p.data.to(torch.bfloat16)
    models.text_encoder.to(torch.bfloat16)
    dtypes = {n: p.dtype for n, p in models.unet.named_parameters()}
    assert {torch.bfloat16, torch.float32} <= set(dtypes.values())
    cfg = _cfg(tmp_path, tiny_model, photos, prompts=PROMPTS[:1])
    paths = _run(cfg, models, _accelerator(), tmp_path)
    assert len(paths) == 3 and all(p.exists() for p in paths)
    assert {n: p.dtype for n, p in models.unet.named_parameters()} == dtypes
    assert next(models.vae.parameters()).dtype == torch.float32
    assert "decode" not in vars(models.vae)  # the temporary fp32-decode shim is gone


def test_tensorboard_gets_image_summaries_at_the_step(tmp_path, tiny_model, photos, models):
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    cfg = _cfg(tmp_path, tiny_model, photos, prompts=PROMPTS[:2])
    acc = _accelerator(log_with="tensorboard", project_dir=str(tmp_path / "tb"))
    acc.init_trackers("dbk")
    _run(cfg, models, acc, tmp_path, step=250)
    acc.end_training()
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert len(events) == 1
    ea = EventAccumulator(str(events[0].parent), size_guidance={IMAGES: 0})
    ea.Reload()
    assert set(ea.Tags()["images"]) == {"validation/p0", "validation/p1"}
    for tag in ("validation/p0", "validation/p1"):
        assert [e.step for e in ea.Images(tag)] == [250]


def test_other_processes_return_nothing(tmp_path, tiny_model, photos, models):
    class NotMain:
        is_main_process = False

    cfg = _cfg(tmp_path, tiny_model, photos)
    assert (
        run_validation(
            run_settings(cfg), **vars(models), step=5, output_dir=tmp_path / "run", accelerator=NotMain()
        )
        == []
    )
    assert not (tmp_path / "run" / "samples").exists()


def test_prompts_default_to_the_instance_prompts(tmp_path, tiny_model, photos):
    assert validation_prompts(_cfg(tmp_path, tiny_model, photos, prompts=[])) == ["a photo of zwx toy"]
    concepts = [
        {"instance_dir": str(photos), "instance_prompt": "a photo of zwx toy"},
        {"instance_dir": str(photos), "instance_prompt": "a photo of qrt cat"},
    ]
    cfg = _cfg(
        tmp_path, tiny_model, photos, prompts=[],
        **{"concepts": concepts, "data.instance_dir": "", "data.identifier": None},
    )  # fmt: skip
    assert validation_prompts(cfg) == ["a photo of zwx toy", "a photo of qrt cat"]

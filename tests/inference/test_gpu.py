"""Real-GPU checks: the same fp16 policy as tests/test_fp16.py, on CUDA kernels, and the automatic
fp16 choice on CUDA. Skipped by default (`-m gpu` to run on a machine with CUDA)."""

from __future__ import annotations

import pytest
import torch
from conftest import patch_diffusion_loss, tiny_cfg
from safetensors.torch import load_file

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_fp16_training_keeps_lora_fp32_and_finite(tmp_path, tiny_model, photos):
    from dreambooth_kit.training.train import train

    r = train(
        tiny_cfg(tmp_path, tiny_model, photos, **{"train.mixed_precision": "fp16", "train.max_steps": 3})
    )
    sd = load_file(r.lora_path)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in sd.values())
    assert all(torch.isfinite(torch.tensor(r.losses)))


def test_fp16_generation_on_cuda_is_finite_and_seeded(tiny_model):
    from dreambooth_kit.inference.generate import generate
    from dreambooth_kit.inference.pipeline import load_pipeline

    pipe = load_pipeline(str(tiny_model))
    assert pipe.unet.dtype == torch.float16
    a = generate(pipe, "a photo of zwx toy", seed=3, steps=2)[0][0]
    b = generate(pipe, "a photo of zwx toy", seed=3, steps=2)[0][0]
    assert a.tobytes() == b.tobytes()


def test_isolated_inf_gradient_is_skipped_under_fp16(tmp_path, tiny_model, photos, monkeypatch):
    """An inf gradient under fp16 AMP: GradScaler skips the step, it is counted, the LR
    does not advance, training continues."""
    from dreambooth_kit.training.train import train

    # x1e38 at call 2: finite in fp32, overflows to inf in the fp16 backward
    patch_diffusion_loss(monkeypatch, lambda n, loss: loss * 1e38 if n == 2 else loss)
    r = train(
        tiny_cfg(tmp_path, tiny_model, photos, **{"train.mixed_precision": "fp16", "train.max_steps": 4})
    )
    assert r.skipped_steps == [2] and r.steps == 4


def test_auto_batch_size_measures_cuda_memory(tiny_model, caplog):
    """On CUDA "auto" reads torch.cuda's peak of the one-image batch and the free memory: the tiny
    model's image costs MBs, so the rest go at the cap, 16, seeded as at batch 1."""
    import numpy as np

    from dreambooth_kit.inference.generate import generate
    from dreambooth_kit.inference.pipeline import load_pipeline

    pipe = load_pipeline(str(tiny_model))
    sizes: list[int] = []
    with caplog.at_level("INFO", logger="dreambooth_kit"):
        out = generate(pipe, "a photo of a toy", seed=0, num_images=20, steps=2, batch_size="auto",
                       on_batch=lambda b: sizes.append(len(b)))  # fmt: skip
    assert sizes == [1, 16, 3] and "batch size auto: 16 images per batch" in caplog.text
    single = generate(pipe, "a photo of a toy", seeds=[7], steps=2)[0].image
    diff = np.abs(np.asarray(out[7].image, dtype=int) - np.asarray(single, dtype=int))
    assert diff.max() <= 8  # fp16 batched kernels round differently from one image's

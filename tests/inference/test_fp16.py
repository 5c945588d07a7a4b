"""The fp16 precision policy, in true half precision on CPU through the code a T4 runs: fp16
frozen weights, fp32 LoRA params, fp16 autocast with loss scaling, the skipped step on an inf
gradient, seeded fp16 generation and its fp32 VAE retry. (CPU fp16 is slow: 64 px, 2-4 steps.)"""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import patch_diffusion_loss, tiny_cfg
from safetensors.torch import load_file

FP16 = {"train.mixed_precision": "fp16"}


def test_fp16_training_runs_in_half_precision_and_keeps_lora_fp32(tmp_path, tiny_model, photos, monkeypatch):
    import dreambooth_kit.training.loop as loop_mod
    from dreambooth_kit.training.train import train

    seen = {}
    real_step = loop_mod._step

    def spy(ctx, *a, **k):
        if not seen:
            seen["scaler"] = type(ctx.accelerator.scaler).__name__
            seen["frozen"] = {p.dtype for p in ctx.unet.parameters() if not p.requires_grad}
            seen["trained"] = {p.dtype for p in ctx.params}
            seen["autocast"] = []
            # A LoRA layer holds fp32 weights: only fp16 autocast makes it compute in half precision.
            lora = next(m for n, m in ctx.unet.named_modules() if n.endswith("lora_A.default"))
            hook = lora.register_forward_hook(lambda m, i, o: seen["autocast"].append(o.dtype))
            try:
                return real_step(ctx, *a, **k)
            finally:
                hook.remove()
        return real_step(ctx, *a, **k)

    monkeypatch.setattr(loop_mod, "_step", spy)
    r = train(tiny_cfg(tmp_path, tiny_model, photos, **FP16, **{"train.max_steps": 3}))
    assert seen["scaler"] == "GradScaler"
    assert seen["frozen"] == {torch.float16} and seen["trained"] == {torch.float32}
    assert set(seen["autocast"]) == {torch.float16}  # the UNet really computed in half precision
    sd = load_file(r.lora_path)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in sd.values())
    assert r.steps == 3 and all(torch.isfinite(torch.tensor(r.losses)))
    assert any(v.abs().sum() > 0 for k, v in sd.items() if "lora_B" in k or "lora.up" in k)


def test_isolated_inf_gradient_is_skipped_by_the_grad_scaler(tmp_path, tiny_model, photos, monkeypatch):
    """x1e38 at step 2: finite in fp32, inf in the fp16-scaled backward. GradScaler skips that step,
    it is counted, the LR schedule does not advance, and training goes on to the end."""
    from dreambooth_kit.training.train import train

    patch_diffusion_loss(monkeypatch, lambda n, loss: loss * 1e38 if n == 2 else loss)
    r = train(tiny_cfg(tmp_path, tiny_model, photos, **FP16, **{"train.max_steps": 4}))
    assert r.skipped_steps == [2] and r.steps == 4
    assert all(torch.isfinite(v).all() for v in load_file(r.lora_path).values())


def test_fp16_generation_on_cpu_is_half_precision_and_seeded(tiny_model):
    from dreambooth_kit.inference.generate import generate
    from dreambooth_kit.inference.pipeline import load_pipeline

    pipe = load_pipeline(str(tiny_model), dtype="fp16")
    assert pipe.unet.dtype == torch.float16 and pipe.vae.dtype == torch.float16
    a = generate(pipe, "a photo of zwx toy", seed=3, steps=2, height=64, width=64)[0].image
    b = generate(pipe, "a photo of zwx toy", seed=3, steps=2, height=64, width=64)[0].image
    assert a.tobytes() == b.tobytes()


def test_fp16_vae_overflow_is_decoded_again_in_fp32(tiny_model, caplog):
    """An fp16 VAE decode that overflows (NaN) is redone in fp32; the image is finite, the VAE is
    back in fp16 afterwards, and the retry is logged."""
    import numpy as np

    from dreambooth_kit.inference.generate import generate
    from dreambooth_kit.inference.pipeline import load_pipeline

    pipe = load_pipeline(str(tiny_model), dtype="fp16")
    real = pipe.vae.decode
    dtypes = []

    def overflowing(z, *a, **k):
        dtypes.append(z.dtype)
        out = real(z, *a, **k)
        if z.dtype == torch.float16:
            return (torch.full_like(out[0], float("nan")),)
        return out

    pipe.vae.decode = overflowing
    with caplog.at_level(logging.WARNING, logger="dreambooth_kit"):
        img = generate(pipe, "a photo of zwx toy", seed=3, steps=2, height=64, width=64)[0].image
    assert dtypes == [torch.float16, torch.float32]
    assert "decoding again in fp32" in caplog.text
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr.std() > 0  # a real picture, not a flat black fill
    assert pipe.vae.dtype == torch.float16


@pytest.mark.parametrize("mixed_precision, amp", [("fp16", True), ("no", False)])
def test_accelerator_on_cpu_gets_fp16_autocast_only_when_asked(
    tmp_path, tiny_model, photos, mixed_precision, amp
):
    from dreambooth_kit.training.launch import make_accelerator

    cfg = tiny_cfg(tmp_path, tiny_model, photos, **{"train.mixed_precision": mixed_precision})
    acc = make_accelerator(cfg, tmp_path)
    assert acc.native_amp is amp and (acc.scaler is not None) is amp

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dreambooth_kit.errors import InvalidInput
from dreambooth_kit.inference.generate import Generated, generate
from dreambooth_kit.inference.pipeline import load_pipeline
from dreambooth_kit.inference.pngmeta import save_png

PROMPT = "a photo of zwx toy"


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return load_pipeline(str(tiny_model))


def test_same_seed_gives_bit_identical_png_bytes(pipe, tmp_path):
    ((a, pa),) = generate(pipe, PROMPT, seed=42, steps=2, num_images=1)
    ((b, pb),) = generate(pipe, PROMPT, seed=42, steps=2, num_images=1)
    fa, fb = save_png(a, pa, tmp_path / "a.png"), save_png(b, pb, tmp_path / "b.png")
    assert fa.read_bytes() == fb.read_bytes()
    ((c, _),) = generate(pipe, PROMPT, seed=43, steps=2, num_images=1)
    assert np.asarray(c).tobytes() != np.asarray(a).tobytes()  # the seed matters


def test_image_i_of_a_4_image_call_equals_single_call_with_seed_plus_i(pipe):
    four = generate(pipe, PROMPT, seed=100, steps=2, num_images=4)
    assert [p.seed for _, p in four] == [100, 101, 102, 103]
    for i in (0, 2, 3):
        ((single, _),) = generate(pipe, PROMPT, seed=100 + i, steps=2, num_images=1)
        assert np.array_equal(np.asarray(four[i][0]), np.asarray(single))


def test_batched_unet_calls_match_within_rounding(pipe):
    """batch_size > 1 runs images through the UNet together: same latents (one generator per
    image), but batched matmuls may round differently, so equality is within 2/255 only."""
    four = generate(pipe, PROMPT, seed=100, steps=2, num_images=4, batch_size=4)
    ((single, _),) = generate(pipe, PROMPT, seed=102, steps=2, num_images=1)
    diff = np.abs(np.asarray(four[2][0], dtype=int) - np.asarray(single, dtype=int))
    assert diff.max() <= 2


def test_explicit_seed_list(pipe):
    out = generate(pipe, PROMPT, seeds=[7, 3], steps=2)
    assert [p.seed for _, p in out] == [7, 3]
    ((three, _),) = generate(pipe, PROMPT, seed=3, steps=2)
    assert np.array_equal(np.asarray(out[1][0]), np.asarray(three))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"height": 60}, "height=60 must be a positive multiple of 8"),
        ({"width": 0}, "width=0"),
        ({"steps": 0}, "steps=0 must be in 1..1000"),
        ({"seeds": [1, 2, 3], "num_images": 2}, "seeds has 3 entries but num_images=2"),
    ],
)
def test_bad_arguments_rejected_before_the_model_runs(pipe, monkeypatch, kwargs, match):
    monkeypatch.setattr(type(pipe.pipe), "__call__", lambda *a, **k: pytest.fail("model touched"))
    with pytest.raises(InvalidInput, match=match):  # a UserError: one line in the CLI
        generate(pipe, PROMPT, **kwargs)


def test_png_carries_a1111_parameters_and_exact_json(pipe, tmp_path):
    ((img, params),) = generate(
        pipe, PROMPT, negative_prompt="blurry", seed=1557, steps=3, guidance_scale=6.5
    )
    path = save_png(img, params, tmp_path / "out.png")
    with Image.open(path) as im:
        text = im.text
    lines = text["parameters"].split("\n")
    assert lines[0] == PROMPT
    assert lines[1] == "Negative prompt: blurry"
    fields = dict(kv.split(": ", 1) for kv in lines[2].split(", "))
    assert fields["Steps"] == "3" and fields["Seed"] == "1557" and fields["CFG scale"] == "6.5"
    assert fields["Size"] == "64x64" and fields["Sampler"] == "DDPM"
    ours = json.loads(text["dreambooth_kit"])
    assert ours["seed"] == 1557 and ours["negative_prompt"] == "blurry" and ours["steps"] == 3


def test_non_finite_decode_is_an_error_not_a_black_png(pipe, monkeypatch):
    import torch

    real = pipe.vae.decode

    def nan_decode(*a, **k):
        out = real(*a, **k)
        out.sample.fill_(float("nan")) if hasattr(out, "sample") else out[0].fill_(float("nan"))
        return out

    monkeypatch.setattr(pipe.vae, "decode", nan_decode)
    with pytest.raises(FloatingPointError, match="non-finite"):
        generate(pipe, PROMPT, seed=1, steps=1)
    assert torch.isfinite(next(pipe.unet.parameters())).all()


def test_lora_changes_generation_and_scale_zero_is_base(trained_run, tiny_model):
    lora_dir = trained_run["result"].lora_dir
    base = load_pipeline(str(tiny_model))
    with_lora = load_pipeline(str(tiny_model), lora=lora_dir)
    off = load_pipeline(str(tiny_model), lora=lora_dir / "pytorch_lora_weights.safetensors", lora_scale=0.0)
    ((b, _),) = generate(base, PROMPT, seed=5, steps=2)
    ((w, pw),) = generate(with_lora, PROMPT, seed=5, steps=2)
    ((o, _),) = generate(off, PROMPT, seed=5, steps=2)
    assert not np.array_equal(np.asarray(b), np.asarray(w))
    assert np.abs(np.asarray(b, dtype=int) - np.asarray(o, dtype=int)).max() <= 1
    assert pw.loras == [str(lora_dir / "pytorch_lora_weights.safetensors")] and pw.lora_scales == [1.0]
    assert 'Lora hashes: "run: ' in pw.infotext() and "<lora:run:1>" in pw.infotext()


def test_missing_lora_path_is_named(tiny_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="LoRA not found: .*nope"):
        load_pipeline(str(tiny_model), lora=tmp_path / "nope")


# ------------------------------------------------------------------ re-creating an image from its PNG, samplers, img2img


def _arr(img) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def test_from_png_recreates_the_image_exactly(trained_run, tiny_model, tmp_path, capsys):
    from dreambooth_kit.cli import main

    lora = str(trained_run["result"].lora_dir)
    args = ["generate", "--base", str(tiny_model), "--lora", lora, "--prompt", PROMPT, "--steps", "2"]
    assert main([*args, "--n", "2", "--seed", "11", "--scheduler", "ddim", "--out", str(tmp_path / "a")]) == 0
    original = tmp_path / "a" / "12.png"
    assert main(["generate", "--from-png", str(original), "--out", str(tmp_path / "b")]) == 0
    again = tmp_path / "b" / "12.png"
    with Image.open(original) as a, Image.open(again) as b:
        assert a.tobytes() == b.tobytes()
        assert "Sampler: DDIM" in a.text["parameters"]


@pytest.mark.parametrize("name", ["dpmpp_2m", "ddim", "euler_a", "euler", "ddpm", "pndm"])
def test_every_scheduler_runs_and_is_named(tiny_model, name):
    from dreambooth_kit.models.schedulers import SCHEDULERS

    pipe = load_pipeline(str(tiny_model), scheduler=name)
    assert pipe.scheduler.config.prediction_type == "v_prediction"  # the model's, kept
    ((img, p),) = generate(pipe, PROMPT, seed=1, steps=2)
    assert p.sampler == SCHEDULERS[name][2] and p.scheduler == name
    # A uint8 image is always finite: what a broken sampler gives is a flat (e.g. black) picture.
    assert _arr(img).std() > 1


def test_unknown_scheduler_and_cpu_offload_are_refused(tiny_model):
    with pytest.raises(ValueError, match="scheduler 'k_lms'"):
        load_pipeline(str(tiny_model), scheduler="k_lms")
    with pytest.raises(ValueError, match="offload='model'.*device is cpu"):
        load_pipeline(str(tiny_model), offload="model", device="cpu")


def test_fused_equals_unfused_and_unload_restores_base(trained_run, tiny_model):
    lora = trained_run["result"].lora_dir
    base = generate(load_pipeline(str(tiny_model)), PROMPT, seed=3, steps=2)[0].image
    unfused = generate(load_pipeline(str(tiny_model), lora=lora), PROMPT, seed=3, steps=2)[0].image
    fused_pipe = load_pipeline(str(tiny_model), lora=lora, fuse=True)
    fused = generate(fused_pipe, PROMPT, seed=3, steps=2)[0].image
    assert np.abs(_arr(fused) - _arr(unfused)).max() <= 2
    assert np.abs(_arr(unfused) - _arr(base)).max() > 2
    fused_pipe.unfuse_lora()
    fused_pipe.unload_lora_weights()
    restored = generate(fused_pipe, PROMPT, seed=3, steps=2)[0].image
    assert np.abs(_arr(restored) - _arr(base)).max() <= 1


def test_two_loras_with_scales(trained_run, tiny_model):
    lora = trained_run["result"].lora_dir
    both = load_pipeline(str(tiny_model), lora=[lora, lora], lora_scale=[0.5, 0.5])
    one = load_pipeline(str(tiny_model), lora=lora, lora_scale=1.0)
    a = generate(both, PROMPT, seed=2, steps=2)[0].image
    b = generate(one, PROMPT, seed=2, steps=2)[0].image
    assert np.abs(_arr(a) - _arr(b)).max() <= 2  # 0.5 + 0.5 of the same LoRA = 1.0 of it
    with pytest.raises(ValueError, match="lora_scale has 1 values for 2 LoRAs"):
        load_pipeline(str(tiny_model), lora=[lora, lora], lora_scale=[1.0])


def _sd15_shaped_lora(tmp_path, tiny_model):
    """A LoRA for a UNet whose cross-attention width (16) differs from the tiny SD2's (32),
    as an SD 1.5 LoRA (768) differs from SD 2.1 (1024)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from dreambooth_kit.config import AdapterConfig
    from dreambooth_kit.training.adapters import add_lora, lora_state_dicts

    cfg = dict(UNet2DConditionModel.load_config(tiny_model, subfolder="unet"))
    cfg["cross_attention_dim"] = 16
    other = UNet2DConditionModel.from_config(cfg)
    add_lora(other, None, AdapterConfig(init_lora_weights=False))
    sd, _ = lora_state_dicts(other, None)
    StableDiffusionPipeline.save_lora_weights(tmp_path / "sd15", unet_lora_layers=sd)
    return tmp_path / "sd15"


def test_lora_for_another_width_is_refused_and_pipeline_still_works(tiny_model, tmp_path):
    from dreambooth_kit.training.adapters import LoraMismatchError, load_lora

    bad = _sd15_shaped_lora(tmp_path, tiny_model)
    with pytest.raises(LoraMismatchError, match="made for another model .cross-attention width 16.*width 32"):
        load_pipeline(str(tiny_model), lora=bad)
    pipe = load_pipeline(str(tiny_model))
    base = generate(pipe, PROMPT, seed=4, steps=2)[0].image
    with pytest.raises(LoraMismatchError):
        load_lora(pipe, bad, "x")
    assert pipe.get_list_adapters() == {} or not any(pipe.get_list_adapters().values())
    assert np.array_equal(_arr(generate(pipe, PROMPT, seed=4, steps=2)[0].image), _arr(base))


def test_truncated_or_pickle_lora_is_refused(tiny_model, tmp_path, trained_run):
    data = trained_run["result"].lora_path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.safetensors: not a readable .safetensors"):
        load_pipeline(str(tiny_model), lora=tmp_path / "cut.safetensors")
    (tmp_path / "old.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="only .safetensors LoRAs"):
        load_pipeline(str(tiny_model), lora=tmp_path / "old.bin")


def test_img2img_strength_zero_is_the_vae_reconstruction_and_strength_orders(pipe, tmp_path):
    src = Image.open(
        sorted((Path(__file__).parents[2] / "dreambooth_kit" / "demo_subject").glob("*.jpg"))[0]
    ).convert("RGB")
    src = src.resize((64, 64))
    zero = generate(pipe, PROMPT, init_image=src, strength=0.0, seed=1, steps=4)[0]
    assert zero.params.mode == "img2img" and zero.params.strength == 0.0
    low = generate(pipe, PROMPT, init_image=src, strength=0.25, seed=1, steps=8)[0].image
    high = generate(pipe, PROMPT, init_image=src, strength=1.0, seed=1, steps=8)[0].image
    d_low = np.abs(_arr(low) - _arr(zero.image)).mean()
    d_high = np.abs(_arr(high) - _arr(zero.image)).mean()
    assert d_low < d_high  # less strength stays closer to the input's reconstruction
    assert (
        "Denoising strength: 0.25"
        in generate(pipe, PROMPT, init_image=src, strength=0.25, seed=1, steps=8)[0].params.infotext()
    )


def test_inpainting_keeps_unmasked_latents(pipe, monkeypatch):
    """Unmasked latents end exactly as the encoded input (diffusers blends them back every step);
    the masked half is repainted. Checked in latent space: the tiny model's random-weight decoder
    mixes all 8x8 latent positions, so pixel-space closeness would only measure the random VAE."""
    import torch

    from dreambooth_kit.inference import generate as inference

    src = Image.open(
        sorted((Path(__file__).parents[2] / "dreambooth_kit" / "demo_subject").glob("*.jpg"))[1]
    ).convert("RGB")
    src = src.resize((64, 64))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (32, 0, 64, 64))  # repaint the right half = latent columns 4..7
    seen = {}
    real = inference.decode_latents

    def capture(p, z, seeds):
        seen["z"] = z.clone()
        return real(p, z, seeds)

    monkeypatch.setattr(inference, "decode_latents", capture)
    out = generate(pipe, PROMPT, init_image=src, mask_image=mask, strength=1.0, seed=1, steps=4)[0]
    assert out.params.mode == "inpaint"
    with torch.no_grad():
        dist = pipe.vae.encode(pipe.image_processor.preprocess(src)).latent_dist
    z, sf = seen["z"], pipe.vae.config.scaling_factor
    # The input's latents, sampled with the image's seed, as the pipeline does:
    expected = dist.sample(torch.Generator().manual_seed(1)) * sf
    kept = (z[..., :4] - expected[..., :4]).abs().max().item()
    repainted = (z[..., 4:] - expected[..., 4:]).abs().mean().item()
    assert kept < 1e-4 and repainted > 0.1, (kept, repainted)


def test_random_seed_is_recorded_so_the_image_can_be_made_again(pipe):
    a = generate(pipe, PROMPT, seed=None, steps=2)[0]
    again = generate(pipe, PROMPT, seed=a.params.seed, steps=2)[0]
    assert np.array_equal(_arr(a.image), _arr(again.image))


def test_half_precision_nan_decode_is_retried_in_fp32(tiny_model, monkeypatch, caplog):
    """The fp16 path's decision logic on CPU: a bf16 VAE stands in for fp16 (both half precision)."""
    import logging

    import torch

    pipe = load_pipeline(str(tiny_model), dtype="bf16")
    real = pipe.vae.decode
    calls = {"n": 0}

    def flaky(z, *a, **k):
        calls["n"] += 1
        out = real(z, *a, **k)
        if calls["n"] == 1:  # the half-precision decode overflows ...
            out[0].fill_(float("nan"))
        return out

    monkeypatch.setattr(pipe.vae, "decode", flaky)
    with caplog.at_level(logging.WARNING, logger="dreambooth_kit"):
        ((img, _),) = generate(pipe, PROMPT, seed=1, steps=1)
    assert calls["n"] == 2 and "decoding again in fp32" in caplog.text  # ... and is retried in fp32
    assert _arr(img).std() > 1  # a picture, not the flat black a NaN decode turns into
    assert pipe.vae.dtype == torch.bfloat16  # VAE dtype restored

    monkeypatch.setattr(pipe.vae, "decode", lambda z, *a, **k: (real(z, *a, **k)[0] * float("nan"),))
    with pytest.raises(FloatingPointError, match="non-finite values even in fp32"):
        generate(pipe, PROMPT, seed=1, steps=1)


def test_needs_fp32_retry_decisions():
    import torch

    from dreambooth_kit.inference.generate import needs_fp32_retry

    ok = torch.zeros(1, 3, 8, 8)
    black = torch.full((1, 3, 8, 8), -1.0)
    nan = ok.clone()
    nan[0, 0, 0, 0] = float("nan")
    assert needs_fp32_retry(ok, torch.float16) is None
    assert needs_fp32_retry(nan, torch.float16) == "non-finite values"
    assert needs_fp32_retry(black, torch.float16) == "an all-black image"
    assert needs_fp32_retry(nan, torch.float32) is None  # fp32 is the retry; nothing to retry into


def test_non_finite_latents_are_an_error(pipe, monkeypatch):
    real_call = type(pipe.pipe).__call__

    def nan_latents(self, *a, **k):
        out = real_call(self, *a, **k)
        out.images.fill_(float("nan"))
        return out

    monkeypatch.setattr(type(pipe.pipe), "__call__", nan_latents)
    with pytest.raises(FloatingPointError, match="non-finite latents"):
        generate(pipe, PROMPT, seed=1, steps=1)


def test_cuda_only_speed_options_are_refused_on_cpu(tiny_model):
    with pytest.raises(ValueError, match="compile=True is for CUDA"):
        load_pipeline(str(tiny_model), compile=True, device="cpu")


def test_uncached_hub_model_offline_is_explained():
    from dreambooth_kit.models.source import ModelLoadError

    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE=1.*hf download nobody-here/no-model"):
        load_pipeline("nobody-here/no-model")


def test_non_lora_file_and_lora_for_absent_layers_are_refused(tiny_model, tmp_path, trained_run):
    from safetensors.torch import load_file, save_file

    from dreambooth_kit.training.adapters import LoraMismatchError

    unet_weights = load_file(tiny_model / "unet" / "diffusion_pytorch_model.safetensors")
    save_file(dict(list(unet_weights.items())[:4]), tmp_path / "model.safetensors")
    with pytest.raises(LoraMismatchError, match="not a LoRA file"):
        load_pipeline(str(tiny_model), lora=tmp_path / "model.safetensors")
    sd = load_file(trained_run["result"].lora_path)
    # Most tensors renamed to layers this UNet does not have (another architecture's blocks):
    moved = {
        (k.replace("down_blocks.0", "down_blocks.7") if i % 4 else k): v
        for i, (k, v) in enumerate(sd.items())
    }
    save_file(moved, tmp_path / "other.safetensors")
    with pytest.raises(
        LoraMismatchError, match=r"\d+ of \d+ LoRA tensors target layers this model does not have"
    ):
        load_pipeline(str(tiny_model), lora=tmp_path / "other.safetensors")


def test_duplicate_adapter_name_and_unknown_adapter(trained_run, tiny_model):
    from dreambooth_kit.training.adapters import load_lora

    pipe = load_pipeline(str(tiny_model), lora=trained_run["result"].lora_dir)
    with pytest.raises(ValueError, match="adapter name 'lora0' is already loaded"):
        load_lora(pipe, trained_run["result"].lora_dir, "lora0")
    with pytest.raises(ValueError):
        pipe.set_adapters(["nope"])  # diffusers names the unknown adapter


# ------------------------------------------------------------------ foreign LoRAs (SD 1.x, SDXL, extra tensors)


def _write(path, tensors, metadata=None):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _kohya(name, width_in, width_out, rank=2):
    import torch

    return {
        f"{name}.lora_down.weight": torch.randn(rank, width_in) * 0.01,
        f"{name}.lora_up.weight": torch.randn(width_out, rank) * 0.01,
        f"{name}.alpha": torch.tensor(float(rank)),
    }


def _peft(name, width_in, width_out, rank=2):
    import torch

    return {
        f"{name}.lora_A.weight": torch.randn(rank, width_in) * 0.01,
        f"{name}.lora_B.weight": torch.randn(width_out, rank) * 0.01,
    }


TO_K = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # a layer the tiny UNet has (32 -> 32)


def _foreign(kind):
    """Small stand-ins for real files: the real SD 1.x / SDXL input widths on the tiny model's layer names
    (SDXL keys in kohya's sgm spelling, as kohya writes them), a few KB each."""
    if kind == "sd1-kohya":
        return _kohya(f"lora_unet_{TO_K.replace('.', '_')}", 768, 32) | _kohya(
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768, 768
        )
    if kind == "sdxl-kohya":
        return (
            _kohya("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 2048, 640)
            | _kohya("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768, 768)
            | _kohya("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280)
        )
    if kind == "sd1-diffusers":
        return _peft(f"unet.{TO_K}", 768, 32) | _peft(
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj", 768, 768
        )
    assert kind == "sdxl-diffusers"
    return _peft(f"unet.{TO_K}", 2048, 32) | _peft(
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj", 1280, 1280
    )


@pytest.mark.parametrize(
    ("kind", "named"),
    [
        ("sd1-kohya", r"made for SD 1\.x \(cross-attention width 768, text width 768\)"),
        ("sdxl-kohya", r"made for SDXL \(cross-attention width 2048.*lora_te2_"),
        ("sd1-diffusers", r"made for SD 1\.x \(cross-attention width 768, text width 768\)"),
        ("sdxl-diffusers", r"made for SDXL \(cross-attention width 2048.*text_encoder_2\."),
    ],
)
def test_sd1_and_sdxl_loras_get_the_architecture_message(pipe, tmp_path, kind, named):
    """Before: a raw peft "size mismatch for ...lora_A" (or "Target modules ... not found") error."""
    from dreambooth_kit.training.adapters import LoraMismatchError, load_lora

    f = _write(tmp_path / f"{kind}.safetensors", _foreign(kind))
    with pytest.raises(LoraMismatchError, match=named) as e:
        load_lora(pipe, f, "foreign")
    assert str(f) in str(e.value) and "size mismatch" not in str(e.value) and "\n" not in str(e.value)
    assert not any(pipe.get_list_adapters().values())  # nothing was loaded


def test_architecture_is_named_with_the_real_sd2_widths():
    """The same decision with SD 2.1's widths (1024), from shapes only: no 3 GB model needed."""
    from dreambooth_kit.training.adapters import architecture_mismatch

    def shapes(kind):
        return {k: tuple(v.shape) for k, v in _foreign(kind).items()}

    sd2 = {"cross_width": 1024, "text_width": 1024}
    for kind in ("sd1-kohya", "sd1-diffusers"):
        why = architecture_mismatch(shapes(kind), **sd2)
        assert (
            why.startswith("this LoRA was made for SD 1.x")
            and "model (SD 2.x) has cross-attention width 1024" in why
        )
        assert why.endswith("Use a LoRA trained on SD 2.x")
    for kind in ("sdxl-kohya", "sdxl-diffusers"):
        assert architecture_mismatch(shapes(kind), **sd2).startswith("this LoRA was made for SDXL")
    fits = _kohya(f"lora_unet_{TO_K.replace('.', '_')}", 1024, 320) | _kohya(
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj", 1024, 1024
    )
    assert architecture_mismatch({k: tuple(v.shape) for k, v in fits.items()}, **sd2) is None


def test_extra_tensors_that_diffusers_would_drop_are_refused(trained_run, tiny_model, tmp_path):
    """An otherwise fitting LoRA with text_encoder_2 tensors: diffusers loads it and drops them without a
    word (checked: load_lora_weights succeeds). Refused, with the count."""
    from safetensors.torch import load_file

    from dreambooth_kit.export.kohya import export_kohya
    from dreambooth_kit.training.adapters import LoraMismatchError

    ours = load_file(trained_run["result"].lora_path)
    extra = _peft("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj", 1280, 1280)
    f = _write(tmp_path / "with_te2.safetensors", ours | extra)
    n = len(ours) + 2
    with pytest.raises(LoraMismatchError, match=rf"2 of {n} tensors are for SDXL's second text encoder"):
        load_pipeline(str(tiny_model), lora=f)
    # The same in kohya format (lora_te2_ down/up/alpha beside our exported keys).
    k = load_file(export_kohya(trained_run["result"].lora_path, tmp_path / "k.safetensors"))
    g = _write(
        tmp_path / "kohya_te2.safetensors",
        k | _kohya("lora_te2_text_model_encoder_layers_0_mlp_fc1", 1280, 5120),
    )
    with pytest.raises(
        LoraMismatchError, match=rf"3 of {len(k) + 3} tensors are for SDXL's second text encoder"
    ):
        load_pipeline(str(tiny_model), lora=g)
    # DoRA scales (diffusers filters them out and loads a plain LoRA) are counted too.
    import torch

    h = _write(
        tmp_path / "dora.safetensors", k | {next(iter(k)).split(".")[0] + ".dora_scale": torch.ones(1, 32)}
    )
    with pytest.raises(LoraMismatchError, match="1 of .* tensors are DoRA scales"):
        load_pipeline(str(tiny_model), lora=h)


def test_our_kohya_export_passes_the_checks_and_loads(trained_run, tiny_model, tmp_path):
    """The checks refuse nothing that fits: our own kohya export loads and renders like our file."""
    from dreambooth_kit.export.kohya import export_kohya

    k = export_kohya(trained_run["result"].lora_path, tmp_path / "k.safetensors")
    a = generate(load_pipeline(str(tiny_model), lora=trained_run["result"].lora_dir), PROMPT, seed=6, steps=2)
    b = generate(load_pipeline(str(tiny_model), lora=k), PROMPT, seed=6, steps=2)
    assert np.abs(_arr(a[0].image) - _arr(b[0].image)).max() <= 2


# ------------------------------------------------------------------ inputs: PNG settings, init/mask images


def test_from_png_with_damaged_settings_is_one_clear_line(tmp_path, capsys):
    from PIL import PngImagePlugin

    from dreambooth_kit.cli import main
    from dreambooth_kit.inference.generate import regenerate_from_png

    info = PngImagePlugin.PngInfo()
    info.add_text("dreambooth_kit", '{"prompt": "a photo", "seed": "42"')  # cut short
    Image.new("RGB", (8, 8)).save(tmp_path / "cut.png", pnginfo=info)
    with pytest.raises(InvalidInput, match=r"cut.png: its dreambooth_kit settings are damaged"):
        regenerate_from_png(tmp_path / "cut.png")
    (tmp_path / "notes.png").write_text("not an image")
    assert main(["generate", "--from-png", str(tmp_path / "notes.png"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "notes.png: not a readable PNG image" in err and "\n" not in err
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")  # a PNG from another tool
    with pytest.raises(InvalidInput, match="plain.png: has no dreambooth_kit settings"):
        regenerate_from_png(tmp_path / "plain.png")


@pytest.mark.parametrize("which", ["init_image", "mask_image"])
def test_init_or_mask_image_that_is_not_an_image_is_named(pipe, tmp_path, monkeypatch, which):
    monkeypatch.setattr(type(pipe.pipe), "__call__", lambda *a, **k: pytest.fail("model touched"))
    bad = tmp_path / "photo.jpg"
    bad.write_text("<html>404</html>")
    good = Image.new("RGB", (64, 64), "gray")
    kwargs = {"init_image": bad} if which == "init_image" else {"init_image": good, "mask_image": bad}
    what = which.replace("_", " ")
    with pytest.raises(InvalidInput, match=rf"^{what} .*photo.jpg: cannot identify image file") as e:
        generate(pipe, PROMPT, seed=1, steps=2, **kwargs)
    assert "\n" not in str(e.value)
    with pytest.raises(InvalidInput, match="mask_image needs init_image"):
        generate(pipe, PROMPT, seed=1, steps=2, mask_image=good)


def _phone_photo(path):
    """A portrait phone photo as cameras store it: landscape pixels plus EXIF orientation 6 (rotate 90
    degrees clockwise to view). Returns the upright image it shows."""
    rng = np.random.default_rng(0)
    stored = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))  # 64 wide, 48 high
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, exif=exif.tobytes(), quality=95)
    with Image.open(path) as im:
        from PIL import ImageOps

        return ImageOps.exif_transpose(im).convert("RGB")  # 48 wide, 64 high


def test_phone_photo_is_rotated_once_for_size_and_pixels_and_closed(pipe, tmp_path, monkeypatch):
    """Before: the size came from the stored (landscape) image and the pixels from the rotated one, so a
    portrait photo came out squashed to 64x48; and the size probe left the file open."""
    import PIL.Image

    upright = _phone_photo(tmp_path / "phone.jpg")
    opened = []
    real_open = PIL.Image.open

    def tracking_open(*a, **k):
        im = real_open(*a, **k)
        opened.append(im)
        return im

    monkeypatch.setattr(PIL.Image, "open", tracking_open)
    from_file = generate(pipe, PROMPT, init_image=tmp_path / "phone.jpg", strength=0.5, seed=3, steps=2)[0]
    monkeypatch.setattr(PIL.Image, "open", real_open)
    assert (from_file.params.width, from_file.params.height) == (48, 64) == from_file.image.size
    assert opened and all(im.fp is None for im in opened), "an input image file was left open"
    from_upright = generate(pipe, PROMPT, init_image=upright, strength=0.5, seed=3, steps=2)[0]
    assert np.array_equal(_arr(from_file.image), _arr(from_upright.image))  # the same, rotated, pixels
    mask = Image.new("L", (48, 64), 255)
    inpainted = generate(pipe, PROMPT, init_image=tmp_path / "phone.jpg", mask_image=mask, seed=3, steps=2)[0]
    assert inpainted.image.size == (48, 64)


def test_from_png_of_an_image_made_with_two_loras(trained_run, tiny_model, tmp_path):
    """Before: the PNG recorded "a,b" as one LoRA path and --from-png failed with LoRA not found."""
    import shutil

    from dreambooth_kit.inference.generate import regenerate_from_png
    from dreambooth_kit.inference.images import save_images
    from dreambooth_kit.inference.pngmeta import lora_hash

    a = trained_run["result"].lora_path
    b = shutil.copy(a, tmp_path / "second.safetensors")
    pipe2 = load_pipeline(str(tiny_model), lora=[a, b], lora_scale=[0.7, 0.3])
    ((img, params),) = generate(pipe2, PROMPT, seed=9, steps=2)
    assert params.loras == [str(a), str(b)] and params.lora_scales == [0.7, 0.3]
    assert params.lora_hashes == [lora_hash(a), lora_hash(b)]
    assert params.infotext().split("\n")[0] == f"{PROMPT} <lora:run:0.7> <lora:second:0.3>"
    (png,) = save_images([Generated(img, params)], tmp_path / "out")
    again = regenerate_from_png(png)
    assert again.params.loras == params.loras and again.params.lora_scales == [0.7, 0.3]
    assert np.array_equal(_arr(again.image), _arr(img))


def test_single_file_base_is_hashed_as_a1111_hashes_it(tiny_model, tmp_path):
    """With a single file as the base, "Model hash" is that file's sha256[:10] (what A1111 shows for it)."""
    import hashlib

    from dreambooth_kit.models.singlefile import save_single_file

    f = save_single_file(tiny_model, tmp_path / "tiny.safetensors", prediction_type="v_prediction")
    ((_, params),) = generate(load_pipeline(str(f)), PROMPT, seed=1, steps=1)
    assert params.model_hash == hashlib.sha256(f.read_bytes()).hexdigest()[:10]


def test_png_names_the_runs_kohya_export_and_json_the_loaded_lora(trained_run, tiny_model, tmp_path):
    """``generate --lora runs/my_dog/lora``: A1111 users install ``my_dog_kohya.safetensors`` (another
    name and hash), so the infotext's tag and ``Lora hashes`` name that file once the run has it; the
    JSON keeps the file that was loaded. An export of other weights (the run trained again since) is
    not named: A1111 would apply a LoRA that did not make the image."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from dreambooth_kit.export.run import run_exports
    from dreambooth_kit.inference.pngmeta import lora_hash, read_metadata

    run = tmp_path / "my_dog"
    shutil.copytree(trained_run["result"].output_dir, run, ignore=shutil.ignore_patterns("class_images"))
    lora = run / "lora" / "pytorch_lora_weights.safetensors"

    def png_info(name):
        ((img, params),) = generate(
            load_pipeline(str(tiny_model), lora=run / "lora"), PROMPT, seed=5, steps=1
        )
        meta = read_metadata(save_png(img, params, tmp_path / f"{name}.png"))
        assert meta["params"].loras == [str(lora)] and meta["params"].lora_hashes == [lora_hash(lora)]
        return meta["infotext"]

    before = png_info("no-export")
    assert before["prompt"] == f"{PROMPT} <lora:my_dog:1>"
    assert before["Lora hashes"] == f"my_dog: {lora_hash(lora)}"

    (kohya,) = run_exports(run, ["kohya"])
    assert kohya == run / "export" / "my_dog_kohya.safetensors"
    after = png_info("exported")
    assert after["prompt"] == f"{PROMPT} <lora:my_dog_kohya:1>"
    assert after["Lora hashes"] == f"my_dog_kohya: {lora_hash(kohya)}" and lora_hash(kohya) != lora_hash(lora)

    with safe_open(str(lora), framework="pt") as h:
        meta = h.metadata()
    # The run's LoRA replaced by other weights (trained again): the export is stale. The extra metadata
    # changes the file's size, so no hash remembered by (path, size, mtime) can answer for the old file.
    save_file({k: v * 2 for k, v in load_file(lora).items()}, str(lora), metadata=meta | {"again": "yes"})
    stale = png_info("stale")
    assert stale["prompt"] == f"{PROMPT} <lora:my_dog:1>"
    assert stale["Lora hashes"] == f"my_dog: {lora_hash(lora)}"


# The lowest release of each that does what we ask of it, found by installing each release with the
# locked partners and running the tests: diffusers 0.39 ignores from_pretrained(dtype=) (it logs
# "Keyword arguments {'dtype': ...} are not expected" and loads fp32, so fp16 on CUDA was lost), 0.40
# reads it but raises IndexError loading a kohya text-encoder LoRA into transformers 5's flat
# CLIPTextModel (test_export's test_text_encoder_lora); transformers 4.55 reads only torch_dtype=.
LOWEST_THAT_WORKS = {"diffusers": (0, 41), "transformers": (4, 56)}


def _lower_bound(name: str) -> tuple[int, ...]:
    import re

    text = (Path(__file__).resolve().parents[2] / "pyproject.toml").read_text()
    (bound,) = re.findall(rf'^\s*"{name}>=([0-9.]+)', text, flags=re.M)
    return tuple(int(x) for x in bound.split("."))


@pytest.mark.parametrize("name", sorted(LOWEST_THAT_WORKS))
def test_dependency_lower_bounds_are_releases_that_do_what_we_call(name):
    """inference._load_base passes dtype= to diffusers, models.load_components to transformers, and
    generate loads kohya LoRAs: pyproject's lower bounds must be releases that do it, not ones that
    drop the keyword silently or fail on the text encoder."""
    assert _lower_bound(name) >= LOWEST_THAT_WORKS[name]


def test_fp16_asked_is_fp16_loaded(tiny_model):
    """What the installed diffusers/transformers do with the keywords we pass: every weight in fp16
    (on diffusers 0.39 the pipeline came back in fp32)."""
    import torch

    from dreambooth_kit.config import ModelConfig
    from dreambooth_kit.models.source import load_components

    pipe = load_pipeline(str(tiny_model), dtype="fp16", device="cpu")
    for name in ("unet", "text_encoder", "vae"):
        assert {p.dtype for p in getattr(pipe, name).parameters()} == {torch.float16}, name
    comps = load_components(ModelConfig(pretrained=str(tiny_model)), dtype=torch.float16)
    for name in ("unet", "text_encoder", "vae"):
        assert {p.dtype for p in getattr(comps, name).parameters()} == {torch.float16}, name


def test_from_png_refuses_a_lora_that_is_not_the_one_that_made_the_image(trained_run, tiny_model, tmp_path):
    """Before, --from-png loaded whatever sat at the recorded path: a LoRA retrained in place (or a
    PNG from elsewhere naming a path on this machine) gave another image as if it were the same."""
    import shutil

    from safetensors.torch import load_file, save_file

    from dreambooth_kit.errors import InvalidInput
    from dreambooth_kit.inference.generate import regenerate_from_png
    from dreambooth_kit.inference.images import save_images

    lora = shutil.copy(trained_run["result"].lora_path, tmp_path / "mine.safetensors")
    pipe = load_pipeline(str(tiny_model), lora=lora)
    (png,) = save_images(generate(pipe, PROMPT, seed=3, steps=2), tmp_path / "out")
    sd = load_file(lora)
    save_file({k: v * 1.5 for k, v in sd.items()}, lora)  # retrained in place
    with pytest.raises(InvalidInput, match=r"not the one that made the image .*Pass --lora"):
        regenerate_from_png(png)
    assert regenerate_from_png(png, lora=lora).params.lora_hashes  # taken on purpose: loads
    # The base model the same way: replaced at its path, it is refused unless --base names it.
    base = shutil.copytree(tiny_model, tmp_path / "base")
    (png2,) = save_images(generate(load_pipeline(str(base)), PROMPT, seed=3, steps=2), tmp_path / "out2")
    unet = base / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: v * 1.01 for k, v in load_file(unet).items()}, unet)
    with pytest.raises(InvalidInput, match=r"names the base model .* Pass --base"):
        regenerate_from_png(png2)


@pytest.mark.parametrize(
    "kw, said",
    [({"steps": 10**9}, "steps=1000000000 must be in 1..1000"), ({"width": 10**6}, "at most 4096")],
)
def test_numbers_are_bounded_before_anything_is_allocated(tiny_model, kw, said):
    """A PNG's recorded settings (or a caller) asking for a billion steps or a million pixels a side
    was started: hours of sampling, or an allocation the machine cannot hold."""
    from dreambooth_kit.errors import InvalidInput

    pipe = load_pipeline(str(tiny_model))
    with pytest.raises(InvalidInput, match=said):
        generate(pipe, PROMPT, seed=1, **{"steps": 2, **kw})


# ------------------------------------------------------------------ guidance rescale (v-prediction)


def test_guidance_rescale_changes_the_image_is_recorded_and_is_recreated_from_the_png(tiny_model, tmp_path):
    """The tiny model predicts v: --guidance-rescale 0.7 draws other pixels than 0 at the same seed,
    the PNG says so (infotext and JSON), and --from-png makes the same bytes again."""
    from dreambooth_kit.cli import main

    args = ["generate", "--base", str(tiny_model), "--prompt", PROMPT, "--steps", "3", "--seed", "5"]
    assert main([*args, "--out", str(tmp_path / "off")]) == 0
    assert main([*args, "--guidance-rescale", "0.7", "--out", str(tmp_path / "on")]) == 0
    off, on = tmp_path / "off" / "5.png", tmp_path / "on" / "5.png"
    with Image.open(off) as a, Image.open(on) as b:
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() > 0
        assert "CFG Rescale: 0.7" in b.text["parameters"] and "CFG Rescale" not in a.text["parameters"]
    assert main(["generate", "--from-png", str(on), "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "5.png").read_bytes() == on.read_bytes()


@pytest.mark.parametrize(
    "value, prediction, init, expect",
    [
        (0.7, "epsilon", False, "this model predicts epsilon; guidance rescale corrects v-prediction models"),
        (1.5, "v_prediction", False, "guidance_rescale=1.5 must be in [0, 1]"),
        (0.7, "v_prediction", True, "guidance_rescale=0.7: img2img takes none"),
    ],
)
def test_guidance_rescale_where_it_has_no_meaning_is_refused_with_the_reason(
    tiny_model, value, prediction, init, expect
):
    pipe = load_pipeline(str(tiny_model), prediction_type=prediction)
    init_image = Image.new("RGB", (64, 64), "gray") if init else None
    with pytest.raises(InvalidInput, match=re.escape(expect)):
        generate(pipe, PROMPT, steps=2, guidance_rescale=value, init_image=init_image)

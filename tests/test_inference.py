from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from dreambooth_kit.inference import generate, load_pipeline, save_png

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
        ({"steps": 0}, "steps=0 must be >= 1"),
        ({"seeds": [1, 2, 3], "num_images": 2}, "seeds has 3 entries but num_images=2"),
    ],
)
def test_bad_arguments_rejected_before_the_model_runs(pipe, monkeypatch, kwargs, match):
    monkeypatch.setattr(type(pipe), "__call__", lambda *a, **k: pytest.fail("model touched"))
    with pytest.raises(ValueError, match=match):
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
    assert pw.lora and "Lora: lora" in pw.infotext()


def test_missing_lora_path_is_named(tiny_model, tmp_path):
    with pytest.raises(FileNotFoundError, match="LoRA not found: .*nope"):
        load_pipeline(str(tiny_model), lora=tmp_path / "nope")

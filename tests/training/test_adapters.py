"""The diffusers-format LoRA file as other stacks read it: the text encoder's key spelling and the
adapter metadata, written by training and loaded back by our own loader (both spellings)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dreambooth_kit.config import AdapterConfig
from dreambooth_kit.inference.pipeline import load_pipeline
from dreambooth_kit.training.adapters import add_lora, lora_metadata

PROMPT = "a photo of zwx toy"

# LoraConfig's dataclass fields in peft 0.17.1, our lowest peft (read from an install of that
# release). diffusers >= 0.34 calls LoraConfig(**metadata), which fails on any other name.
PEFT_0_17_FIELDS = set(
    "alpha_pattern auto_mapping base_model_name_or_path bias corda_config eva_config exclude_modules "
    "fan_in_fan_out inference_mode init_lora_weights layer_replication layers_pattern layers_to_transform "
    "loftq_config lora_alpha lora_bias lora_dropout megatron_config megatron_core modules_to_save peft_type "
    "qalora_group_size r rank_pattern revision runtime_config target_modules target_parameters task_type "
    "trainable_token_indices use_dora use_qalora use_rslora".split()
)


def _embed(pipe, prompt=PROMPT):
    tok = pipe.tokenizer
    ids = tok(prompt, padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids.to(pipe.text_encoder.device))[0]


@pytest.fixture(scope="module")
def te_lora(tiny_model, tmp_path_factory):
    """A UNet + text-encoder LoRA (r=4, alpha=8, random B so it is not a no-op) written as training
    writes it (outputs.write_lora), with the text encoder's output while the LoRA was in memory."""
    from diffusers import StableDiffusionPipeline

    from dreambooth_kit.training.outputs import write_lora

    cfg = AdapterConfig(rank=4, alpha=8, init_lora_weights=False, train_text_encoder=True)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None)
    base = _embed(pipe)
    torch.manual_seed(0)
    add_lora(pipe.unet, pipe.text_encoder, cfg)
    folder = write_lora(cfg, {}, pipe.unet, pipe.text_encoder, tmp_path_factory.mktemp("te") / "lora")
    return {"file": folder / "pytorch_lora_weights.safetensors", "trained": _embed(pipe), "base": base}


def test_text_encoder_keys_are_spelled_with_text_model_and_load_back(te_lora, tiny_model):
    """transformers 5 saves CLIPTextModel without its ``text_model.`` level; our file puts it back
    (diffusers 0.32 + transformers 4.54 raised IndexError on the flat spelling, 0.39 + 4.57 failed
    too) and our locked stack still reads it: the text encoder's output is the trained one."""
    sd = load_file(te_lora["file"])
    te_keys = [k for k in sd if k.startswith("text_encoder.")]
    assert te_keys and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in te_keys)
    pipe = load_pipeline(str(tiny_model), lora=te_lora["file"], device="cpu")
    assert (_embed(pipe) - te_lora["base"]).abs().max() > 1e-2  # the text-encoder half acts
    assert torch.allclose(_embed(pipe), te_lora["trained"], atol=1e-5)


def test_a_lora_written_before_the_respelling_still_loads_the_same(te_lora, tiny_model, tmp_path):
    """Files from earlier versions spell ``text_encoder.encoder.layers…``: our loader and the kohya
    export read them as before."""
    from dreambooth_kit.export.kohya import ExportLabels, export_kohya

    with safe_open(str(te_lora["file"]), framework="pt") as f:
        meta = f.metadata()
    old = {
        k.replace("text_encoder.text_model.", "text_encoder."): v
        for k, v in load_file(te_lora["file"]).items()
    }
    old_file = tmp_path / "old" / "pytorch_lora_weights.safetensors"
    old_file.parent.mkdir()
    save_file(old, str(old_file), metadata=meta)
    pipe = load_pipeline(str(tiny_model), lora=old_file, device="cpu")
    assert torch.allclose(_embed(pipe), te_lora["trained"], atol=1e-5)
    k_old = load_file(export_kohya(old_file, tmp_path / "old.safetensors", labels=ExportLabels()))
    k_new = load_file(export_kohya(te_lora["file"], tmp_path / "new.safetensors", labels=ExportLabels()))
    assert k_old.keys() == k_new.keys() and all(torch.equal(k_old[k], k_new[k]) for k in k_old)


def test_adapter_metadata_names_only_fields_our_lowest_peft_knows(te_lora):
    """peft 0.21's LoraConfig.to_dict() has 9 fields peft 0.17 lacks: diffusers 0.39 + peft 0.17.1 then
    refused our file ("LoraConfig class could not be instantiated"). What is kept rebuilds the same
    LoraConfig with the installed peft, alpha included (the scale a reload depends on)."""
    import json

    from peft import LoraConfig

    from dreambooth_kit.training.adapters import lora_config

    cfg = AdapterConfig(rank=4, alpha=8, dropout=0.1, init_lora_weights="gaussian")
    for te in (False, True):
        meta = lora_metadata(cfg, text_encoder=te)
        assert set(meta) <= PEFT_0_17_FIELDS
        rebuilt, made = LoraConfig(**meta), lora_config(cfg, text_encoder=te)
        for f in ("r", "lora_alpha", "lora_dropout", "init_lora_weights", "target_modules"):
            assert getattr(rebuilt, f) == getattr(made, f), f
        # The fields left out are at the installed peft's defaults, so nothing that shapes the LoRA is lost.
        default = LoraConfig()
        for f in dataclasses.fields(LoraConfig):
            if f.name not in meta and f.name not in ("peft_type", "task_type"):
                assert getattr(made, f.name) == getattr(default, f.name), f.name
    with safe_open(str(te_lora["file"]), framework="pt") as f:
        stored = json.loads(f.metadata()["lora_adapter_metadata"])
    assert {k.split(".", 1)[1] for k in stored} <= PEFT_0_17_FIELDS
    assert {k.split(".", 1)[0] for k in stored} == {"unet", "text_encoder"}

"""The built-in tiny SD2-shaped model: deterministic, SD 2.1's traits, a code-built CLIP tokenizer,
safe reuse of an existing build, and loadable through the same path as a real model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_kit.models.tiny import (
    TINY_RESOLUTION,
    build_tiny_sd2,
    build_tiny_tokenizer,
    tiny_tokenizer_files,
)

WEIGHT_FILES = (
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
)


def _config(model: Path, sub: str) -> dict:
    name = "scheduler_config.json" if sub == "scheduler" else "config.json"
    return json.loads((model / sub / name).read_text())


def _tensors(model: Path) -> dict[str, torch.Tensor]:
    out = {}
    for rel in WEIGHT_FILES:
        for k, v in load_file(model / rel).items():
            out[f"{rel}:{k}"] = v
    return out


# ------------------------------------------------------------------ layout and determinism


def test_build_writes_a_complete_diffusers_folder(tiny_model):
    assert tiny_model.is_dir()
    index = json.loads((tiny_model / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for comp in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert comp in index, comp
    for rel in WEIGHT_FILES:
        assert (tiny_model / rel).is_file(), rel
    assert not list(tiny_model.rglob("*.bin")), "weights must be safetensors only"
    assert (tiny_model / "tokenizer" / "tokenizer_config.json").is_file()
    assert json.loads((tiny_model / "dreambooth_kit_tiny.json").read_text())["seed"] == 0
    # Built in a temp folder and renamed: nothing left beside it.
    assert not list(tiny_model.parent.glob(".tmp-*"))


def test_same_seed_is_bit_identical_and_other_seed_differs(tmp_path, tiny_model):
    again = build_tiny_sd2(tmp_path / "again", seed=0)
    other = build_tiny_sd2(tmp_path / "other", seed=1)
    ref, same, diff = _tensors(tiny_model), _tensors(again), _tensors(other)
    assert len(ref) > 50
    assert ref.keys() == same.keys() == diff.keys()
    for k in ref:
        assert ref[k].dtype == same[k].dtype == torch.float32, k
        assert torch.equal(ref[k], same[k]), f"seed 0 builds differ at {k}"
    # Every randomly initialised tensor changes with the seed (norm weights/biases are constants).
    changed = [k for k in ref if not torch.equal(ref[k], diff[k])]
    assert len(changed) > len(ref) // 3
    for comp in ("unet/", "vae/", "text_encoder/"):
        assert any(k.startswith(comp) for k in changed), comp
    for rel in WEIGHT_FILES:
        assert (tiny_model / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_build_leaves_the_callers_rng_alone(tmp_path):
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    expected_next = torch.rand(5)
    torch.random.set_rng_state(state)
    build_tiny_sd2(tmp_path / "m", seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(torch.rand(5), expected_next)


# ------------------------------------------------------------------ SD 2.1 traits


def test_unet_has_sd21_traits(tiny_model):
    unet = _config(tiny_model, "unet")
    text = _config(tiny_model, "text_encoder")
    assert unet["use_linear_projection"] is True
    assert unet["upcast_attention"] is True
    assert isinstance(unet["attention_head_dim"], list)
    assert len(unet["attention_head_dim"]) == len(unet["down_block_types"]) == 2
    assert unet["attention_head_dim"] == [2, 4]
    assert unet["cross_attention_dim"] == text["hidden_size"] == 32
    assert unet["in_channels"] == unet["out_channels"] == 4
    assert unet["sample_size"] * 8 == TINY_RESOLUTION


def test_text_encoder_is_openclip_like(tiny_model):
    text = _config(tiny_model, "text_encoder")
    assert text["hidden_act"] == "gelu"  # not SD 1.x's quick_gelu
    assert text["max_position_embeddings"] == 77
    assert text["architectures"] == ["CLIPTextModel"]
    tok = build_tiny_tokenizer()
    assert text["vocab_size"] == len(tok)
    assert text["bos_token_id"] == tok.bos_token_id
    assert text["eos_token_id"] == tok.eos_token_id
    assert text["pad_token_id"] == 0


def test_scheduler_is_sd21(tiny_model):
    sched = _config(tiny_model, "scheduler")
    assert sched["_class_name"] == "DDPMScheduler"
    assert sched["prediction_type"] == "v_prediction"
    assert sched["beta_schedule"] == "scaled_linear"
    assert sched["beta_start"] == 0.00085
    assert sched["beta_end"] == 0.012
    assert sched["num_train_timesteps"] == 1000
    assert sched["clip_sample"] is False
    assert sched["steps_offset"] == 1


def test_vae_matches_sd(tiny_model):
    vae = _config(tiny_model, "vae")
    assert vae["latent_channels"] == 4
    assert vae["scaling_factor"] == 0.18215
    assert vae["sample_size"] == TINY_RESOLUTION


# ------------------------------------------------------------------ tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.mark.parametrize("word", ["photo", "zwx", "dog", "sks", "ohwx", "a", "portrait"])
def test_known_words_are_single_tokens(tok, word):
    pieces = tok.tokenize(word)
    assert pieces == [word + "</w>"]
    assert tok.convert_tokens_to_ids(pieces)[0] != tok.unk_token_id


def test_unknown_words_split_into_byte_pieces(tok):
    assert tok.tokenize("qzxv") == ["q", "z", "x", "v</w>"]
    # Nothing is ever unknown: every byte has a token.
    for word in ("qzxv", "Ünïcødé", "🙂", "xylophone"):
        ids = tok.convert_tokens_to_ids(tok.tokenize(word))
        assert len(ids) >= 1
        assert tok.unk_token_id not in ids, word
        assert tok.decode(ids) == word.lower()


def test_prompt_tokenizes_like_clip(tok):
    ids = tok("a photo of zwx dog").input_ids
    words = ["a</w>", "photo</w>", "of</w>", "zwx</w>", "dog</w>"]
    assert ids == [tok.bos_token_id, *tok.convert_tokens_to_ids(words), tok.eos_token_id]
    assert tok.bos_token == "<|startoftext|>" and tok.eos_token == "<|endoftext|>"
    assert tok.model_max_length == 77


def test_pad_token_is_bang_id_0_as_in_sd2(tok):
    assert tok.pad_token == "!"
    assert tok.pad_token_id == 0
    ids = tok("a dog", padding="max_length", max_length=8).input_ids
    assert (
        ids
        == [tok.bos_token_id, *tok.convert_tokens_to_ids(["a</w>", "dog</w>"]), tok.eos_token_id] + [0] * 4
    )


def test_tokenizer_files_are_deterministic():
    vocab1, merges1 = tiny_tokenizer_files()
    vocab2, merges2 = tiny_tokenizer_files()
    assert vocab1 == vocab2 and merges1 == merges2
    assert sorted(vocab1.values()) == list(range(len(vocab1)))  # dense ids
    assert vocab1["!"] == 0
    assert vocab1["<|startoftext|>"] == len(vocab1) - 2
    assert vocab1["<|endoftext|>"] == len(vocab1) - 1


def test_saved_tokenizer_equals_built_one(tiny_model, tok):
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")
    prompt = "a photo of zwx dog, qzxv style"
    assert saved(prompt).input_ids == tok(prompt).input_ids
    assert saved.pad_token == "!" and saved.pad_token_id == 0


# ------------------------------------------------------------------ reuse and refusal


def test_existing_build_is_reused(tiny_model):
    unet = tiny_model / WEIGHT_FILES[0]
    before = unet.stat()
    assert build_tiny_sd2(tiny_model) == tiny_model
    after = unet.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_foreign_folder_is_refused_and_left_alone(tmp_path):
    mine = tmp_path / "my-model"
    mine.mkdir()
    (mine / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError) as exc:
        build_tiny_sd2(mine)
    msg = str(exc.value)
    assert msg.startswith(f"{mine} exists and is not ")
    assert msg.endswith("; pass overwrite=True or another path")
    assert [p.name for p in mine.iterdir()] == ["precious.txt"]
    assert (mine / "precious.txt").read_text() == "keep me"
    assert not list(tmp_path.glob(".tmp-*"))
    # Only when asked is it replaced.
    assert build_tiny_sd2(mine, overwrite=True) == mine
    assert not (mine / "precious.txt").exists()
    assert (mine / "model_index.json").is_file()


def test_own_build_with_other_settings_is_rebuilt_not_reused(tmp_path):
    # Never on the shared tiny_model: this replaces the folder.
    path = build_tiny_sd2(tmp_path / "m", seed=0)
    seed0 = (path / WEIGHT_FILES[0]).read_bytes()
    assert build_tiny_sd2(path, seed=1) == path
    assert json.loads((path / "dreambooth_kit_tiny.json").read_text())["seed"] == 1
    assert (path / WEIGHT_FILES[0]).read_bytes() != seed0
    build_tiny_sd2(path, seed=1, prediction_type="epsilon")
    assert _config(path, "scheduler")["prediction_type"] == "epsilon"
    assert not list(tmp_path.glob(".tmp-*"))


# ------------------------------------------------------------------ loading


def test_loads_through_load_components(tiny_model):
    from dreambooth_kit.config import ModelConfig
    from dreambooth_kit.models.source import load_components

    comps = load_components(ModelConfig(pretrained=str(tiny_model)))
    assert comps.prediction_type == "v_prediction"
    assert comps.source == str(tiny_model.resolve())
    assert comps.unet.config.upcast_attention is True
    assert comps.unet.config.use_linear_projection is True
    assert comps.text_encoder.config.hidden_act == "gelu"
    assert comps.tokenizer.pad_token == "!"
    for m in (comps.unet, comps.vae, comps.text_encoder):
        assert next(m.parameters()).dtype == torch.float32
        assert not any(p.requires_grad for p in m.parameters())
    # The loaded weights are the saved ones.
    saved = load_file(tiny_model / WEIGHT_FILES[0])
    state = comps.unet.state_dict()
    assert saved.keys() == state.keys()
    assert all(torch.equal(saved[k], state[k]) for k in saved)
    # A forward pass has the SD shapes: 4-channel latents in, same shape out.
    latents = torch.zeros(1, 4, 8, 8)
    cond = comps.text_encoder(comps.tokenizer(["a photo of zwx dog"], return_tensors="pt").input_ids)[0]
    assert cond.shape[-1] == comps.unet.config.cross_attention_dim
    with torch.no_grad():
        out = comps.unet(latents, torch.tensor([10]), encoder_hidden_states=cond).sample
    assert out.shape == latents.shape


def test_prediction_type_override_keeps_the_betas(tiny_model):
    from dreambooth_kit.config import ModelConfig
    from dreambooth_kit.models.source import load_components

    v = load_components(ModelConfig(pretrained=str(tiny_model))).noise_scheduler
    eps = load_components(ModelConfig(pretrained=str(tiny_model), prediction_type="epsilon")).noise_scheduler
    assert eps.config.prediction_type == "epsilon"
    assert torch.equal(v.betas, eps.betas)


def test_epsilon_build_loads_as_epsilon(tmp_path):
    from dreambooth_kit.config import ModelConfig
    from dreambooth_kit.models.source import load_components

    path = build_tiny_sd2(tmp_path / "eps", prediction_type="epsilon")
    assert _config(path, "scheduler")["prediction_type"] == "epsilon"
    assert load_components(ModelConfig(pretrained=str(path))).prediction_type == "epsilon"

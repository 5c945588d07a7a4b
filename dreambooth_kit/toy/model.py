"""``builtin:toy-sd2``: the SD 2.1 architecture family at toy size, pretrained on the toy world.

The same component types and SD 2.x traits as ``builtin:tiny-sd2`` (AutoencoderKL, a
UNet2DConditionModel with per-block heads, ``use_linear_projection`` and ``upcast_attention``, a gelu
CLIPTextModel whose last hidden state conditions the UNet, SD 2.1's betas, v-prediction), sized for
32 px images: the VAE downsamples 4x (8x8x4 latents) instead of SD's 8x, since 4x4 latents would
leave no room for position. The trained weights ship in ``dreambooth_kit/toy/weights`` (made by
``python -m dreambooth_kit.toy.pretrain``) and are assembled into a diffusers folder in the cache,
which every entry point loads like any other model.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

from dreambooth_kit.config import TOY_MODEL  # noqa: F401  (re-exported: the name users write)
from dreambooth_kit.models.sd21 import SD21_SCHEDULER
from dreambooth_kit.models.tiny import build_tiny_tokenizer, write_pipeline_folder
from dreambooth_kit.toy.world import RESOLUTION, WORDS
from dreambooth_kit.util.cache_dir import cache_root

COMPONENTS = ("unet", "vae", "text_encoder")


def toy_tokenizer():
    return build_tiny_tokenizer(WORDS)


def toy_component_configs(vocab_size: int) -> dict[str, dict]:
    unet = {
        "sample_size": RESOLUTION // 4,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [64, 128],
        "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 64,
        "attention_head_dim": [2, 4],  # SD 2.x: heads per block
        "use_linear_projection": True,
        "upcast_attention": True,
        "norm_num_groups": 32,
    }
    vae = {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": [32, 64, 64],  # 3 blocks: 2 downsamples, 32 px -> 8x8 latents
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "layers_per_block": 1,
        "norm_num_groups": 32,
        "sample_size": RESOLUTION,
        "scaling_factor": 1.0,  # set from the trained VAE's latent spread (SD's 0.18215 is 1/std too)
    }
    text = {
        "vocab_size": vocab_size,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "projection_dim": 64,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": 0,
    }
    return {"unet": unet, "vae": vae, "text_encoder": text}


def new_components(seed: int = 0):
    """Randomly initialised (tokenizer, text_encoder, vae, unet, scheduler): the pretraining start."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = toy_tokenizer()
    cfgs = toy_component_configs(len(tokenizer))
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfgs["text_encoder"]))
        vae = AutoencoderKL(**cfgs["vae"])
        unet = UNet2DConditionModel(**cfgs["unet"])
    finally:
        torch.random.set_rng_state(state)
    scheduler = DDPMScheduler(**SD21_SCHEDULER, prediction_type="v_prediction")
    return tokenizer, text_encoder, vae, unet, scheduler


def shipped_weights() -> Path:
    return Path(str(resources.files("dreambooth_kit") / "toy" / "weights"))


def build_toy_sd2(path: str | Path | None = None, weights: str | Path | None = None) -> Path:
    """Assemble the pretrained toy model into a diffusers folder (once; reused while the weights'
    record is unchanged). ``weights`` defaults to the shipped ones."""
    from safetensors.torch import load_file

    weights = Path(weights) if weights else shipped_weights()
    path = Path(path) if path else cache_root() / "toy-sd2"
    record = weights / "record.json"
    if not record.is_file():
        raise FileNotFoundError(
            f"{weights}: no pretrained toy model (record.json); run python -m dreambooth_kit.toy.pretrain"
        )
    stamp = path / "dreambooth_kit_toy.json"
    if stamp.is_file() and stamp.read_text() == record.read_text():
        return path
    tokenizer, text_encoder, vae, unet, scheduler = new_components()
    meta = json.loads(record.read_text())
    vae.register_to_config(scaling_factor=float(meta["scaling_factor"]))
    for name, model in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        model.load_state_dict({k: v.float() for k, v in load_file(weights / f"{name}.safetensors").items()})
    components = (tokenizer, text_encoder, vae, unet, scheduler)
    write_pipeline_folder(path, components, stamp.name, record.read_text())
    return path


def sample(
    model: str | Path,
    prompts: list[str],
    *,
    per_combo: int = 4,
    seed: int = 0,
    steps: int = 20,
    guidance: float = 4.0,
    lora=None,
) -> list:
    """``per_combo`` images per prompt (seeds seed..seed+per_combo-1), DPM-Solver++ 2M."""
    from dreambooth_kit.inference.generate import generate
    from dreambooth_kit.inference.pipeline import load_pipeline

    pipe = load_pipeline(str(model), lora=lora, scheduler="dpmpp_2m", dtype="fp32", device="cpu")
    images = []
    for p in prompts:
        images += [
            r.image
            for r in generate(
                pipe,
                p,
                seed=seed,
                num_images=per_combo,
                steps=steps,
                guidance_scale=guidance,
                height=32,
                width=32,
                batch_size=per_combo,
            )
        ]
    return images

"""Stable Diffusion 2.1's own numbers: its noise schedule and its components' shapes.

The tiny and toy models copy the schedule (so v-prediction behaves as on the real model), single-file
conversion and the benchmarks use the shapes (2-1-base at 512 px, 2-1 at 768 px).
"""

from __future__ import annotations

# SD 2.1's noise schedule (scheduler_config.json of stable-diffusion-2-1).
SD21_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "steps_offset": 1,
}


def sd21_component_configs(vocab_size: int, *, native: int = 512) -> dict[str, dict]:
    """The real SD 2.1 shapes (2-1-base at 512, 2-1 at 768): for benchmarks with random weights."""
    unet = {
        "sample_size": native // 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "cross_attention_dim": 1024,
        "attention_head_dim": [5, 10, 20, 20],
        "use_linear_projection": True,
        "upcast_attention": native >= 768,  # only the 768-v model sets it
        "norm_num_groups": 32,
    }
    vae = {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": native,
        "scaling_factor": 0.18215,
    }
    text = {
        "vocab_size": max(vocab_size, 49408),
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 23,  # OpenCLIP ViT-H's 24 minus the last: the penultimate layer
        "num_attention_heads": 16,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "projection_dim": 512,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": 0,
    }
    return {"unet": unet, "vae": vae, "text_encoder": text}

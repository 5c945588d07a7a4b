"""The offline model: a complete diffusers pipeline with random weights shaped like SD 2.1.

Our machines and CI have no GPU and no model hub, so the demo, tests and benchmarks need a model built
locally. It carries every SD 2.1 trait that changes code paths: per-block attention heads,
``use_linear_projection``, ``upcast_attention``, an OpenCLIP-style ``gelu`` text encoder whose last
hidden state is the conditioning (no clip-skip), SD 2.1's beta schedule and ``v_prediction``.
It is written to disk and loaded back through :func:`dreambooth_kit.models.source.load_components`, the same
path a real model takes.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dreambooth_kit.models.sd21 import SD21_SCHEDULER, sd21_component_configs
from dreambooth_kit.util.atomic import writing_folder
from dreambooth_kit.util.cache_dir import cache_root

TINY_RESOLUTION = 64  # 64 px images -> 8x8 latents: a training step takes ~0.05 s on 2 CPU cores

# Words that become single tokens in the tiny vocabulary. The rest of any prompt falls back to
# byte-level pieces, exactly like CLIP's BPE does for words it has not seen.
_WORDS = (
    "a an the of in on at with and or by to for from is photo picture portrait image painting drawing "
    "render dog cat person man woman toy robot car house tree flower sky beach city forest mountain "
    "red blue green yellow black white small big cute high quality detailed blurry ugly bad lowres "
    "style standing sitting sleeping running looking close up shot background studio light "
    "zwx sks ohwx"
).split()


def _bytes_to_unicode() -> dict[int, str]:
    # CLIP's byte-level alphabet: printable bytes map to themselves, the rest to code points >= 256,
    # so every byte sequence has a token and no prompt is ever "unknown".
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _apply_bpe(pieces: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    # CLIP's rule: repeatedly merge the adjacent pair with the lowest merge rank.
    while len(pieces) > 1:
        pairs = [
            (ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:], strict=False))
        ]
        rank, i = min(pairs)
        if rank == 1 << 30:
            break
        pieces = pieces[:i] + [pieces[i] + pieces[i + 1]] + pieces[i + 2 :]
    return pieces


def tiny_tokenizer_files(words: tuple[str, ...] = _WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP BPE vocabulary and merge list built in code (no download).

    Each word first goes through the merges learnt so far, then new merges join whatever pieces are
    left, left to right. New merges rank after all earlier ones, so words already made whole stay whole.
    """
    alphabet = list(_bytes_to_unicode().values())
    vocab_list = alphabet + [c + "</w>" for c in alphabet]
    seen = set(vocab_list)
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        pieces = _apply_bpe(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks.setdefault(pair, len(ranks))
            merged = pieces[0] + pieces[1]
            if merged not in seen:
                seen.add(merged)
                vocab_list.append(merged)
            pieces = [merged] + pieces[2:]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    merges = sorted(ranks, key=ranks.__getitem__)
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def build_tiny_tokenizer(words: tuple[str, ...] = _WORDS):
    """The tiny CLIP tokenizer; ``words`` become single tokens (the toy model passes its world's)."""
    from transformers import CLIPTokenizer

    vocab, merges = tiny_tokenizer_files(words)
    # SD 2.x pads with "!" (id 0), not with <|endoftext|> as SD 1.x does; keep that trait.
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!", model_max_length=77)


def tiny_component_configs(vocab_size: int) -> dict[str, dict]:
    unet = {
        "sample_size": TINY_RESOLUTION // 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "cross_attention_dim": 32,
        "attention_head_dim": [2, 4],  # SD 2.x: heads per block, [5, 10, 20, 20] at full size
        "use_linear_projection": True,
        "upcast_attention": True,
        "norm_num_groups": 32,
    }
    vae = {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        # 4 blocks like SD's VAE: 3 downsamples, so latents are 1/8 of the image (64 px -> 8x8).
        "block_out_channels": [32, 32, 64, 64],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "layers_per_block": 1,
        "norm_num_groups": 32,
        "sample_size": TINY_RESOLUTION,
        "scaling_factor": 0.18215,
    }
    text = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",  # OpenCLIP ViT-H uses gelu; SD 1.x's CLIP-L uses quick_gelu
        "projection_dim": 32,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": 0,
    }
    return {"unet": unet, "vae": vae, "text_encoder": text}


SHAPES = {"tiny": tiny_component_configs, "sd21-base": sd21_component_configs}


def _fingerprint(seed: int, prediction_type: str, shape: str) -> str:
    # Bump "version" whenever the shapes change, so a stale cached build is not reused.
    return json.dumps(
        {
            "builder": "build_tiny_sd2",
            "version": 2,
            "seed": seed,
            "prediction": prediction_type,
            "shape": shape,
        }
    )


def build_tiny_sd2(
    path: str | Path,
    *,
    seed: int = 0,
    prediction_type: str = "v_prediction",
    overwrite: bool = False,
    shape: str = "tiny",
) -> Path:
    """Write a complete diffusers-format SD2-shaped pipeline with random weights to ``path``.

    ``shape="sd21-base"`` writes SD 2.1-base's real sizes instead (~5.2 GB in fp32; benchmarks).

    Deterministic: the same ``seed`` gives bit-identical weights. Reuses an existing build with the
    same fingerprint (the demo calls this every run). Written to a temp folder and renamed, so an
    interrupted build never leaves a half model that later loads.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    path = Path(path)
    stamp = path / "dreambooth_kit_tiny.json"
    if path.exists() and not overwrite:
        if stamp.exists() and stamp.read_text() == _fingerprint(seed, prediction_type, shape):
            return path
        if not stamp.exists():  # someone else's folder: never replaced without being asked
            raise FileExistsError(
                f"{path} exists and is not a tiny model build; pass overwrite=True or another path"
            )
        # else: our own build with other settings or an older layout -> rebuilt below

    tokenizer = build_tiny_tokenizer()
    if shape not in SHAPES:
        raise ValueError(f"shape {shape!r}: use one of {', '.join(SHAPES)}")
    cfgs = SHAPES[shape](len(tokenizer))
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**cfgs["unet"])
        vae = AutoencoderKL(**cfgs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfgs["text_encoder"]))
    finally:
        torch.random.set_rng_state(gen_state)  # building a model must not shift the caller's RNG
    scheduler = DDPMScheduler(**SD21_SCHEDULER, prediction_type=prediction_type)
    components = (tokenizer, text_encoder, vae, unet, scheduler)
    write_pipeline_folder(path, components, stamp.name, _fingerprint(seed, prediction_type, shape))
    return path


def write_pipeline_folder(path: Path, components: tuple, stamp_name: str, stamp_text: str) -> Path:
    """Save (tokenizer, text_encoder, vae, unet, scheduler) as a diffusers folder at ``path`` with a
    stamp file naming how it was made: written to a temp folder and renamed, so an interrupted build
    never leaves a half model that later loads."""

    from diffusers import StableDiffusionPipeline

    tokenizer, text_encoder, vae, unet, scheduler = components
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    with writing_folder(path) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / stamp_name).write_text(stamp_text)
    return path


def default_tiny_path() -> Path:
    return cache_root() / "tiny-sd2"

"""The key mapping between diffusers' and the original (A1111 / ComfyUI / LDM) layout of SD 2.x weights,
as pure functions over state dicts: UNet, VAE and the OpenCLIP text tower, both directions. The file
I/O around them is singlefile.py."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch

log = logging.getLogger("dreambooth_kit")


UNET_PREFIX = "model.diffusion_model."


VAE_PREFIX = "first_stage_model."


TEXT_PREFIX = "cond_stage_model.model."


SD1_TEXT_PREFIX = "cond_stage_model.transformer."


SD2_TEXT_WIDTH = 1024


SD1_TEXT_WIDTH = 768


TINY_TEXT_WIDTH = 32


# UNet keys outside the down/mid/up blocks: diffusers name -> original name.
UNET_TOP_LEVEL = {
    "time_embedding.linear_1.weight": "time_embed.0.weight",
    "time_embedding.linear_1.bias": "time_embed.0.bias",
    "time_embedding.linear_2.weight": "time_embed.2.weight",
    "time_embedding.linear_2.bias": "time_embed.2.bias",
    "conv_in.weight": "input_blocks.0.0.weight",
    "conv_in.bias": "input_blocks.0.0.bias",
    "conv_norm_out.weight": "out.0.weight",
    "conv_norm_out.bias": "out.0.bias",
    "conv_out.weight": "out.2.weight",
    "conv_out.bias": "out.2.bias",
}


# Inside a UNet ResBlock: diffusers module -> original module (first path component).
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}


# VAE keys outside the blocks.
VAE_TOP_LEVEL = {
    "quant_conv.weight": "quant_conv.weight",
    "quant_conv.bias": "quant_conv.bias",
    "post_quant_conv.weight": "post_quant_conv.weight",
    "post_quant_conv.bias": "post_quant_conv.bias",
    **{
        f"{part}.{d}.{p}": f"{part}.{o}.{p}"
        for part in ("encoder", "decoder")
        for d, o in (("conv_in", "conv_in"), ("conv_out", "conv_out"), ("conv_norm_out", "norm_out"))
        for p in ("weight", "bias")
    },
}


VAE_RESNET = {"conv_shortcut": "nin_shortcut"}  # norm1/conv1/norm2/conv2 keep their names


# VAE mid-block attention: diffusers Linear -> original 1x1 Conv2d (weights get [C, C, 1, 1]).
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


# Text encoder (transformers CLIPTextModel, SD2 = OpenCLIP ViT-H penultimate) -> OpenCLIP names.
TEXT_TOP_LEVEL = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}


TEXT_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


TEXT_SKIP = ("embeddings.position_ids",)  # a buffer, not a weight


def _rename_first(rest: str, table: Mapping[str, str]) -> str:
    for old, new in table.items():
        if rest.startswith(old + "."):
            return new + rest[len(old) :]
    return rest


def _block_counts(keys, name: str) -> tuple[int, int]:
    """(number of down blocks, resnets per down block) read from diffusers UNet/VAE keys."""
    blocks = {int(m.group(1)) for k in keys if (m := re.match(rf"{name}down_blocks\.(\d+)\.", k))}
    res = {int(m.group(1)) for k in keys if (m := re.match(rf"{name}down_blocks\.0\.resnets\.(\d+)\.", k))}
    if not blocks or not res:
        raise ValueError(f"not a diffusers state dict: no {name}down_blocks.*.resnets.* keys")
    return max(blocks) + 1, max(res) + 1


def unet_key_to_original(key: str, *, layers_per_block: int, up_attention_blocks: set[int]) -> str:
    """One diffusers UNet key -> its original (``openaimodel.UNetModel``) name, without prefix."""
    if key in UNET_TOP_LEVEL:
        return UNET_TOP_LEVEL[key]
    n = layers_per_block + 1
    if m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        i, j, rest = int(m[1]), int(m[2]), m[3]
        return f"input_blocks.{n * i + j + 1}.0.{_rename_first(rest, UNET_RESNET)}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"input_blocks.{n * int(m[1]) + int(m[2]) + 1}.1.{m[3]}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{n * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_rename_first(m[2], UNET_RESNET)}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        i, j, rest = int(m[1]), int(m[2]), m[3]
        return f"output_blocks.{n * i + j}.0.{_rename_first(rest, UNET_RESNET)}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"output_blocks.{n * int(m[1]) + int(m[2])}.1.{m[3]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        i = int(m[1])
        # The upsampler follows the block's last ResBlock (and its attention, when the block has one).
        return f"output_blocks.{n * i + layers_per_block}.{2 if i in up_attention_blocks else 1}.conv.{m[2]}"
    raise ValueError(f"UNet key {key!r}: no original-layout name (not an SD 2.x UNet?)")


def vae_key_to_original(key: str, *, num_blocks: int) -> str:
    """One diffusers AutoencoderKL key -> its original (``ldm AutoencoderKL``) name, without prefix."""
    if key in VAE_TOP_LEVEL:
        return VAE_TOP_LEVEL[key]
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{_rename_first(m[3], VAE_RESNET)}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    # The original decoder numbers its up blocks from the lowest resolution backwards.
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"decoder.up.{num_blocks - 1 - int(m[1])}.block.{m[2]}.{_rename_first(m[3], VAE_RESNET)}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        return f"decoder.up.{num_blocks - 1 - int(m[1])}.upsample.{m[2]}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_rename_first(m[3], VAE_RESNET)}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{m[1]}.mid.attn_1.{_rename_first(m[2], VAE_ATTENTION)}"
    raise ValueError(f"VAE key {key!r}: no original-layout name (not an SD AutoencoderKL?)")


def unet_to_original(unet_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    _, lpb = _block_counts(unet_sd, "")
    up_attn = {int(m[1]) for k in unet_sd if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for k, v in unet_sd.items():
        out[UNET_PREFIX + unet_key_to_original(k, layers_per_block=lpb, up_attention_blocks=up_attn)] = v
    return out


def vae_to_original(vae_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    num_blocks, _ = _block_counts(vae_sd, "encoder.")
    out = {}
    for k, v in vae_sd.items():
        new = vae_key_to_original(k, num_blocks=num_blocks)
        if ".mid.attn_1." in new and new.endswith(".weight") and v.ndim == 2:
            v = v.reshape(*v.shape, 1, 1)  # Linear [C, C] -> 1x1 conv [C, C, 1, 1]
        out[VAE_PREFIX + new] = v
    return out


def text_encoder_to_original(text_sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' CLIPTextModel (flattened in transformers 5, or with ``text_model.``) -> OpenCLIP keys.

    q/k/v become OpenCLIP's fused ``attn.in_proj_weight``/``in_proj_bias`` = cat(q, k, v)."""
    sd = {k.removeprefix("text_model."): v for k, v in text_sd.items()}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for k, v in sd.items():
        if k in TEXT_SKIP:
            continue
        if k in TEXT_TOP_LEVEL:
            out[TEXT_PREFIX + TEXT_TOP_LEVEL[k]] = v
            continue
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)", k)
        if not m:
            raise ValueError(f"text encoder key {k!r}: no OpenCLIP name (not a CLIP text model?)")
        i, rest = int(m[1]), m[2]
        if pm := re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest):
            qkv.setdefault((i, pm[2]), {})[pm[1]] = v
            continue
        new = _rename_first(rest, TEXT_LAYER)
        if new == rest:
            raise ValueError(f"text encoder key {k!r}: no OpenCLIP name")
        out[f"{TEXT_PREFIX}transformer.resblocks.{i}.{new}"] = v
    for (i, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"text encoder layer {i}: incomplete q/k/v {kind} ({sorted(parts)})")
        name = "in_proj_weight" if kind == "weight" else "in_proj_bias"
        out[f"{TEXT_PREFIX}transformer.resblocks.{i}.attn.{name}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0
        )
    return out


def to_original_layout(
    unet_sd: Mapping[str, torch.Tensor],
    vae_sd: Mapping[str, torch.Tensor],
    text_encoder_sd: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """diffusers UNet/VAE/SD2 text-encoder state dicts -> one original-layout (A1111) state dict.

    ``model.diffusion_model.*``, ``first_stage_model.*`` and ``cond_stage_model.model.*`` (OpenCLIP).
    Pure: the inputs are not modified; tensors are shared, not copied (except fused q/k/v and reshapes).
    """
    out = unet_to_original(unet_sd)
    out.update(vae_to_original(vae_sd))
    out.update(text_encoder_to_original(text_encoder_sd))
    n = len(unet_sd) + len(vae_sd) + len([k for k in text_encoder_sd if not k.endswith("position_ids")])
    n -= 2 * sum(1 for k in text_encoder_sd if re.search(r"self_attn\.[qkv]_proj", k)) // 3
    if len(out) != n:  # two diffusers keys mapped onto one original key: a table bug, never silent
        raise AssertionError(f"original-layout conversion lost keys: {n} expected, {len(out)} written")
    return out


# The OpenCLIP keys diffusers' SD 2.x text encoder has no counterpart for. SD 2.x conditions on the
# *penultimate* layer of OpenCLIP ViT-H (ldm's FrozenOpenCLIPEmbedder, layer="penultimate": it stops one
# block early and applies ln_final), so diffusers keeps 23 of its 24 blocks and drops the last one,
# text_projection (for the pooled CLIP embedding) and logit_scale (for CLIP's image-text scores). SD 2.x
# generation never uses any of them, but the original checkpoints carry them and loaders build the whole
# tower: ComfyUI's SD2 text model has 24 blocks plus text_projection and warns "clip missing" for each
# absent key, A1111 leaves them at open_clip's random init. So the single file carries them too.
# CLIP clamps its learnt temperature at 100 (logit_scale = ln 100); trained ViT-H/14 towers hold that value.
CLIP_LOGIT_SCALE = math.log(100.0)


def neutral_text_tower_keys(width: int, ff: int, layer: int) -> dict[str, torch.Tensor]:
    """OpenCLIP's last block as the identity, an identity ``text_projection`` and ``logit_scale`` = ln 100.

    The block is a pre-norm residual block, ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``: with the
    attention's ``out_proj`` and the MLP's ``c_proj`` (weights and biases) at zero, both branches add
    nothing and the block returns its input. A tool that (wrongly) conditions on the last layer then
    gets exactly the penultimate output SD 2.x was trained on, never noise. Used when the base model's
    own tensors are not available (a diffusers folder or hub model has none)."""
    block = f"{TEXT_PREFIX}transformer.resblocks.{layer}."
    shapes = {
        "ln_1.weight": (width,),
        "ln_1.bias": (width,),
        "attn.in_proj_weight": (3 * width, width),
        "attn.in_proj_bias": (3 * width,),
        "attn.out_proj.weight": (width, width),
        "attn.out_proj.bias": (width,),
        "ln_2.weight": (width,),
        "ln_2.bias": (width,),
        "mlp.c_fc.weight": (ff, width),
        "mlp.c_fc.bias": (ff,),
        "mlp.c_proj.weight": (width, ff),
        "mlp.c_proj.bias": (width,),
    }
    out = {
        block + k: (torch.ones if k in ("ln_1.weight", "ln_2.weight") else torch.zeros)(s)
        for k, s in shapes.items()
    }
    out[TEXT_PREFIX + "text_projection"] = torch.eye(width)
    out[TEXT_PREFIX + "logit_scale"] = torch.tensor(CLIP_LOGIT_SCALE)
    return out


def complete_text_tower(
    text_sd: Mapping[str, torch.Tensor], *, width: int, ff: int, base_file: Path | None = None
) -> dict[str, torch.Tensor]:
    """The keys to add to ``text_sd`` (OpenCLIP names, from :func:`text_encoder_to_original`) so the text
    tower is complete: copied from ``base_file`` (the original single file the model came from) when it
    has them with the right shapes, else :func:`neutral_text_tower_keys`. The last block is taken whole
    from one source: half a block from the base and half neutral would be neither."""
    layers = {
        int(m[1])
        for k in text_sd
        if (m := re.match(rf"{re.escape(TEXT_PREFIX)}transformer\.resblocks\.(\d+)\.", k))
    }
    layer = max(layers) + 1 if layers else 0
    neutral = neutral_text_tower_keys(width, ff, layer)
    base: dict[str, torch.Tensor] = {}
    if base_file is not None and Path(base_file).is_file():
        from safetensors import safe_open

        with safe_open(str(base_file), framework="pt") as f:
            have = set(f.keys())  # noqa: SIM118
            for k, v in neutral.items():
                if k in have and tuple(f.get_slice(k).get_shape()) == tuple(v.shape):
                    base[k] = f.get_tensor(k)
    block = f"{TEXT_PREFIX}transformer.resblocks.{layer}."
    if not all(k in base for k in neutral if k.startswith(block)):
        base = {k: v for k, v in base.items() if not k.startswith(block)}
    if base:
        log.info("single file: %d OpenCLIP text-tower tensors copied from %s", len(base), base_file)
    return {k: base.get(k, v) for k, v in neutral.items()}

"""The image and text encoders that turn generated images into DreamBooth's numbers.

Two roles, each a config value (``evaluate.subject_encoder``, ``evaluate.prompt_encoder``):

* the **subject encoder** embeds images: subject fidelity, PRES and DIV are cosines of its
  features. DreamBooth's paper uses DINO ViT-S/16 (``facebook/dino-vits16``) because, trained
  self-supervised, it tells two objects of the same class apart, where CLIP maps them together.
* the **prompt encoder** is a CLIP model: CLIP-I (subject fidelity in CLIP's image space) and
  CLIP-T (how well an image matches its prompt). ViT-B/32 by default, L/14 if asked.

Each is a Hub id, a local folder holding a transformers model (loaded with ``from_pretrained``,
never downloaded when ``HF_HUB_OFFLINE=1``), or a name a plugin registered (``toy-judge``: the toy
world's judge, whose features stand in for DINO/CLIP and whose attribute heads stand in for CLIP-T). transformers does
the loading and preprocessing; only the choice of output (DINO's CLS token, CLIP's projections) is
made here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from dreambooth_kit.errors import UserError
from dreambooth_kit.util.registry import lookup, names

_BATCH = 32  # images per encoder forward: 32 x 224 px through ViT-S/B stays under 1 GB


class EncoderError(UserError, OSError):
    """An encoder could not be found or loaded; the message says which and how to get it."""


class ImageEncoder(Protocol):
    name: str

    def image_features(self, images: Sequence) -> torch.Tensor: ...


class PromptEncoder(ImageEncoder, Protocol):
    def prompt_fidelity(self, images: Sequence, prompts: Sequence[str]) -> float | None:
        """Mean agreement of each image with its prompt (None: nothing in the prompts to check)."""


@dataclass
class Encoders:
    subject: ImageEncoder
    prompt: PromptEncoder
    # An encoder that can also count the subject (a `subject_rate(images)` method, as the toy judge
    # has): subject_rate is reported only with one.
    counter: object | None = None

    @property
    def names(self) -> str:
        return f"{self.subject.name} + {self.prompt.name}"


class _HfEncoder:
    """A transformers model and its processor, run on ``images`` in batches of :data:`_BATCH`."""

    def __init__(self, name: str, model, processor, device: str):
        self.name, self.model, self.processor, self.device = name, model.eval().to(device), processor, device

    @torch.no_grad()
    def image_features(self, images: Sequence) -> torch.Tensor:
        out = []
        for i in range(0, len(images), _BATCH):
            px = self.processor(images=list(images[i : i + _BATCH]), return_tensors="pt")["pixel_values"]
            out.append(self._embed(px.to(self.device, self.model.dtype)).float().cpu())
        return torch.cat(out)

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class HubImageEncoder(_HfEncoder):
    """A transformers vision model (DINO, or any ViT): the CLS token of the last layer, as the
    DreamBooth paper's DINO metric uses."""

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]


class ClipEncoder(_HfEncoder):
    """A CLIP model: projected image embeddings (CLIP-I) and image-text cosine (CLIP-T)."""

    def _embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_image_features(pixel_values=pixel_values))

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        t = self.processor(text=list(texts), padding=True, truncation=True, return_tensors="pt")
        return _pooled(self.model.get_text_features(**{k: v.to(self.device) for k, v in t.items()}))

    def prompt_fidelity(self, images: Sequence, prompts: Sequence[str]) -> float:
        """CLIP-T: mean cosine of each image's embedding with its own prompt's (SD in the paper: 0.305)."""
        from dreambooth_kit.evaluation.metrics import mean_paired_cosine

        return mean_paired_cosine(self.image_features(images), self.text_features(prompts))


def _pooled(out) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projection; 4.x a tensor.
    return getattr(out, "pooler_output", out).float().cpu()


def load_encoders(subject: str, prompt: str, *, device: str = "cpu") -> Encoders:
    """Both encoders, or one :class:`EncoderError` naming every one that is missing and how to get it."""
    loaded: dict[str, object] = {}
    missing: list[tuple[str, str, str]] = []
    for key, name, kind in (("subject_encoder", subject, "vision"), ("prompt_encoder", prompt, "clip")):
        plugin = lookup("encoder", name)
        if plugin is not None:
            loaded[key] = plugin.load(device)
            continue
        try:
            loaded[key] = _load_hf(name, kind, device)
        except OSError as e:
            missing.append((key, name, str(e).splitlines()[0] if str(e) else type(e).__name__))
    if missing:
        raise EncoderError(_missing_message(missing))
    counter = next((e for e in loaded.values() if hasattr(e, "subject_rate")), None)
    return Encoders(loaded["subject_encoder"], loaded["prompt_encoder"], counter)  # type: ignore[arg-type]


def _load_hf(name: str, kind: str, device: str):
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoProcessor, CLIPModel

    if kind == "clip" or AutoConfig.from_pretrained(name).model_type == "clip":
        # A CLIP model as the subject encoder is allowed too: its image embeddings are CLIP-I's.
        return ClipEncoder(name, CLIPModel.from_pretrained(name), AutoProcessor.from_pretrained(name), device)
    return HubImageEncoder(
        name, AutoModel.from_pretrained(name), AutoImageProcessor.from_pretrained(name), device
    )


def _missing_message(missing: list[tuple[str, str, str]]) -> str:
    lines = [f"evaluate.{key}={name!r} could not be loaded ({why})" for key, name, why in missing]
    hub = [name for _, name, _ in missing if not name.startswith((".", "/", "~"))]
    get = (
        f"download once where the Hub can be reached: {'; '.join(f'hf download {n}' for n in hub)} "
        "(it lands in the Hugging Face cache that offline runs read); "
        if hub
        else ""
    )
    return (
        "; ".join(lines) + f". To fix: {get}or set the key to a local folder holding the model "
        f"(save_pretrained output), or to a registered encoder ({', '.join(names('encoder')) or 'none'})"
    )

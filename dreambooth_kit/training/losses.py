"""The training loss as pure functions: the UNet's target, min-SNR-γ weights and the DreamBooth
loss with prior preservation. The training step (loop.py) calls them; nothing here holds state."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from dreambooth_kit.errors import InvalidInput

if TYPE_CHECKING:
    from diffusers import DDPMScheduler


def diffusion_target(
    scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet must predict, from the scheduler's ``prediction_type`` (never assumed)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise InvalidInput(
        f"the model's scheduler has prediction_type {kind!r}, which training does not support; set "
        "model.prediction_type to epsilon or v_prediction (the one the model was trained with)"
    )


def snr_weights(
    scheduler: DDPMScheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023) per sample.

    Min-SNR-γ weights the x0-prediction error by min(SNR, γ). The epsilon error is SNR x the x0
    error, so its weight is min(SNR, γ) / SNR; the v error is (SNR + 1) x the x0 error, so its weight
    is min(SNR, γ) / (SNR + 1). Using the epsilon formula for v-prediction would over-weight every
    timestep by (SNR + 1) / SNR: 2x at SNR = 1, ~214x at SD 2.1's noisiest step (SNR 0.0047).
    """
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def diffusion_loss(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    *,
    num_instance: int,
    prior_loss_weight: float = 1.0,
    weights: torch.Tensor | None = None,
    instance_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """MSE loss; with prior preservation the batch is [instance rows | class rows].

    loss = mean(instance MSE) + prior_loss_weight * mean(class MSE), as in the DreamBooth paper.
    ``weights`` (per sample, e.g. min-SNR) scale each sample's MSE. ``instance_weights`` (data.masks:
    num_instance x 1 x H x W, at the image's size) are averaged down to the latent grid and weight
    each latent pixel of the instance rows before the mean, not renormalised (kohya's masked loss): a
    mask of zeros scales the instance loss by the unmasked weight. Computed in fp32.
    """
    err = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    if instance_weights is not None:
        w = torch.ones_like(err[:, :1])
        w[:num_instance] = F.adaptive_avg_pool2d(
            instance_weights.to(err.device, torch.float32), err.shape[-2:]
        )
        err = err * w
    per_sample = err.mean(dim=list(range(1, model_pred.ndim)))
    if weights is not None:
        per_sample = per_sample * weights.float()
    instance = per_sample[:num_instance].mean()
    parts = {"loss_instance": instance.item()}
    loss = instance
    if num_instance < per_sample.shape[0]:
        prior = per_sample[num_instance:].mean()
        loss = instance + prior_loss_weight * prior
        parts["loss_prior"] = prior.item()
    return loss, parts


def teacher_prior_loss(
    student: torch.Tensor, teacher: torch.Tensor, *, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """prior.mode=teacher: mean MSE between the LoRA model's prediction for the class prompt and the
    frozen base model's (the same noisy photo latents and timesteps), in fp32; ``weights`` per
    sample, as for the instance loss. Zero while the LoRA is still a no-op (B = 0 at init)."""
    per_sample = F.mse_loss(student.float(), teacher.float().detach(), reduction="none").mean(
        dim=list(range(1, student.ndim))
    )
    if weights is not None:
        per_sample = per_sample * weights.float()
    return per_sample.mean()

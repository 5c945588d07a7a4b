"""The loss as pure functions: the UNet's target per prediction type, the prior-preservation
loss and min-SNR-γ weights."""

from __future__ import annotations

import pytest
import torch

from dreambooth_kit.training.losses import diffusion_loss, diffusion_target, snr_weights


def _scheduler(prediction_type: str):
    from diffusers import DDPMScheduler

    from dreambooth_kit.models.sd21 import SD21_SCHEDULER

    return DDPMScheduler(**SD21_SCHEDULER, prediction_type=prediction_type)


def test_v_prediction_target_is_velocity():
    s = _scheduler("v_prediction")
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([1, 500, 999])
    target = diffusion_target(s, latents, noise, t)
    assert torch.equal(target, s.get_velocity(latents, noise, t))
    assert not torch.allclose(target, noise)  # it is not the epsilon target in disguise


def test_epsilon_target_is_noise():
    s = _scheduler("epsilon")
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert torch.equal(diffusion_target(s, latents, noise, torch.tensor([3, 700])), noise)


def test_unknown_prediction_type_refused():
    from dreambooth_kit.errors import UserError

    s = _scheduler("sample")
    with pytest.raises(UserError, match="prediction_type 'sample'.*set model.prediction_type"):
        diffusion_target(s, torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8), torch.tensor([1]))


def test_prior_term_is_class_half_only_and_weighted():
    target = torch.zeros(4, 4, 2, 2)
    pred = torch.zeros(4, 4, 2, 2)
    pred[:2] = 1.0  # instance rows: MSE 1
    pred[2:] = 2.0  # class rows: MSE 4
    loss, parts = diffusion_loss(pred, target, num_instance=2, prior_loss_weight=0.5)
    assert parts["loss_instance"] == pytest.approx(1.0)
    assert parts["loss_prior"] == pytest.approx(4.0)
    assert loss.item() == pytest.approx(1.0 + 0.5 * 4.0)
    # Only class rows change the prior part.
    pred2 = pred.clone()
    pred2[0] = 3.0
    _, parts2 = diffusion_loss(pred2, target, num_instance=2, prior_loss_weight=0.5)
    assert parts2["loss_prior"] == pytest.approx(4.0) and parts2["loss_instance"] != parts["loss_instance"]


def test_no_prior_rows_means_instance_loss_only():
    loss, parts = diffusion_loss(
        torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2), num_instance=2, prior_loss_weight=9
    )
    assert loss.item() == pytest.approx(1.0) and "loss_prior" not in parts


def test_min_snr_weights_v_prediction_divides_by_snr_plus_one():
    from diffusers.training_utils import compute_snr

    s = _scheduler("v_prediction")
    t = torch.tensor([10, 500, 990])
    snr = compute_snr(s, t)
    w_v = snr_weights(s, t, 5.0, "v_prediction")
    w_eps = snr_weights(s, t, 5.0, "epsilon")
    assert torch.allclose(w_v, torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + 1))
    assert torch.allclose(w_eps, torch.minimum(snr, torch.full_like(snr, 5.0)) / snr)
    assert (w_v < 1).all()  # at t=990 the epsilon weight is 1, the v weight is SNR/(SNR+1)


def test_teacher_prior_loss_is_the_mse_to_the_frozen_prediction():
    from dreambooth_kit.training.losses import teacher_prior_loss

    teacher = torch.zeros(2, 4, 2, 2)
    student = torch.zeros(2, 4, 2, 2, requires_grad=True)
    assert teacher_prior_loss(student, teacher).item() == 0.0  # an untrained LoRA adds nothing
    moved = student + torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)  # per-sample MSE 1 and 4
    assert teacher_prior_loss(moved, teacher).item() == pytest.approx(2.5)
    assert teacher_prior_loss(moved, teacher, weights=torch.tensor([1.0, 0.0])).item() == pytest.approx(0.5)
    # The gradient reaches the student only: the teacher is a fixed target.
    teacher_live = torch.ones(2, 4, 2, 2, requires_grad=True)
    teacher_prior_loss(moved, teacher_live).backward()
    assert student.grad is not None and teacher_live.grad is None

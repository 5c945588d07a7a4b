"""train.ema: an exponential moving average of the trained weights, kept beside the raw ones.

The average itself is diffusers' ``EMAModel`` (the one its training scripts use): after optimizer
step n it holds ``d * ema + (1 - d) * weights``: step 1 copies the weights, from step 2 on
``d = min(train.ema_decay, n / (n + 9))``. The ramp keeps the first steps from dominating: d is 0.92
at step 100 and 0.989 at 800, so the default cap 0.995 only binds from step 1,791 on.

The average is saved in the shapes the raw weights already have, so that every reader of those works
on it unchanged: in a checkpoint as ``<checkpoint>/ema/`` (checkpoints.py: the LoRA as
``unet_lora.safetensors``, peft keys; a full fine-tune as ``model.safetensors``, as accelerate names
the UNet), which resume reads back and ``evaluate`` scores as the target ``step-NNNNNN-ema``; the
run's result as ``lora_ema/`` or ``pipeline_ema/`` beside ``lora/``/``pipeline/``, written by the same
code (outputs.py). EMAModel's own ``save_pretrained`` writes a whole diffusers model, which no LoRA
reader loads: hence :meth:`TrainedEMA.swapped_in`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class TrainedEMA:
    """The moving average of ``params`` (the trained parameters, in the optimizer's order)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        from diffusers.training_utils import EMAModel

        self.params = params
        self.model = EMAModel(params, decay=decay)

    @property
    def steps(self) -> int:
        return int(self.model.optimization_step)

    def update(self) -> None:
        """After an applied optimizer step (a skipped one leaves the average alone)."""
        self.model.step(self.params)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The average in the model's parameters for the duration (to save it with the code that saves
        the raw weights); the raw weights back afterwards, bit for bit."""
        self.model.store(self.params)
        self.model.copy_to(self.params)
        try:
            yield
        finally:
            self.model.restore(self.params)

    def take_from_model(self, steps: int) -> None:
        """The model's current parameters become the average (a resume: read into the model first)."""
        for shadow, p in zip(self.model.shadow_params, self.params, strict=True):
            shadow.copy_(p.detach())
        self.model.optimization_step = steps

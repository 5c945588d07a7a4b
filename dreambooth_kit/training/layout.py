"""The names inside a run folder (``train.output_dir``), in one place.

Training writes them, resume, exports, ``push`` and the model card read them; a name changed here
changes everywhere.

    <run>/config.yaml          the config the run used (prediction type resolved)
    <run>/model_source.json    the base model, resolved once (models.ModelSource)
    <run>/lora/                the LoRA (adapter.type=lora), with its own config.yaml
    <run>/pipeline/            the full fine-tune's diffusers pipeline (adapter.type=full)
    <run>/lora_ema/            train.ema: the moving average, as lora/ (pipeline_ema/ as pipeline/)
    <run>/checkpoints/step-*/  resumable checkpoints
    <run>/samples/step-*/      validation images
    <run>/export/              kohya / merged / single-file exports
    <run>/logs/                tracker logs (TensorBoard)
    <run>/lineage.json         the run's timeline (lineage.py)
    <run>/abandoned/           what an abandoned timeline made (runfolder.py)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' save_lora_weights default name
CHECKPOINT_EMA = "ema"  # train.ema: <run>/checkpoints/step-*/ema/, the average as the step's weights


@dataclass(frozen=True)
class RunLayout:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def model_source(self) -> Path:
        return self.root / "model_source.json"

    @property
    def lora(self) -> Path:
        return self.root / "lora"

    @property
    def lora_weights(self) -> Path:
        return self.lora / LORA_WEIGHTS

    @property
    def pipeline(self) -> Path:
        return self.root / "pipeline"

    def final(self, adapter_type: str) -> Path:
        """Where the run's result goes: ``lora/`` or, for a full fine-tune, ``pipeline/``."""
        return self.pipeline if adapter_type == "full" else self.lora

    def final_ema(self, adapter_type: str) -> Path:
        """train.ema: where the moving average goes, ``lora_ema/`` or ``pipeline_ema/``."""
        final = self.final(adapter_type)
        return final.with_name(final.name + "_ema")

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def samples(self) -> Path:
        return self.root / "samples"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def kohya_export(self) -> Path:
        """``export/<run>_kohya.safetensors``: the file A1111 users install, and name in a prompt."""
        return self.export / f"{self.root.resolve().name}_kohya.safetensors"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

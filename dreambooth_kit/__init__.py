"""dreambooth_kit: DreamBooth (LoRA) fine-tuning and seeded inference for Stable Diffusion 2.1.

The public API; everything else is internal.
"""

__version__ = "0.1.0"

from .config import DreamBoothConfig, load_config, save_config  # noqa: E402
from .inference import generate, load_pipeline, save_png  # noqa: E402
from .train import train  # noqa: E402
from .versions import warn_at_import  # noqa: E402

warn_at_import()  # one line, now, if transformers and peft cannot train a text-encoder LoRA together

__all__ = [
    "DreamBoothConfig",
    "__version__",
    "generate",
    "load_config",
    "load_pipeline",
    "save_config",
    "save_png",
    "train",
]

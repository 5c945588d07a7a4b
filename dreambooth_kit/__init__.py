"""dreambooth_kit: DreamBooth (LoRA) fine-tuning and seeded inference for Stable Diffusion 2.1.

The public API; everything else is internal. It is what the README and the Colab notebook use: one
name for each step of the workflow (check the photos, configure, train, generate and save seeded
images, read their settings back, export, push), the same steps the ``dreambooth-kit`` subcommands
run. ``dreambooth_kit.toy.world`` (the toy subject's photos for the offline demo) is a public
submodule of its own.
"""

from ._version import __version__
from .config import DreamBoothConfig, load_config, save_config
from .data import check_images
from .export import run_exports
from .hub import push_to_hub
from .inference import generate, load_pipeline, make_grid, read_metadata, save_images, save_png
from .train import train
from .versions import warn_at_import

warn_at_import()  # one line, now, if transformers and peft cannot train a text-encoder LoRA together

__all__ = [
    "DreamBoothConfig",
    "__version__",
    "check_images",
    "generate",
    "load_config",
    "load_pipeline",
    "make_grid",
    "push_to_hub",
    "read_metadata",
    "run_exports",
    "save_config",
    "save_images",
    "save_png",
    "train",
]

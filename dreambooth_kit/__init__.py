"""dreambooth_kit: DreamBooth (LoRA) fine-tuning and seeded inference for Stable Diffusion 2.1.

The public API; everything else is internal. It is what the README, the Colab notebook and the web UI
(``dreambooth_kit.ui``) use: one name for each step of the workflow (check the photos, pick an
identifier, configure, train, score the checkpoints, generate and save seeded images, read their
settings back, export, push), the same steps the ``dreambooth-kit`` subcommands run.
``dreambooth_kit.toy.world`` (the toy subject's photos for the offline demo) is a public
submodule of its own.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from dreambooth_kit._version import __version__
from dreambooth_kit.util.versions import warn_at_import

# Each public name and the module that defines it, imported on first use (PEP 562): the command
# line's `--help`, `check-data` and `class-images` then start without torch and diffusers, which
# take ~2 s to import (`import dreambooth_kit` used to cost 2.2 s here, now 0.01 s).
_PUBLIC = {
    "DreamBoothConfig": "config",
    "load_config": "config",
    "save_config": "config",
    "packaged_configs": "config",
    "check_images": "data.photo_checks",
    "find_identifiers": "data.identifier",
    "evaluate": "evaluation.evaluate",
    "run_exports": "export.run",
    "push_to_hub": "export.hub",
    "generate": "inference.generate",
    "load_pipeline": "inference.pipeline",
    "make_grid": "inference.images",
    "read_metadata": "inference.pngmeta",
    "save_images": "inference.images",
    "save_png": "inference.pngmeta",
    "train": "training.train",
}

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from dreambooth_kit.config import DreamBoothConfig, load_config, packaged_configs, save_config
    from dreambooth_kit.data.identifier import find_identifiers
    from dreambooth_kit.data.photo_checks import check_images
    from dreambooth_kit.evaluation.evaluate import evaluate
    from dreambooth_kit.export.hub import push_to_hub
    from dreambooth_kit.export.run import run_exports
    from dreambooth_kit.inference.generate import generate
    from dreambooth_kit.inference.images import make_grid, save_images
    from dreambooth_kit.inference.pipeline import load_pipeline
    from dreambooth_kit.inference.pngmeta import read_metadata, save_png
    from dreambooth_kit.training.train import train


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'dreambooth_kit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


warn_at_import()  # one line, now, if transformers and peft cannot train a text-encoder LoRA together

__all__ = [  # a literal list, for linters and `from dreambooth_kit import *`; a test checks it equals _PUBLIC
    "DreamBoothConfig",
    "__version__",
    "check_images",
    "evaluate",
    "find_identifiers",
    "generate",
    "load_config",
    "load_pipeline",
    "make_grid",
    "packaged_configs",
    "push_to_hub",
    "read_metadata",
    "run_exports",
    "save_config",
    "save_images",
    "save_png",
    "train",
]

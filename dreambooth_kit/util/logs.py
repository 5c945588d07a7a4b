"""Logging for the two command-line entry points (``dreambooth-kit`` and ``python -m
dreambooth_kit.training.train``): one format, and known noise from other libraries dropped.

Its own module because both entry points need it and train.py must not import cli.py (cli.py imports
train.py).
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

# One level word per line, from the record: messages never carry their own ("WARNING WARNING ...").
LOG_FORMAT = "%(levelname)s %(message)s"


class _DropKnownNoise(logging.Filter):
    """transformers logs "`CLIPImageProcessor` requires torchvision (not installed); falling back
    to ..." (and the same for Siglip) whenever diffusers imports its pipelines. We never use an
    image processor, so on every command these were two lines of noise. Only those messages are
    dropped; every other transformers warning still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(noise in message for noise in _NOISE)


_NOISE = (
    "requires torchvision (not installed); falling back",
    # DeepSpeed, imported by accelerate's save_state wherever it is installed, warns at its first
    # import on a machine without CUDA that it uses the CPU, in the middle of the progress bar.
    "Setting accelerator to CPU",
)


def quiet_known_warnings() -> None:
    for name in ("transformers.utils.import_utils", "DeepSpeed"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownNoise) for f in logger.filters):
            logger.addFilter(_DropKnownNoise())


# accelerate logs five INFO lines per checkpoint save ("Saving current state to ...", one per state
# file) and as many per load; ours says the one thing that matters ("checkpoint saved: <path>").
ACCELERATE_STATE_LOGGERS = ("accelerate.accelerator", "accelerate.checkpointing")


@contextlib.contextmanager
def quieter(*names: str, level: int = logging.WARNING) -> Iterator[None]:
    """Raise the named loggers to ``level`` for the block (warnings and errors still show)."""
    loggers = [logging.getLogger(n) for n in names]
    before = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(level, logger.getEffectiveLevel()))
    try:
        yield
    finally:
        for logger, old in zip(loggers, before, strict=True):
            logger.setLevel(old)


def setup_logging(verbose: bool = False) -> None:
    """INFO (DEBUG with ``verbose``) to stderr in :data:`LOG_FORMAT`, without the known noise."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT, stream=sys.stderr
    )
    quiet_known_warnings()

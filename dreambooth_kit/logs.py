"""Logging for the two command-line entry points (``dreambooth-kit`` and ``python -m
dreambooth_kit.train``): one format, and known noise from other libraries dropped.

Its own module because both entry points need it and train.py must not import cli.py (cli.py imports
train.py).
"""

from __future__ import annotations

import logging
import sys

# One level word per line, from the record: messages never carry their own ("WARNING WARNING ...").
LOG_FORMAT = "%(levelname)s %(message)s"


class _DropKnownNoise(logging.Filter):
    """transformers logs "`CLIPImageProcessor` requires torchvision (not installed); falling back
    to ..." (and the same for Siglip) whenever diffusers imports its pipelines. We never use an
    image processor, so on every command these were two lines of noise. Only those messages are
    dropped; every other transformers warning still shows."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back" not in record.getMessage()


def quiet_known_warnings() -> None:
    logger = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _DropKnownNoise) for f in logger.filters):
        logger.addFilter(_DropKnownNoise())


def setup_logging(verbose: bool = False) -> None:
    """INFO (DEBUG with ``verbose``) to stderr in :data:`LOG_FORMAT`, without the known noise."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, format=LOG_FORMAT, stream=sys.stderr
    )
    quiet_known_warnings()

"""The README's config reference and the code agree in both directions."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

from dreambooth_kit.config import DreamBoothConfig

README = Path(__file__).resolve().parents[1] / "README.md"
SECTIONS = [f.name for f in dataclasses.fields(DreamBoothConfig) if f.name not in ("version", "concepts")]


def _config_keys() -> set[str]:
    hints = typing.get_type_hints(DreamBoothConfig)
    return {f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(hints[s])}


def _readme_keys() -> set[str]:
    pattern = rf"`((?:{'|'.join(SECTIONS)})\.[a-z_0-9]+)"
    return set(re.findall(pattern, README.read_text()))


def test_every_key_the_readme_names_exists():
    unknown = _readme_keys() - _config_keys()
    assert not unknown, f"README names config keys that do not exist: {sorted(unknown)}"


def test_every_config_key_is_documented_in_the_readme():
    missing = _config_keys() - _readme_keys()
    assert not missing, f"config keys missing from the README's reference: {sorted(missing)}"


def test_readme_shows_the_two_commands():
    text = README.read_text()
    assert "make demo" in text and "make test" in text

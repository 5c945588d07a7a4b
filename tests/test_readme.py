"""The README and the pages under docs/ agree with the code: every config key they name exists, the
config reference is what the schema gives, every schema field is documented, and the README stays a
short front page whose links all lead somewhere."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import typing
from pathlib import Path

import pytest

from dreambooth_kit.config import DreamBoothConfig

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
REFERENCE = DOCS / "reference" / "config.md"
SECTIONS = [f.name for f in dataclasses.fields(DreamBoothConfig) if f.name not in ("version", "concepts")]
MAX_README_LINES = 250


def _generator():
    """docs/gen_config_reference.py, imported by path (docs/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gen_config_reference", DOCS / "gen_config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


def _config_keys() -> set[str]:
    hints = typing.get_type_hints(DreamBoothConfig)
    return {f"{s}.{f.name}" for s in SECTIONS for f in dataclasses.fields(hints[s])}


def _keys_named_in(text: str) -> set[str]:
    """`section.key` in backquotes, as the pages write a setting (`train.max_steps`, `data.buckets: true`)."""
    return set(re.findall(rf"`((?:{'|'.join(SECTIONS)})\.[a-z_0-9]+)", text))


def test_every_key_the_docs_name_exists():
    known = _config_keys()
    unknown = {
        f"{page.relative_to(ROOT)}: {key}"
        for page in _pages()
        for key in _keys_named_in(page.read_text(encoding="utf-8")) - known
    }
    assert not unknown, f"the docs name config keys that do not exist: {sorted(unknown)}"


def test_the_key_check_can_fail():
    assert _keys_named_in("set `train.learnig_rate=1e-4` and `data.buckets: true`") == {
        "train.learnig_rate",
        "data.buckets",
    }
    assert "train.learnig_rate" not in _config_keys()


def test_the_config_reference_is_what_the_schema_gives():
    """docs/reference/config.md is generated: `make docs` (or python docs/gen_config_reference.py)."""
    assert REFERENCE.read_text(encoding="utf-8") == _generator().render(), (
        "docs/reference/config.md differs from the schema: run python docs/gen_config_reference.py"
    )


def test_the_reference_lists_every_config_key():
    text = REFERENCE.read_text(encoding="utf-8")
    assert _config_keys() <= _keys_named_in(text)
    (concept,) = typing.get_args(typing.get_type_hints(DreamBoothConfig)["concepts"])
    concept_keys = {f.name for f in dataclasses.fields(concept)}
    assert all(f"`concepts[].{k}`" in text for k in concept_keys)


def test_every_schema_field_has_a_docstring():
    gen = _generator()
    schema = (ROOT / "dreambooth_kit" / "config" / "schema.py").read_text(encoding="utf-8")
    gen.render(schema)  # raises MissingDocstring naming the fields without one
    without = schema.replace('    """Hub id, diffusers folder', "    # Hub id, diffusers folder", 1)
    assert without != schema, "the docstring this test removes has changed: update the test"
    with pytest.raises(gen.MissingDocstring, match=r"model\.pretrained"):
        gen.render(without)


def test_readme_shows_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert "make demo" in text and "make test" in text


def test_readme_is_a_front_page():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines: move the detail into docs/"


def test_every_relative_link_in_the_readme_leads_to_a_file():
    text = README.read_text(encoding="utf-8")
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    relative = [t for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    assert relative, "no relative links found: the pattern is wrong"
    broken = [t for t in relative if not (ROOT / t.split("#", 1)[0]).exists()]
    assert not broken, f"README.md links to files that do not exist: {broken}"

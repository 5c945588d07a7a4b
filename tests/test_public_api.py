"""The public API (``dreambooth_kit.__all__``) is what the README, the pages under docs/ and the notebook
use, and they use nothing else from the package."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import dreambooth_kit

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
NOTEBOOK = ROOT / "notebooks" / "dreambooth_sd21_colab.ipynb"

# Submodules that are public on their own, with the reason:
PUBLIC_SUBMODULES = {
    # The toy world renders the toy subject's photos for the offline demo (notebook TINY mode);
    # optional, so not imported by `import dreambooth_kit`.
    "dreambooth_kit.toy.world",
}


def _python_blocks() -> list[tuple[str, str]]:
    blocks = [
        (str(page.relative_to(ROOT)), b)
        for page in [README, *sorted(DOCS.rglob("*.md"))]
        for b in re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)
    ]
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    blocks += [
        (f"{NOTEBOOK.name} cell {i}", "".join(c["source"]))
        for i, c in enumerate(cells)
        if c["cell_type"] == "code"
    ]
    return blocks


def _package_imports(source: str) -> list[tuple[str, list[str]]]:
    """(module, names) for every import of dreambooth_kit or a submodule in ``source``."""
    lines = [ln for ln in source.splitlines() if not ln.lstrip().startswith(("!", "%"))]  # shell lines
    found = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dreambooth_kit"):
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith("dreambooth_kit")]
    return found


def test_docs_and_notebook_import_only_the_public_api():
    used, internal = set(), []
    for where, source in _python_blocks():
        for module, names in _package_imports(source):
            if module == "dreambooth_kit":
                used |= set(names)
            elif module not in PUBLIC_SUBMODULES:
                internal.append(f"{where}: from {module} import {', '.join(names)}")
    assert not internal, "use `from dreambooth_kit import ...` (add the name to __all__):\n" + "\n".join(
        internal
    )
    assert used - set(dreambooth_kit.__all__) == set()
    assert {"load_config", "train", "load_pipeline", "generate", "save_images"} <= used  # the parse saw them


def test_every_public_name_exists():
    for name in dreambooth_kit.__all__:
        assert hasattr(dreambooth_kit, name), name
    for module in PUBLIC_SUBMODULES:
        __import__(module)


def test_the_version_has_one_source():
    from dreambooth_kit._version import __version__

    assert dreambooth_kit.__version__ == __version__
    assert (
        'version = { attr = "dreambooth_kit._version.__version__" }' in (ROOT / "pyproject.toml").read_text()
    )


def test_every_public_name_is_importable_and_listed():
    """The names load on first use (dreambooth_kit/__init__.py); __all__ lists exactly them."""
    assert set(dreambooth_kit.__all__) == {"__version__", *dreambooth_kit._PUBLIC}
    for name in dreambooth_kit.__all__:
        assert getattr(dreambooth_kit, name) is not None

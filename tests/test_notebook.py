"""The Colab notebook, executed headless in tiny mode (the same file users open in Colab)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import E2E_TIMEOUT

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "dreambooth_sd21_colab.ipynb"


def test_committed_notebook_is_stripped_and_has_a_parameters_cell():
    nb = json.loads(NOTEBOOK.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    assert sum("parameters" in c.get("metadata", {}).get("tags", []) for c in code) == 1
    text = "\n".join("".join(c["source"]) for c in code)
    assert "google.colab" in text and "IN_COLAB" in text  # Colab-only imports are guarded


@pytest.mark.slow
def test_notebook_runs_headless_in_tiny_mode(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    i = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    out = tmp_path / "run"
    # papermill's way: an injected cell right after the parameters cell overrides them
    nb.cells.insert(
        i + 1, nbformat.v4.new_code_cell(f"TINY = True\nOUTPUT_DIR = {str(out)!r}\nMAX_STEPS = 2")
    )
    NotebookClient(
        nb, timeout=E2E_TIMEOUT, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    assert (out / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert len(list((out / "outputs").glob("*.png"))) == 2
    assert (out / "export" / "run_kohya.safetensors").exists()
    shown = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "display_data"]
    assert len(shown) == 2 and all("image/png" in o["data"] for o in shown)  # sample grid + your images


def _install_cell() -> dict:
    """The notebook's install cell, executed outside Colab (it installs nothing there)."""
    nb = json.loads(NOTEBOOK.read_text())
    cell = next(c for c in nb["cells"] if "_install_commands" in "".join(c["source"]))
    namespace = {"PACKAGE_SOURCE": ""}
    exec(compile("".join(cell["source"]), "install-cell", "exec"), namespace)
    assert namespace["IN_COLAB"] is False
    return namespace


def test_notebook_installs_from_the_projects_own_source_never_an_index_name(tmp_path):
    install = _install_cell()["_install_commands"]
    text = NOTEBOOK.read_text()
    assert '"dreambooth_kit[bnb,tracking]"' not in text and "pip install dreambooth_kit" not in text
    with pytest.raises(SystemExit, match="PACKAGE_SOURCE"):
        install("", tmp_path)  # nothing given, no wheel uploaded: say what to do
    wheel = tmp_path / "dreambooth_kit-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    (cmd,) = install("", tmp_path)  # an uploaded wheel is found by itself
    assert cmd[-1] == f"dreambooth_kit[bnb,tracking] @ {wheel.as_uri()}"
    clone, pip = install("https://example.org/me/dreambooth_kit.git", tmp_path / "other")
    assert clone[:2] == ["git", "clone"] and clone[-2] == "https://example.org/me/dreambooth_kit.git"
    checkout = tmp_path / "other" / "dreambooth_kit"
    assert pip[-3:] == ["-c", str(checkout / "constraints.txt"), f"{checkout}[bnb,tracking]"]
    assert "torch" not in " ".join(pip)  # Colab keeps its own CUDA build

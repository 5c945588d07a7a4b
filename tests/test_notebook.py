"""The Colab notebook, executed headless in tiny mode (the same file users open in Colab)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import E2E_TIMEOUT

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "dreambooth_sd21_colab.ipynb"


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


def _install_cell(**settings) -> dict:
    """The notebook's install cell, executed outside Colab (it installs nothing there)."""
    nb = json.loads(NOTEBOOK.read_text())
    cell = next(c for c in nb["cells"] if "_install_commands" in "".join(c["source"]))
    namespace = {"PACKAGE_SOURCE": "", **settings}
    exec(compile("".join(cell["source"]), "install-cell", "exec"), namespace)
    assert namespace["IN_COLAB"] is False
    return namespace


def _settings() -> dict:
    nb = json.loads(NOTEBOOK.read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    namespace: dict = {}
    exec(compile("".join(cell["source"]), "settings-cell", "exec"), namespace)
    return namespace


def _repository() -> str:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["urls"]["Repository"]


def test_colab_from_zero_installs_from_the_public_repository_with_drive_on():
    settings = _settings()
    url = f"git+{_repository()}.git"
    assert settings["PACKAGE_SOURCE"] == url and settings["USE_DRIVE"] is True
    # The README gives the same line a Colab user can paste.
    assert f'pip install "dreambooth_kit[bnb,tracking] @ {url}"' in (REPO / "README.md").read_text()


def test_notebook_installs_from_the_projects_own_source_never_an_index_name(tmp_path):
    install = _install_cell()["_install_commands"]
    text = NOTEBOOK.read_text()
    assert '"dreambooth_kit[bnb,tracking]"' not in text and "pip install dreambooth_kit" not in text
    with pytest.raises(SystemExit, match="PACKAGE_SOURCE"):
        install("", tmp_path)  # nothing given, no wheel uploaded: say what to do
    (cmd,) = install("git+https://example.org/me/dreambooth_kit.git", tmp_path)
    assert cmd[-1] == "dreambooth_kit[bnb,tracking] @ git+https://example.org/me/dreambooth_kit.git"
    (cmd,) = install("https://example.org/me/dreambooth_kit.git", tmp_path)  # git+ is implied
    assert cmd[-1].endswith("@ git+https://example.org/me/dreambooth_kit.git")
    wheel = tmp_path / "dreambooth_kit-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    (cmd,) = install("git+https://example.org/me/dreambooth_kit.git", tmp_path)  # an upload wins
    assert cmd[-1] == f"dreambooth_kit[bnb,tracking] @ {wheel.as_uri()}"
    # Only what Colab lacks: no lock (it pins numpy, pandas, Pillow in the running kernel), no
    # upgrades of what is already there, and Colab's own CUDA torch is kept.
    assert "-c" not in cmd and "-U" not in cmd and "--upgrade" not in cmd
    assert cmd[cmd.index("--upgrade-strategy") + 1] == "only-if-needed"
    assert "torch" not in " ".join(cmd)


def test_the_wheel_asks_nothing_of_colabs_core_packages_beyond_a_floor():
    """Colab's numpy, pandas, Pillow, matplotlib, torch, ... are never capped or pinned by us, so
    pip's only-if-needed strategy leaves them as they are (a cap would downgrade them in place)."""
    tomllib = pytest.importorskip("tomllib")
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    core = {"torch", "numpy", "pandas", "pillow", "matplotlib", "scipy", "pyyaml", "tqdm", "requests"}
    for requirement in dependencies:
        name = re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower()
        if name in core:
            assert not re.search(r"<|==|!=|~=", requirement), requirement


def test_a_package_changed_under_a_loaded_module_restarts_the_runtime():
    changed = _install_cell()["_changed_while_loaded"]
    before = {"numpy": "2.0.2", "pandas": "2.2.2", "pyyaml": "6.0.2"}
    after = {"numpy": "1.26.4", "pandas": "2.2.2", "pyyaml": "6.0.1", "peft": "0.21.2"}
    loaded = {"numpy": object(), "numpy.linalg": object(), "json": object()}
    # numpy was imported and changed: restart; PyYAML changed but was never imported: no need;
    # peft is new: nothing to restart for.
    assert changed(before, after, loaded) == ["numpy 2.0.2 -> 1.26.4"]
    assert changed(before, before, loaded) == []


@pytest.mark.slow
def test_install_cell_against_a_local_wheel_installs_it_and_changes_nothing_else(tmp_path):
    """The cell's own pip command on the real wheel, resolved (pip --dry-run, offline) against this
    environment, which already has every dependency: only dreambooth_kit itself would be installed."""
    import subprocess
    import sys

    dist = tmp_path / "content"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist, REPO],
        check=True,
        capture_output=True,
    )
    (cmd,) = _install_cell()["_install_commands"]("", dist)
    # Extras (bitsandbytes) would need the index; the offline check resolves the core requirements.
    cmd[-1] = cmd[-1].replace("[bnb,tracking]", "")
    report = tmp_path / "report.json"
    subprocess.run(
        cmd + ["--dry-run", "--no-index", "--find-links", str(dist), "--report", str(report)],
        check=True,
        capture_output=True,
    )
    installs = json.loads(report.read_text())["install"]
    assert [i["metadata"]["name"].lower() for i in installs] == ["dreambooth_kit"]
    assert installs[0]["download_info"]["url"].startswith(dist.as_uri())

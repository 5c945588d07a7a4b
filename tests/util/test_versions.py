"""The lock file and the transformers/peft pairing check."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dreambooth_kit.util import versions

REPO = Path(__file__).resolve().parents[2]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not pinned with =="
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_lock_pins_every_dependency_except_torch():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    names = {re.split(r"[<>=!~\[ ;]", d, maxsplit=1)[0].lower().replace("_", "-") for d in wanted}
    pins = _pins()
    assert "torch" not in pins  # Colab keeps its own CUDA build; the Makefile installs the CPU wheel
    assert names - {"torch"} <= set(pins), sorted(names - {"torch"} - set(pins))
    assert not pins["transformers"].startswith("5.24")  # the release that needs an unreleased peft
    # An upper bound below 5.24: excluding 5.24 alone let the wheel resolve 5.25, equally broken.
    assert any(re.fullmatch(r"transformers>=5\.0,<5\.24", d) for d in project["dependencies"])


def test_makefile_installs_with_the_lock():
    text = (REPO / "Makefile").read_text()
    assert re.search(r"pip install -q -c \$\(LOCK\) -e \"\.\[dev\]\"", text)
    assert "LOCK   := constraints.txt" in text


def test_installed_versions_match_the_lock():
    import importlib.metadata

    pins = _pins()
    for name in ("transformers", "peft", "diffusers", "accelerate", "safetensors"):
        assert importlib.metadata.version(name) == pins[name], name


def test_min_peft_is_read_from_the_installed_transformers():
    needed = versions.peft_needed_by_transformers()
    assert needed is not None and re.fullmatch(r"\d+\.\d+(\.\d+)?", needed)
    assert versions.transformers_peft_problem() is None  # the locked pair works


def test_broken_pairing_names_both_versions_and_the_fix(monkeypatch):
    installed = {"transformers": "5.24.0", "peft": "0.21.2"}
    monkeypatch.setattr(versions, "_installed", installed.get)
    monkeypatch.setattr(versions, "peft_needed_by_transformers", lambda: "0.22.0")
    problem = versions.transformers_peft_problem()
    assert "transformers 5.24.0 needs peft >= 0.22.0, but peft 0.21.2" in problem
    # The fix a wheel user can apply: this package's own declared range (no checkout, no lock needed).
    assert "pip install 'transformers<5.24,>=5.0'" in problem and "constraints.txt" in problem
    versions.check_transformers_peft(need_text_encoder_lora=False)  # UNet-only LoRAs still work
    with pytest.raises(versions.IncompatibleVersions, match="needs peft >= 0.22.0"):
        versions.check_transformers_peft(need_text_encoder_lora=True)
    installed["peft"] = "0.22.0"
    assert versions.transformers_peft_problem() is None


def test_ci_trains_from_the_wheel_alone_without_the_lock():
    """The check that would have caught transformers 5.25 (run by .ci/run; 85 s, so not in pytest)."""
    script = (REPO / ".ci" / "wheel-alone").read_text()
    assert "constraints" not in script.split("set -euo pipefail", 1)[1]  # the newest allowed releases
    assert "pip wheel" in script and "adapter.train_text_encoder=true" in script
    assert 'startswith("text_encoder.")' in script  # it checks the text encoder was trained
    ci = (REPO / ".ci" / "run").read_text()
    assert ci.index("make test\n") < ci.index("make test-wheel")

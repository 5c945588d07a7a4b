"""The app without a browser: it builds with every element the browser test finds, warns when it is
reachable beyond this machine, serves only the roots (less their hidden entries), shows a handler's
error as one line, and gradio is needed only by the `ui` command."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dreambooth_kit.cli import build_parser, main
from dreambooth_kit.errors import InvalidInput, MissingExtra
from dreambooth_kit.ui import app
from dreambooth_kit.ui.paths import Roots


def test_the_app_has_the_five_tabs_and_every_element_id(tmp_path):
    blocks = app.build_app(Roots.of([tmp_path]), "toy.yaml")
    config = blocks.get_config_file()
    ids = {c["props"].get("elem_id") for c in config["components"]}
    assert set(app.ELEM.values()) <= ids
    labels = {c["props"].get("label") for c in config["components"] if c.get("type") == "tabitem"}
    assert {"Photos", "Train", "Evaluate", "Generate", "Export"} <= labels
    dropdown = next(c for c in config["components"] if c["props"].get("label") == "Config")
    assert dropdown["props"]["value"] == "toy.yaml"


def test_a_warning_when_reachable_beyond_this_machine(tmp_path):
    roots = Roots.of([tmp_path])
    assert app.exposure_warning("127.0.0.1", False, roots) is None
    assert app.exposure_warning("localhost", False, roots) is None
    warning = app.exposure_warning("0.0.0.0", False, roots)
    assert "reachable on 0.0.0.0: anyone who can reach it can start trainings and read the photos" in warning
    assert str(tmp_path) in warning
    assert "public gradio.live link" in app.exposure_warning("127.0.0.1", True, roots)


def test_gradio_serves_the_roots_without_their_hidden_entries(tmp_path):
    (tmp_path / ".ssh").mkdir()
    (tmp_path / "photos").mkdir()
    options = app.launch_options(Roots.of([tmp_path]))
    assert options["allowed_paths"] == [str(tmp_path)]
    assert options["blocked_paths"] == [str(tmp_path / ".ssh")]


def test_a_user_error_is_one_line_in_the_page():
    import gradio as gr

    def refuse():
        raise InvalidInput("photo folder 'x': not found")

    with pytest.raises(gr.Error) as e:
        app._shown(refuse)()
    assert e.value.message == "photo folder 'x': not found" and e.value.duration is None


def test_the_ui_command_and_its_defaults():
    args = build_parser().parse_args(["ui"])
    assert (args.port, args.host, args.share, args.root, args.config) == (
        7860,
        "127.0.0.1",
        False,
        None,
        "sd21_base_lora.yaml",
    )
    args = build_parser().parse_args(["ui", "--root", "a", "--root", "b", "--share", "--port", "9000"])
    assert (args.root, args.share, args.port) == (["a", "b"], True, 9000)


def test_without_gradio_the_ui_command_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    with pytest.raises(MissingExtra, match=r"pip install 'dreambooth_kit\[ui\]'"):
        app.require_gradio()
    assert main(["ui"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: dreambooth-kit ui needs gradio") and "\n" not in err


def test_the_toolkit_never_imports_gradio_itself(tmp_path):
    code = (
        "import sys, dreambooth_kit\nfrom dreambooth_kit.cli import main\n"
        "from dreambooth_kit.ui import handlers, results\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('gradio' in sys.modules)"
    )
    env = {**os.environ, "DREAMBOOTH_KIT_CLASS_STORE": str(tmp_path / "store")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stdout + out.stderr

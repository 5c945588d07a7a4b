"""Publish a finished run on the Hugging Face Hub: a model card and exactly the files worth sharing.

The card is built with ``huggingface_hub.ModelCardData`` (YAML front-matter the Hub understands:
``base_model``, ``instance_prompt``, ``license``, tags, widget images) and the upload goes through
``HfApi.create_repo`` + ``HfApi.upload_folder`` with ``allow_patterns`` built from :func:`upload_plan`,
so what is listed by a dry run is what is uploaded. Resume checkpoints (optimizer state, RNG
pickles), logs, class images and temp folders never leave the machine (they are large, private or
both), and the token is only ever handed to the API, never written to a file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from dreambooth_kit.errors import HubError
from dreambooth_kit.training.card import LORA_WEIGHTS, is_full, newest_samples, run_config, write_model_card
from dreambooth_kit.training.layout import RunLayout

# File names that are never uploaded, wherever they are (accelerate's resume state is pickled).
_PRIVATE_FILES = re.compile(
    r"(\.pkl|\.pickle|\.ckpt|\.pt)$|^(optimizer.*\.bin|scheduler\.bin|sampler.*\.bin|random_states.*)$"
)
# Belt and braces: also handed to upload_folder as ignore_patterns.
IGNORE_PATTERNS = [
    "checkpoints/*",
    "abandoned/*",  # an earlier timeline's outputs (runfolder.py): not this run's
    "logs/*",
    "class_images/*",
    ".tmp-*",
    "*/.tmp-*",
    "*.pkl",
    "*.pt",
    "*.ckpt",
    "*optimizer*.bin",
    "*random_states*",
]


# ------------------------------------------------------------------ the run folder


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)  # .tmp-*, .git, .cache, editor files


def _files(folder: Path, run_dir: Path) -> list[str]:
    out = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(run_dir)
        if (
            path.is_file()
            and not path.is_symlink()
            and not _hidden(rel)
            and not _PRIVATE_FILES.search(path.name)
        ):
            out.append(rel.as_posix())
    return out


def upload_plan(run_dir: str | os.PathLike) -> list[str]:
    """The run-relative files :func:`push_to_hub` uploads, sorted: ``README.md`` (written by the push),
    ``config.yaml``, ``lora/*`` (or ``pipeline/**`` for full fine-tunes), ``export/**`` if present and
    the newest ``samples/step-*/``. Never ``checkpoints/``, ``logs/``, ``class_images/``, ``.tmp-*``,
    pickles or optimizer states."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    final = RunLayout(run_dir).final(cfg.adapter.type)
    if not final.is_dir() or (not is_full(cfg) and not (final / LORA_WEIGHTS).is_file()):
        raise HubError(
            f"{run_dir} has no finished {'pipeline' if is_full(cfg) else 'LoRA'} ({final.name}/): "
            "training has not completed there, so there is nothing to publish yet."
        )
    plan = {"README.md", "config.yaml"}
    folders = [final, run_dir / "export"]
    newest = newest_samples(run_dir)
    if newest is not None:
        folders.append(newest)
    for folder in folders:
        if folder.is_dir():
            plan.update(_files(folder, run_dir))
    return sorted(plan)


# ------------------------------------------------------------------ the model card


# ------------------------------------------------------------------ the push


def _pattern(rel: str) -> str:
    """An upload_folder (fnmatch) pattern matching exactly this path."""
    return re.sub(r"([*?\[\]])", r"[\1]", rel)


def _login_hint(repo_id: str) -> str:
    return (
        f"Could not push to the Hub repo {repo_id!r}"
        " - log in with `hf auth login` (a token with write access), or pass token= / set HF_TOKEN,"
        " and check the network (HF_HUB_OFFLINE must not be set)."
    )


def push_to_hub(
    run_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    dry_run: bool = False,
) -> list[str]:
    """Write the model card, create ``repo_id`` (if needed) and upload exactly :func:`upload_plan`.

    Returns the uploaded run-relative paths. ``dry_run`` returns the plan and touches neither the
    network nor the run folder. Failures raise :class:`HubError` naming the repo and how to log in.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HFValidationError, HTTPError
    from huggingface_hub.utils import validate_repo_id

    run_dir = Path(run_dir)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"{repo_id!r} is not a Hub repo id (expected 'username/name'): {e}") from None
    plan = upload_plan(run_dir)
    if dry_run:
        return plan
    write_model_card(run_dir, repo_id=repo_id)
    if token:  # passed to the Hub client only: a token written into an uploaded file would leak it publicly
        leaked = [rel for rel in plan if _contains(run_dir / rel, token)]
        if leaked:
            raise HubError(f"refusing to push to {repo_id!r}: the token appears in {', '.join(leaked)}")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, token=token, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(run_dir),
            repo_type="model",
            token=token,
            allow_patterns=[_pattern(rel) for rel in plan],
            ignore_patterns=IGNORE_PATTERNS,
            commit_message=f"Upload DreamBooth {'pipeline' if is_full(run_config(run_dir)) else 'LoRA'} (dreambooth_kit)",
        )
    except (HTTPError, OSError) as e:  # HfHubHTTPError, offline, no token, connection errors
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        if token:
            detail = detail.replace(token, "***")
        raise HubError(f"{_login_hint(repo_id)}\n  cause: {type(e).__name__}: {detail}") from None
    return plan


def _contains(path: Path, secret: str, limit: int = 64 << 20) -> bool:
    try:
        if path.stat().st_size > limit:  # weights: scanned only up to the limit (their header holds any text)
            with path.open("rb") as f:
                return secret.encode() in f.read(limit)
        return secret.encode() in path.read_bytes()
    except OSError:
        return False

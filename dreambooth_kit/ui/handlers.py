"""The UI's handlers for the photos and the training, as plain Python: strings and numbers in, plain
values out, no gradio (``app`` wires them to components), so they are tested without a browser.

Every path a user types goes through :class:`~dreambooth_kit.ui.paths.Roots` first. Every step is
the toolkit's own public function: ``check_images`` for the photos, ``find_identifiers`` for the
identifier, ``load_config`` to refuse a bad setting before anything starts, and the trainer itself,
``python -m dreambooth_kit.training.train``, started as a job (``jobs``) that the run lock guards.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

import dreambooth_kit as dbk
from dreambooth_kit.errors import InvalidInput
from dreambooth_kit.ui import jobs
from dreambooth_kit.ui.paths import Roots
from dreambooth_kit.ui.progress import RunStatus, run_status

# What an upload may bring into a root: photos (the check explains the formats it cannot train on)
# and kohya-style caption files. Nothing else: a file in a root can be served back by the UI.
UPLOAD_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".avif", ".heic", ".heif", ".tif", ".tiff")
CAPTION_SUFFIX = ".txt"
PRIOR_MODES = ("class images", "teacher", "off")
ADAPTERS = ("LoRA", "full")


def config_name(roots: Roots, name: str) -> str:
    """A packaged config's name as it is; any other config is a YAML file inside the roots."""
    name = (name or "").strip()
    if name in dbk.packaged_configs():
        return name
    return str(roots.confine(name, "config"))


# ------------------------------------------------------------------ photos


@dataclass
class PhotoRow:
    path: Path
    size: str  # "512x512", or "" when it does not decode
    verdict: str  # "ok", or the problems found, one per line

    @property
    def caption(self) -> str:
        return f"{self.path.name} · {self.size or '?'} · {self.verdict.splitlines()[0]}"


@dataclass
class PhotoCheck:
    folder: Path
    rows: list[PhotoRow]
    summary: str


def save_uploads(roots: Roots, files: list[str], folder: str, config: str) -> PhotoCheck:
    """Copy uploaded photos (and caption .txt files) into ``folder``, then check the folder."""
    dest = roots.confine(folder, "photo folder")
    refused = [
        Path(f).name for f in files if not Path(f).name.lower().endswith((*UPLOAD_SUFFIXES, CAPTION_SUFFIX))
    ]
    if refused:
        raise InvalidInput(
            f"{', '.join(refused)}: not a photo or caption; upload {' '.join(UPLOAD_SUFFIXES)} files "
            f"(and {CAPTION_SUFFIX} captions)"
        )
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        target = roots.confine(dest / Path(f).name, "uploaded file")  # a name like .env is refused
        shutil.copyfile(f, target)
    return check_photos(roots, folder, config)


def check_photos(roots: Roots, folder: str, config: str) -> PhotoCheck:
    """Every photo of ``folder`` checked as training would check it (``check_images`` at the config's
    resolution and minimum size); no model is loaded."""
    path = roots.confine(folder, "photo folder")
    cfg = dbk.load_config(config_name(roots, config))
    report = dbk.check_images(
        path, resolution=cfg.data.resolution, min_size=cfg.data.min_size, use_captions=cfg.data.use_captions
    )
    photos = sorted({*report.images, *report.skipped, *(i.path for i in report.issues)} - {report.folder})
    stems = {p.with_suffix(""): p for p in photos if p.suffix.lower() != CAPTION_SUFFIX}
    said: dict[Path, list[tuple[str, str]]] = {}
    for issue in report.issues:  # a caption's notes go on its photo's row
        owner = issue.path
        if owner.suffix.lower() == CAPTION_SUFFIX:
            owner = stems.get(owner.with_suffix(""), owner)
        said.setdefault(owner, []).append((issue.severity, issue.message))
    rows = [
        PhotoRow(p, _size(p), _verdict(said.get(p, []))) for p in photos if p in stems.values() or p in said
    ]
    folder_wide = [f"{sev}: {msg}" for sev, msg in said.get(report.folder, [])]
    summary = (
        f"{len(report.images)} usable photos, {len(report.warnings)} warnings, {len(report.errors)} errors "
        f"(checked for {cfg.data.resolution} px training, as {config})"
    )
    return PhotoCheck(report.folder, rows, "\n".join([summary, *folder_wide]))


def _verdict(notes: list[tuple[str, str]]) -> str:
    """Errors and warnings first (or "ok"), then notes such as the photo's caption."""
    bad = [f"{sev}: {msg}" for sev, msg in notes if sev != "info"]
    return "\n".join((bad or ["ok"]) + [msg for sev, msg in notes if sev == "info"])


def _size(path: Path) -> str:
    try:
        with Image.open(path) as im:
            return f"{im.width}x{im.height}"
    except (OSError, ValueError, Image.DecompressionBombError):
        return ""


def suggest_identifiers(
    roots: Roots, class_noun: str, config: str, model: str, n: int = 8, pool: int = 200
) -> list[list]:
    """The identifier helper: rare single-token words for the class, ranked by how little the base
    model reacts to them (``find_identifiers``; it loads the model's text encoder and UNet)."""
    noun = (class_noun or "").strip()
    if not noun:
        raise InvalidInput("class noun: empty; type what the subject is (dog, backpack, ball)")
    cfg = dbk.load_config(config_name(roots, config), _model_override(roots, model))
    found = dbk.find_identifiers(cfg.model, noun, n=n, pool=pool)
    return [[i, c.word, f"{c.change:.3e}", f"a photo of {c.word} {noun}"] for i, c in enumerate(found, 1)]


def _model_override(roots: Roots, model: str | None) -> list[str]:
    chosen = roots.model(model)
    return [f"model.pretrained={chosen}"] if chosen else []


# ------------------------------------------------------------------ training


@dataclass
class TrainForm:
    """The Train tab's fields, as typed."""

    config: str
    run: str
    photos: str
    model: str = ""
    identifier: str = ""
    class_noun: str = ""
    steps: int = 800
    stop_auto: bool = False
    adapter: str = "LoRA"
    prior: str = "class images"
    validation_every: int = 0  # 0: no validation grids
    checkpoint_every: int = 0  # 0: a checkpoint only when stopped
    extra: str = ""  # more settings, key=value, one a line


# Settings the extra box refuses, with the field that sets them (paths are typed into fields, where
# they are checked against the roots).
FIELD_KEYS = {
    "model.pretrained": "the Model field",
    "data.instance_dir": "the Photos folder field",
    "train.output_dir": "the Run folder field",
    "train.resume": "the Resume button",
}
# Settings whose value is a path (or one of a few words): allowed only inside the roots.
PATH_KEYS = {
    "model.single_file_config": (),
    "data.masks": (),
    "prior.class_dir": ("",),
    "prior.store": ("auto", "off", "false"),
    "evaluate.prompts": ("paper", "toy"),
}
MODEL_KEYS = ("evaluate.subject_encoder", "evaluate.prompt_encoder")


def extra_overrides(roots: Roots, text: str) -> list[str]:
    """The "more settings" box: ``key=value`` a line; paths confined, the fields' own keys refused."""
    out = []
    for raw in (text or "").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = (s.strip() for s in line.partition("="))
        if not sep:
            raise InvalidInput(f"more settings: {line!r} is not key=value (e.g. train.learning_rate=5e-5)")
        if key in FIELD_KEYS:
            raise InvalidInput(f"more settings: set {key} with {FIELD_KEYS[key]}, not here")
        if key.startswith("concepts"):
            raise InvalidInput(
                "more settings: several subjects (concepts) need a config file; train them with the CLI"
            )
        if key in PATH_KEYS and value not in PATH_KEYS[key]:
            value = str(roots.confine(value, key))
        elif key in MODEL_KEYS:
            value = roots.model(value, key) or value
        out.append(f"{key}={value}")
    return out


def training_overrides(roots: Roots, form: TrainForm) -> list[str]:
    """The form as the trainer's ``key=value`` overrides, every path absolute and inside the roots."""
    o = [f"data.instance_dir={roots.confine(form.photos, 'photo folder')}"]
    o.append(f"train.output_dir={roots.confine(form.run, 'run folder')}")
    o += _model_override(roots, form.model)
    ident, noun = form.identifier.strip(), form.class_noun.strip()
    if ident and noun:
        o += [f"data.identifier={ident}", f"data.instance_prompt=a photo of {ident} {noun}"]
        o.append(f"prior.class_prompt=a photo of a {noun}")
    elif ident or noun:
        raise InvalidInput(
            "identifier and class: give both (zwx and dog make 'a photo of zwx dog'), or neither"
        )
    o += [f"train.max_steps={int(form.steps)}", f"train.stop={'auto' if form.stop_auto else 'never'}"]
    if form.adapter not in ADAPTERS or form.prior not in PRIOR_MODES:
        raise InvalidInput(
            f"adapter {form.adapter!r} / prior {form.prior!r}: choose from {ADAPTERS} / {PRIOR_MODES}"
        )
    o.append(f"adapter.type={'full' if form.adapter == 'full' else 'lora'}")
    o.append(f"prior.with_prior_preservation={form.prior != 'off'}")
    o += [f"prior.mode={'teacher' if form.prior == 'teacher' else 'class_images'}"]
    o.append(f"validation.every_steps={int(form.validation_every or 0) or 'null'}")
    o.append(f"checkpoint.every_steps={int(form.checkpoint_every or 0) or 'null'}")
    return o + extra_overrides(roots, form.extra)


def start_training(roots: Roots, form: TrainForm) -> str:
    """Check the settings (``load_config``: every problem at once), then start the trainer as a job
    of the run folder. A second training in a folder is refused by the trainer's run lock, naming the
    holder: the run's status shows that message."""
    overrides, config = training_overrides(roots, form), config_name(roots, form.config)
    dbk.load_config(config, overrides)  # a typo or a bad value: refused now, not in the log
    run = roots.confine(form.run, "run folder")
    command = [sys.executable, "-m", "dreambooth_kit.training.train", "--config", config, *overrides]
    job = jobs.start(run, command, cwd=roots.home)
    return f"started (process group {job.info().get('pgid')}); log: {job.log}"


def stop_training(roots: Roots, run: str) -> str:
    job = jobs.running_job(roots.confine(run, "run folder"))
    if job is None or not job.stop():
        return "no training of this UI is running in that folder"
    return "stopping: the training finishes its step and writes a checkpoint"


def resume_training(roots: Roots, run: str) -> str:
    """Start the run again from its latest checkpoint, with its own config.yaml."""
    folder = roots.confine(run, "run folder")
    config = folder / "config.yaml"
    if not config.is_file():
        raise InvalidInput(f"{folder}: no config.yaml, so no training to resume there; press Start")
    command = [
        sys.executable,
        "-m",
        "dreambooth_kit.training.train",
        "--config",
        str(config),
        "train.resume=latest",
    ]
    job = jobs.start(folder, command, cwd=roots.home)
    return f"resuming (process group {job.info().get('pgid')}); log: {job.log}"


def training_status(roots: Roots, run: str) -> RunStatus:
    return run_status(roots.confine(run, "run folder"))

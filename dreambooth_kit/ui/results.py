"""The UI's handlers for what a run gives: its metrics (``evaluate``), seeded images (``load_pipeline``
+ ``generate`` + ``save_images``, the same calls as ``dreambooth-kit generate``, so one seed gives the
same pixels in both), an image's settings read back from its PNG (``read_metadata``) and the exports
(``run_exports``). Plain Python, no gradio; every typed path goes through the roots."""

from __future__ import annotations

import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import dreambooth_kit as dbk
from dreambooth_kit.errors import InvalidInput
from dreambooth_kit.ui.handlers import extra_overrides
from dreambooth_kit.ui.paths import Roots
from dreambooth_kit.util.atomic import writing

# The samplers generate takes (dreambooth_kit/models/schedulers.py; a test keeps them the same).
SCHEDULERS = ("dpmpp_2m", "ddim", "euler_a", "euler", "ddpm", "pndm")
MODEL_DEFAULT = "the model's own"
OUTPUTS = "outputs"  # images generated in the UI go to <first root>/outputs/, as the CLI's --out default


# ------------------------------------------------------------------ evaluate


@dataclass
class EvalView:
    headers: list[str]
    rows: list[list]
    best: str  # which checkpoint is best and why
    plot: Path | None
    files: list[Path] = field(default_factory=list)


NOT_SCORES = ("checkpoint", "step", "images", "settings")


def evaluate_run(
    roots: Roots, run: str, checkpoints: str = "all", seeds: int | None = None, extra: str = ""
) -> EvalView:
    """DreamBooth's metrics for each checkpoint of the run (``evaluate``, which reuses the images and
    rows of an earlier call), the best one marked. ``extra``: ``evaluate.key=value`` lines."""
    folder = roots.confine(run, "run folder")
    overrides = extra_overrides(roots, extra)
    other = [o for o in overrides if not o.startswith("evaluate.")]
    if other:
        raise InvalidInput(
            f"evaluate settings: {other[0]} is not an evaluate.* setting (the run's own stay as trained)"
        )
    seeds = int(seeds) if seeds else None
    result = dbk.evaluate(folder, checkpoints=checkpoints or "all", seeds=seeds, overrides=overrides)
    rows = result.rows
    scores = [
        k for k in (rows[0] if rows else {})
        if k not in NOT_SCORES and not k.endswith("_se") and any(r.get(k) is not None for r in rows)
    ]  # fmt: skip
    best = result.best["checkpoint"] if result.best else None
    table = [
        ["★" if r["checkpoint"] == best else "", r["checkpoint"], r["step"]]
        + [("" if r.get(k) is None else round(float(r[k]), 3)) for k in scores]
        for r in rows
    ]
    said = f"best: {best} (step {result.best['step']}): {result.reason}" if best else result.reason
    return EvalView(["best", "checkpoint", "step", *scores], table, said, result.files.get("plot"),
                    list(result.files.values()))  # fmt: skip


# ------------------------------------------------------------------ generate


@dataclass
class GenerateForm:
    """The Generate tab's fields, as typed."""

    run: str
    prompt: str
    negative_prompt: str = ""
    seed: int = 1557
    steps: int = 30
    guidance_scale: float = 7.5
    scheduler: str = MODEL_DEFAULT
    base: str = ""  # "": the run's base model
    use_run_lora: bool = True
    loras: str = ""  # more LoRA files or folders, one a line
    lora_scales: str = "1"  # one for all, or one per LoRA: "1, 0.6"


_pipelines: dict = {}  # the last pipeline loaded, by what it was loaded with
_lock = threading.Lock()  # one generation at a time: the pipeline is not shared between threads


def generate_image(roots: Roots, form: GenerateForm) -> tuple[Path, str]:
    """One seeded image, saved with its settings in the PNG; returns its path and its infotext."""
    if not form.prompt.strip():
        raise InvalidInput("prompt: empty; describe the picture (a photo of zwx dog on the beach)")
    base, loras = _base_and_loras(roots, form)
    scales = _scales(form.lora_scales, len(loras))
    scheduler = None if form.scheduler in (None, "", MODEL_DEFAULT) else form.scheduler
    key = (base, tuple(loras), tuple(scales), scheduler, tuple(_stamp(p) for p in loras))
    with _lock:
        pipe = _pipelines.get(key)
        if pipe is None:
            _pipelines.clear()  # one model in memory at a time
            pipe = _pipelines[key] = dbk.load_pipeline(base, lora=loras or None, lora_scale=scales or 1.0,
                                                       scheduler=scheduler)  # fmt: skip
        (result,) = dbk.generate(
            pipe, form.prompt, negative_prompt=form.negative_prompt, seed=int(form.seed), num_images=1,
            steps=int(form.steps), guidance_scale=float(form.guidance_scale),
        )  # fmt: skip
    (path,) = dbk.save_images([result], roots.home / OUTPUTS)
    return path, result.params.infotext()


def _base_and_loras(roots: Roots, form: GenerateForm) -> tuple[str, list[str]]:
    """The base model (typed, else the run's) and the LoRAs (the run's, then the typed ones)."""
    loras = [str(roots.confine(line, "LoRA")) for line in form.loras.splitlines() if line.strip()]
    run = roots.confine(form.run, "run folder") if (form.run or "").strip() else None
    base = roots.model(form.base, "base model")
    if run is not None and (form.use_run_lora or base is None):
        if not (run / "config.yaml").is_file():
            raise InvalidInput(f"{run}: not a training run (no config.yaml); give a base model instead")
        if (run / "pipeline").is_dir():  # a full fine-tune: its pipeline is the model
            base = base or str(run / "pipeline")
        elif form.use_run_lora:
            if not (run / "lora").is_dir():
                raise InvalidInput(
                    f"{run}: no finished LoRA yet (lora/ is missing); train it to the end first"
                )
            loras.insert(0, str(run / "lora"))
        base = base or dbk.load_config(run / "config.yaml").model.pretrained
    if base is None:
        raise InvalidInput("base model: empty; give a model, or a run folder whose model to use")
    return base, loras


def _scales(text: str, n: int) -> list[float]:
    try:
        values = [float(v) for v in (text or "1").replace(",", " ").split()]
    except ValueError:
        raise InvalidInput(f"LoRA scales {text!r}: numbers, one for all or one per LoRA (1, 0.6)") from None
    if n == 0:
        return []
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise InvalidInput(f"LoRA scales {text!r}: {len(values)} values for {n} LoRAs; give one, or one each")
    return values


def _stamp(path: str) -> tuple:
    """A LoRA's files' sizes and times: a retrained LoRA at the same path is loaded again."""
    p = Path(path)
    files = sorted(p.glob("*.safetensors")) if p.is_dir() else [p]
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file())


def reuse_settings(png: str) -> dict:
    """An image's generation settings from its PNG (``read_metadata``), as the Generate tab's fields."""
    params = dbk.read_metadata(png)["params"]
    if params is None:
        raise InvalidInput(
            f"{Path(png).name}: holds no dreambooth_kit settings; only images this toolkit made do"
        )
    return {
        "prompt": params.prompt,
        "negative_prompt": params.negative_prompt,
        "seed": params.seed,
        "steps": params.steps,
        "guidance_scale": params.guidance_scale,
        "scheduler": params.scheduler or MODEL_DEFAULT,
        "base": params.model,
        "loras": "\n".join(params.loras),
        "lora_scales": ", ".join(f"{s:g}" for s in params.lora_scales) or "1",
        "use_run_lora": False,  # the PNG names its LoRA files itself
    }


# ------------------------------------------------------------------ export


def export_run(roots: Roots, run: str, formats: list[str], fp16: bool = False) -> list[Path]:
    """The asked formats of a finished LoRA run (``run_exports``), as files to download: a folder (the
    merged diffusers model) is zipped beside itself."""
    if not formats:
        raise InvalidInput("export: tick at least one format (kohya, merged-diffusers, single-file)")
    folder = roots.confine(run, "run folder")
    files = []
    for path in dbk.run_exports(folder, list(formats), fp16=bool(fp16)):
        files.append(_zipped(path) if path.is_dir() else path)
    return files


def _zipped(folder: Path) -> Path:
    """``folder.zip`` beside it, stored uncompressed (weights do not compress; a 5 GB model zips in
    the time of a copy)."""
    target = folder.with_name(folder.name + ".zip")
    with writing(target) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            z.write(f, f.relative_to(folder).as_posix())
    return target

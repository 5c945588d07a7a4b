"""Which checkpoint is best? DreamBooth's metrics for every checkpoint of a run.

For each target (the base model as step 0, each complete checkpoint, the final LoRA or pipeline) it
generates the prompt set (:mod:`~dreambooth_kit.evaluation.prompt_sets`) at ``evaluate.seeds`` seeds and
``evaluate.class_images`` class-prompt samples, then scores them (:mod:`~dreambooth_kit.evaluation.metrics`):

===================  ==========================================================================
subject_fidelity     subject encoder (DINO): generated images vs the subject's photos (higher)
clip_i               prompt encoder's image tower (CLIP-I): the same comparison (higher)
prompt_fidelity      CLIP-T: each image vs its prompt without the identifier (higher)
pres                 class-prompt samples vs the subject's photos (lower: the class kept its look)
div                  1 - cosine among the images of one prompt, averaged over prompts (higher)
subject_rate         toy judge only: share of images it calls the subject (higher)
===================  ==========================================================================

Everything lands in ``<run>/eval/``: ``images/<target>-<weights hash>/<key>.png`` (one file per
prompt and seed, named by the hash of everything that made it), ``metrics.csv`` (one row per target
and settings), ``report.md`` and ``metrics.png``. A rerun loads the images and rows that exist and
makes only what is missing, so an interrupted evaluation resumes where it stopped.

The best checkpoint (:func:`~dreambooth_kit.evaluation.ranking.best_checkpoint`): the EARLIEST checkpoint whose subject fidelity is
within ``evaluate.tolerance`` of the highest seen and whose PRES is within it of the lowest seen.
Earliest, because checkpoints within the tolerance look alike to the metrics, and more steps only
add overfitting (the subject's photos' poses and backgrounds leak into every prompt). PRES below
the base model's counts as the base model's. When none meets both, the largest subject fidelity -
PRES, and the report says so. When no checkpoint has a positive subject fidelity, or the toy judge
finds the subject in none of their images, none is named (nor exported): scores that see no subject
cannot rank checkpoints by it.

The toy judge (``toy-judge``) knows only the toy world: before anything is loaded or drawn,
:func:`check_encoders_know_photos` has it refuse photos its own subject detector does not recognise.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dreambooth_kit.config import AdapterConfig
from dreambooth_kit.evaluation.ranking import best_checkpoint
from dreambooth_kit.evaluation.scoring import (
    ERRORS,
    EVAL,
    METRICS,
    SAMPLER,
    EvalPlan,
    EvaluateError,
    check_encoders_know_photos,
    load_photos,
    make_images,
    plan_for,
    score,
)
from dreambooth_kit.models.source import ModelSource

log = logging.getLogger("dreambooth_kit")

COLUMNS = ("checkpoint", "step", *METRICS, *ERRORS, "images", "settings")
BEST_LORA = "best-lora"  # the best checkpoint's LoRA, as a final LoRA is written


# ------------------------------------------------------------------ what is generated


# ------------------------------------------------------------------ scoring


# ------------------------------------------------------------------ targets


@dataclass(frozen=True)
class Target:
    """One thing to score: ``base`` (step 0), a checkpoint ``step-000400`` or ``final``."""

    name: str
    step: int
    kind: str  # base | checkpoint | final
    path: Path | None = None

    def weight_files(self) -> list[Path]:
        if self.path is None:
            return []
        if self.path.is_file():
            return [self.path]
        names = ("*.safetensors",) if self.kind == "checkpoint" else ("**/*.safetensors",)
        return sorted(f for n in names for f in self.path.glob(n))

    def fingerprint(self, base: str) -> str:
        """A hash of the weights (remembered per file version: a rerun does not read them again)."""
        from dreambooth_kit.util.hashing import sha256_file

        parts = [base] + [f"{f.relative_to(self.path)}:{sha256_file(f)}" for f in self.weight_files()]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:10]


def list_targets(run: Path, which: str, *, adapter_type: str, max_steps: int, base: bool) -> list[Target]:
    """The targets ``which`` names: ``all``, ``latest``, or a comma list of ``step-000400``/``400``/
    ``final``/``base``. The final result counts as a checkpoint at ``max_steps`` unless a checkpoint
    of that step exists (the same weights)."""
    from dreambooth_kit.training.layout import CHECKPOINT_EMA
    from dreambooth_kit.training.runfolder import Run

    folder = Run.open(run)  # this timeline's checkpoints only (never an abandoned one's)
    found = []
    for step, p in folder.checkpoints():  # train.ema: each checkpoint's average is a target of its own
        found += [Target(p.name, step, "checkpoint", p)]
        found += (
            [Target(f"{p.name}-ema", step, "checkpoint", p / CHECKPOINT_EMA)]
            if (p / CHECKPOINT_EMA).is_dir()
            else []
        )
    finals = [
        ("final", folder.layout.final(adapter_type)),
        ("final-ema", folder.layout.final_ema(adapter_type)),
    ]
    if max_steps not in {t.step for t in found}:
        found += [Target(name, max_steps, "final", path) for name, path in finals if path.is_dir()]
    final = finals[0][1]
    found.sort(key=lambda t: t.step)
    if not found:
        raise EvaluateError(
            f"{run}: no checkpoints and no final {final.name}/ to evaluate; train with "
            "checkpoint.every_steps=N (and checkpoint.keep_last=null to keep them all)"
        )
    chosen = found if which == "all" else found[-1:] if which == "latest" else _named(found, which)
    base_row = [Target("base", 0, "base")] if base and not any(t.kind == "base" for t in chosen) else []
    return base_row + chosen


def _named(found: list[Target], which: str) -> list[Target]:
    out = []
    by_name = {t.name: t for t in found} | {str(t.step): t for t in found}
    for raw in (w.strip() for w in which.split(",") if w.strip()):
        if raw == "base":
            out.append(Target("base", 0, "base"))
        elif raw in by_name or raw.removeprefix("step-").lstrip("0") in by_name:
            out.append(by_name.get(raw) or by_name[raw.removeprefix("step-").lstrip("0")])
        else:
            have = ", ".join(t.name for t in found)
            raise EvaluateError(f"--checkpoints {raw!r}: not in this run (it has {have}); or use all, latest")
    return out


@dataclass(frozen=True)
class RunWeights:
    """What loading a run's targets needs: the base model, the LoRA's shape, and the run's config
    (a ``to_dict()``, written beside the best checkpoint's LoRA)."""

    source: ModelSource
    adapter: AdapterConfig
    config: dict


def load_target(target: Target, run: RunWeights) -> object:
    """A pipeline for ``target``: the base, the base with a checkpoint's LoRA or weights, or the
    final LoRA/pipeline (loaded as users load it)."""
    from dreambooth_kit.inference.pipeline import load_pipeline

    source = run.source
    if target.kind == "final" and run.adapter.type == "full":
        return load_pipeline(str(target.path), scheduler=SAMPLER)
    if target.kind == "final":
        return load_pipeline(source, lora=target.path, scheduler=SAMPLER)
    pipe = load_pipeline(source, scheduler=SAMPLER)
    if target.kind == "checkpoint":
        _load_checkpoint_weights(pipe, target.path, run.adapter)
    return pipe


def _load_checkpoint_weights(pipe, folder: Path, adapter) -> None:
    """A checkpoint's trained weights into ``pipe``: its LoRA files (peft keys, as training saved
    them) into adapters of the run's shape, or a full fine-tune's model files (accelerate's: model =
    the UNet, model_1 = the text encoder)."""
    from safetensors.torch import load_file

    from dreambooth_kit.training.adapters import add_lora
    from dreambooth_kit.training.checkpoint_index import LORA_SUFFIX
    from dreambooth_kit.training.lora_state import load_lora_file
    from dreambooth_kit.training.pivotal import CHECKPOINT_FILE as PIVOTAL_FILE
    from dreambooth_kit.training.pivotal import apply_vectors

    if adapter.type == "full":
        if not (folder / "model.safetensors").is_file():  # scoring the base weights as this step: never
            raise EvaluateError(
                f"{folder} holds no model.safetensors (the trained UNet): it cannot be scored; "
                "leave it out with --checkpoints"
            )
        for name, model in (("model", pipe.unet), ("model_1", pipe.text_encoder)):
            if (folder / f"{name}.safetensors").is_file():
                model.load_state_dict(load_file(folder / f"{name}.safetensors"))
        return
    add_lora(pipe.unet, pipe.text_encoder, adapter)
    for name, model in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder)):
        if (folder / f"{name}{LORA_SUFFIX}").is_file():
            load_lora_file(model, folder / f"{name}{LORA_SUFFIX}")
    if (folder / PIVOTAL_FILE).is_file():  # adapter.pivotal: the step's identifier vectors
        apply_vectors(pipe, load_file(folder / PIVOTAL_FILE))
    pipe.to(pipe.device)  # the new adapter layers are made on the CPU


# ------------------------------------------------------------------ the run's table


@dataclass
class EvalResult:
    rows: list[dict]  # this evaluation's rows, by step
    best: dict | None
    reason: str
    folder: Path
    made: int = 0  # images generated by this call
    cached_rows: int = 0  # rows taken from metrics.csv (their images not even read)
    reused: int = 0  # images loaded from an earlier call
    files: dict[str, Path] = field(default_factory=dict)


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for r in csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))):
        if set(COLUMNS) <= set(r):
            rows.append({**r, "step": int(r["step"]), "images": int(r["images"])} | _floats(r))
    return rows


def _floats(r: dict) -> dict:
    return {m: (float(r[m]) if r[m] not in ("", None) else None) for m in (*METRICS, *ERRORS)}


def write_rows(path: Path, rows: Sequence[dict]) -> Path:
    from dreambooth_kit.util.atomic import write_text

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in sorted(rows, key=lambda r: (r["settings"], r["step"], r["checkpoint"])):
        w.writerow(
            {
                k: ("" if r.get(k) is None else f"{r[k]:.4f}" if k in (*METRICS, *ERRORS) else r[k])
                for k in COLUMNS
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, buf.getvalue())


def evaluate(
    run: str | Path,
    *,
    checkpoints: str = "all",
    prompts: str | None = None,
    seeds: int | None = None,
    photos: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> EvalResult:
    """Score the run's checkpoints (see the module docstring) and write ``<run>/eval/``.

    ``prompts`` ("paper" or a file), ``seeds`` and ``overrides`` (``evaluate.steps=20`` ...) change
    the run's evaluate section for this call; ``photos``: the subject's photos when they are no
    longer at the run's ``data.instance_dir``."""
    from dreambooth_kit.config import load_config
    from dreambooth_kit.evaluation.encoders import load_encoders
    from dreambooth_kit.inference.pipeline import default_device
    from dreambooth_kit.training.layout import RunLayout
    from dreambooth_kit.training.plan import eval_spec
    from dreambooth_kit.training.runfolder import Run

    run = Path(run)
    layout = RunLayout(run)
    if not layout.config.is_file():
        raise EvaluateError(f"{run}: not a training run (no config.yaml); give the run's output_dir")
    extra = [*overrides, *([f"evaluate.prompts={prompts}"] if prompts else [])]
    extra += [f"evaluate.seeds={seeds}"] if seeds is not None else []
    cfg = load_config(layout.config, extra)
    spec = eval_spec(cfg)
    folder = Path(photos) if photos else spec.photos
    refs = load_photos(folder)
    # First: a judge that cannot score these photos is refused before any model loads or image is drawn.
    s = cfg.evaluate
    check_encoders_know_photos(
        refs, folder, subject_encoder=s.subject_encoder, prompt_encoder=s.prompt_encoder
    )
    source = Run.open(run).model_source()
    if source is None:
        raise EvaluateError(
            f"{run}: model_source.json is missing; the run did not get past loading its model"
        )
    plan = plan_for(spec)
    targets = list_targets(
        run, checkpoints, adapter_type=cfg.adapter.type, max_steps=cfg.train.max_steps, base=cfg.evaluate.base
    )
    encoders = load_encoders(
        cfg.evaluate.subject_encoder, cfg.evaluate.prompt_encoder, device=default_device()
    )
    weights = RunWeights(source, cfg.adapter, cfg.to_dict())
    return _evaluate_targets(run / EVAL, targets, plan, encoders, refs, weights, cfg.evaluate.tolerance)


def _evaluate_targets(
    folder: Path, targets, plan: EvalPlan, encoders, refs, run: RunWeights, tolerance: float
) -> EvalResult:
    """Each target's row: from metrics.csv when its settings match, else generated and scored (the
    csv is rewritten after each target, so an interruption keeps what was done)."""
    csv_path = folder / "metrics.csv"
    old = read_rows(csv_path)
    result = EvalResult([], None, "", folder)
    # What a row depends on besides the weights: the images asked for, the encoders and the photos.
    scored_by = plan.fingerprint(f"{encoders.names} {_photos_hash(refs)}")
    for t in targets:
        fp = t.fingerprint(json.dumps(run.source.to_dict(), sort_keys=True))
        settings = f"{fp}-{scored_by}"
        done = next((r for r in old if r["checkpoint"] == t.name and r["settings"] == settings), None)
        if done is not None:
            result.rows.append(done)
            result.cached_rows += 1
            continue
        pipe = load_target(t, run)
        images = make_images(pipe, plan, folder / "images" / f"{t.name}-{fp}", progress=f"evaluate {t.name}")
        del pipe
        n = sum(map(len, images.by_prompt)) + len(images.class_images)
        result.made, result.reused = result.made + images.made, result.reused + n - images.made
        row = {
            k: (None if v is None else round(v, 4)) for k, v in score(plan, encoders, refs, images).items()
        }
        result.rows.append({"checkpoint": t.name, "step": t.step, **row, "images": n, "settings": settings})
        old = [r for r in old if r["checkpoint"] != t.name or r["settings"] != settings] + [result.rows[-1]]
        write_rows(csv_path, old)
        log.info("evaluate: %s scored (%d images, %d new)", t.name, n, images.made)
    result.rows.sort(key=lambda r: r["step"])
    result.best, result.reason = best_checkpoint(result.rows, tolerance)
    best = next((t for t in targets if result.best and t.name == result.best["checkpoint"]), None)
    if best is not None and best.kind == "checkpoint" and run.adapter.is_adapter:
        result.files["best_lora"] = export_best_lora(best, run, folder / BEST_LORA)
    result.files |= {
        "csv": write_rows(csv_path, old),
        "report": _write_report(folder / "report.md", result, plan, encoders.names),
        "plot": plot(result.rows, folder / "metrics.png", best=result.best),
    }
    return result


def _photos_hash(photos: Sequence) -> str:
    h = hashlib.sha256()
    for im in photos:
        h.update(repr(im.size).encode() + im.tobytes())
    return h.hexdigest()[:12]


def export_best_lora(target: Target, run: RunWeights, dest: Path) -> Path:
    """The checkpoint's LoRA as a diffusers LoRA folder (what `generate`, A1111 after `export` and
    `load_lora_weights` read), with the run's config beside it. Written again only when the best
    checkpoint changed (its name and weights hash are in ``dest/checkpoint.json``)."""
    from dreambooth_kit.training.outputs import write_lora
    from dreambooth_kit.util.atomic import write_json

    stamp = {"checkpoint": target.name, "step": target.step, "weights": target.fingerprint("")}
    record = dest / "checkpoint.json"
    if record.is_file() and json.loads(record.read_text()) == stamp:
        return dest
    from safetensors.torch import load_file

    from dreambooth_kit.training.pivotal import CHECKPOINT_FILE, embedding_files

    pipe = load_target(target, run)
    te = pipe.text_encoder if run.adapter.train_text_encoder else None
    pivotal = target.path / CHECKPOINT_FILE
    extra = embedding_files(load_file(pivotal)) if pivotal.is_file() else None
    write_lora(run.adapter, run.config, pipe.unet, te, dest, extra=extra)
    write_json(record, stamp)
    return dest


def _write_report(path: Path, result: EvalResult, plan: EvalPlan, encoders: str) -> Path:
    from dreambooth_kit.util.atomic import write_text

    shown = [m for m in METRICS if any(r[m] is not None for r in result.rows)]
    lines = [
        "# Evaluation",
        "",
        f"{len(plan.prompts)} prompts x {len(plan.seeds)} seeds and {len(plan.class_seeds)} samples of "
        f"{plan.class_prompt!r} per checkpoint; {plan.steps} DPM-Solver++ steps, guidance "
        f"{plan.guidance_scale}, {plan.resolution} px; encoders: {encoders}.",
        "",
        "| checkpoint | step | " + " | ".join(shown) + " |",
        "| --- | --- | " + " | ".join("---" for _ in shown) + " |",
    ]
    for r in result.rows:
        cells = ["" if r[m] is None else f"{r[m]:.3f}" for m in shown]
        lines.append(f"| {r['checkpoint']} | {r['step']} | " + " | ".join(cells) + " |")
    lines += ["", "Higher is better except PRES (class-prompt samples that look like the subject).", ""]
    if result.best is not None:
        lines += [f"**Best: {result.best['checkpoint']}** (step {result.best['step']}): {result.reason}.", ""]
        if "best_lora" in result.files:
            lines.append(
                f"Its LoRA, in the final LoRA's format (diffusers, with adapter metadata): `{EVAL}/{BEST_LORA}/`; "
                f"`dreambooth-kit generate --lora {EVAL}/{BEST_LORA} ...` or `dreambooth-kit export` load it."
            )
    else:
        lines.append(result.reason)
    lines += ["", "![metrics over steps](metrics.png)", ""]
    return write_text(path, "\n".join(lines))


def plot(rows: Sequence[dict], path: Path, *, best: dict | None = None) -> Path:
    """One panel per metric over steps (the base model at step 0), the best checkpoint marked."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt

    from dreambooth_kit.util.atomic import writing

    shown = [m for m in METRICS if any(r[m] is not None for r in rows)]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 3.0), squeeze=False)
    for ax, m in zip(axes[0], shown, strict=True):
        for label, mine in (("raw", False), ("EMA", True)):  # train.ema: the average is a line of its own
            pts = [(r["step"], r[m]) for r in rows if r[m] is not None and _is_ema(r) == mine]
            pts = [(0, r[m]) for r in rows if mine and pts and r["checkpoint"] == "base"] + pts
            if pts:
                ax.plot([s for s, _ in pts], [v for _, v in pts], marker="o", label=label)
        if any(_is_ema(r) for r in rows):
            ax.legend(fontsize=7)
        if best is not None and best[m] is not None:
            ax.axvline(best["step"], color="tab:green", linestyle="--", linewidth=1)
        ax.set_title(m + (" (lower is better)" if m == "pres" else ""), fontsize=9)
        ax.set_xlabel("step")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with writing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path


def _is_ema(row: dict) -> bool:
    return str(row["checkpoint"]).endswith("-ema")


# ------------------------------------------------------------------ during training

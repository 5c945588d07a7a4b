"""What a training run tells its user: the plan before the long work, a measured time estimate once
the first steps are done, and a summary at the end with every output's path and the commands to run
next. Pure text from plain values; ``train()`` logs it (main process only).

The estimate is measured, never guessed from a table: the same config takes 0.2 s a step for the tiny
model on 2 CPU cores and ~1 s for SD 2.1-base on a T4, so only the run itself knows.
"""

from __future__ import annotations

import shlex
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# Steps timed before the estimate is printed. The first step also pays for one-off work (autotuning,
# allocator warm-up: 1.4 s against 0.6 s for the next ones with the tiny model), so it is left out.
ETA_AFTER_STEPS = 10


@dataclass(frozen=True)
class Plan:
    """The facts of a run the user should see before it starts (from the config and the photo check)."""

    model: str
    photos: int
    photo_dir: str
    instance_prompt: str
    resolution: int
    class_images: int  # wanted per the config; 0 without class-image prior preservation
    class_prompt: str
    class_dir: str
    prior: str  # "class images", "teacher (no class images)" or "off"
    adapter: str  # "LoRA rank 4 (UNet + text encoder)" / "full fine-tune (UNet)"
    steps: int
    resume_from: str | None  # the checkpoint folder's name, when resuming
    batch_size: int
    accumulation: int
    processes: int
    device: str
    precision: str
    checkpoint_every: int | None
    validation_every: int | None
    output_dir: str
    # data.buckets: how many photos train at each size ("3 at 512x512, 2 at 640x384"); None: squares
    buckets: str | None = None


def plan_text(p: Plan) -> str:
    per_step = p.batch_size * p.accumulation * p.processes
    epochs = p.steps * per_step / max(p.photos, 1)
    start = f", resuming from {p.resume_from}" if p.resume_from else ""
    rows = [
        ("model", p.model),
        (
            "photos",
            f"{p.photos} in {p.photo_dir} ({p.instance_prompt!r}, {p.buckets or f'{p.resolution} px'})",
        ),
        ("prior", _prior(p)),
        ("adapter", p.adapter),
        (
            "steps",
            f"{p.steps}{start}: batch {p.batch_size} x {p.accumulation} accumulation x {p.processes} "
            f"process{'es' if p.processes > 1 else ''} = {per_step} photo{'s' if per_step > 1 else ''} a step, "
            f"{epochs:.1f} epochs of the {p.photos} photos",
        ),
        ("device", f"{p.device}, precision {p.precision}"),
        ("checkpoints", f"every {p.checkpoint_every} steps" if p.checkpoint_every else "at the end only"),
        ("validation", f"every {p.validation_every} steps" if p.validation_every else "off"),
        ("output", p.output_dir),
        ("time", f"estimated after the first {ETA_AFTER_STEPS} steps (measured on this machine)"),
    ]
    return _table("training plan", rows)


def _prior(p: Plan) -> str:
    if p.prior != "class images":
        return p.prior
    return f"{p.class_images} class images of {p.class_prompt!r} in {p.class_dir}"


def eta_text(step_seconds: Sequence[float], step: int, max_steps: int) -> str | None:
    """After :data:`ETA_AFTER_STEPS` steps of this session: their pace and the time left, else None."""
    if len(step_seconds) != ETA_AFTER_STEPS or step >= max_steps:
        return None
    pace = statistics.median(step_seconds[1:])
    return (
        f"{ETA_AFTER_STEPS} steps in {sum(step_seconds):.1f} s ({pace:.2f} s a step): about "
        f"{duration(pace * (max_steps - step))} to step {max_steps}, plus validation and checkpoints"
    )


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, sec = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {sec} s"
    return f"{minutes // 60} h {minutes % 60} min"


@dataclass(frozen=True)
class Outcome:
    """Where a finished run put things (absolute paths) and what it cost."""

    output_dir: Path
    final_dir: Path  # <run>/lora or <run>/pipeline
    kind: str  # adapter.type
    model: str  # the base model, as `generate --base` takes it
    prompt: str  # the instance prompt
    seed: int
    steps: int
    seconds: float
    losses: Sequence[float]
    exports: Sequence[Path] = ()


def summary_text(o: Outcome) -> str:
    out = o.output_dir
    loss = f", loss {o.losses[0]:.4f} -> {o.losses[-1]:.4f}" if o.losses else ""
    rows = [("steps", f"{o.steps} in {duration(o.seconds)}{loss}")]
    if o.kind != "full":
        rows.append(("LoRA", str(o.final_dir / "pytorch_lora_weights.safetensors")))
    else:
        rows.append(("pipeline", str(o.final_dir)))
    rows += [(label, str(out / name)) for label, name in _FOLDERS if (out / name).exists()]
    rows += [("export", str(path)) for path in o.exports]
    base = str(o.final_dir) if o.kind == "full" else o.model
    generate = ["dreambooth-kit", "generate", "--base", base]
    generate += ["--lora", str(o.final_dir)] if o.kind != "full" else []
    generate += ["--prompt", o.prompt, "--seed", str(o.seed), "--out", str(out / "outputs")]
    rows.append(("next", shlex.join(generate)))
    if o.kind != "full":
        # A DoRA has no kohya export (export.py says why): the merged model is the way to A1111.
        fmt = "single-file" if o.kind == "dora" else "kohya"
        rows.append(("", shlex.join(["dreambooth-kit", "export", "--run", str(out), "--format", fmt])))
        rows.append(("", shlex.join(["dreambooth-kit", "evaluate", "--run", str(out)])))
    return _table("training done", rows)


# The run folder's parts a user looks for, in the order they are listed.
_FOLDERS = (
    ("EMA", "lora_ema"),  # train.ema
    ("EMA", "pipeline_ema"),
    ("checkpoints", "checkpoints"),
    ("samples", "samples"),
    ("class images", "class_images"),
    ("config", "config.yaml"),
)


def _table(title: str, rows: Sequence[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in rows)
    return "\n".join(
        [f"== {title} =="]
        + [f"{label:<{width}} : {text}" if label else f"{'':<{width}}   {text}" for label, text in rows]
    )

"""The offline demo: built-in tiny model -> photo checks -> class images -> LoRA with prior
preservation -> seeded images. Works from an installed package: the five demo photos are package
data (``dreambooth_kit/demo_subject``, 17 KB), not files of a source checkout."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path


def demo_photos() -> Path:
    """The folder of the five demo photos inside the installed package."""
    folder = Path(str(resources.files("dreambooth_kit") / "demo_subject"))
    if not folder.is_dir():  # a zipped install would need extracting; pip never installs one
        raise FileNotFoundError(f"the demo photos are missing from the installed package ({folder})")
    return folder


def run_demo(photos: str | Path | None = None, out: str | Path = "runs/demo", steps: int = 30) -> list[str]:
    """Run the demo end to end into ``out``; returns the summary lines it prints."""
    from .config import TINY_MODEL, load_config
    from .inference import generate, load_pipeline, save_images
    from .train import train

    t0 = time.perf_counter()
    photos = Path(photos) if photos else demo_photos()
    out = Path(out)
    cfg = load_config(
        "tiny.yaml",
        {
            "data.instance_dir": str(photos),
            "prior.class_dir": str(out / "class_images"),
            "train.output_dir": str(out),
            "train.max_steps": steps,
            "train.overwrite": True,  # the demo's own run folder: rerunning replaces its LoRA
        },
    )
    result = train(cfg)
    pipe = load_pipeline(TINY_MODEL, lora=result.lora_dir)
    results = generate(
        pipe, cfg.data.instance_prompt, seed=cfg.train.seed, num_images=4, steps=4, height=64, width=64
    )
    paths = save_images(results, out / "samples")
    return [
        "",
        "== dreambooth-kit demo: done ==",
        f"model        : {TINY_MODEL} (random weights, SD 2.1 shapes, v-prediction)",
        f"photos       : {photos.resolve()}",
        f"class images : {cfg.prior.class_dir} ({result.class_images_generated} generated this run)",
        f"training     : {result.steps} steps, loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}",
        f"LoRA         : {result.lora_path}",
        f"images       : {', '.join(str(p) for p in paths)}",
        f"total time   : {time.perf_counter() - t0:.1f} s",
    ]

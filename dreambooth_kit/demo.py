"""The offline demo: the built-in toy model (pretrained on the toy world, so it has a real prior to
lose) -> photo checks -> class images -> LoRA with prior preservation -> seeded images of the
subject in new contexts, beside the base model's images for the same prompts. Works from an
installed package: the subject's photos are rendered at run time and the model's weights are package
data (``dreambooth_kit/toy/weights``)."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path


def demo_photos() -> Path:
    """The folder of the five photos of a toy robot inside the installed package (the tests' subject
    for the random-weight tiny model)."""
    folder = Path(str(resources.files("dreambooth_kit") / "demo_subject"))
    if not folder.is_dir():  # a zipped install would need extracting; pip never installs one
        raise FileNotFoundError(f"the demo photos are missing from the installed package ({folder})")
    return folder


def run_demo(
    photos: str | Path | None = None, out: str | Path = "runs/demo", steps: int | None = None
) -> list[str]:
    """Run the demo end to end into ``out``; returns the summary lines it prints."""
    from dreambooth_kit.config import TOY_MODEL, load_config
    from dreambooth_kit.inference.generate import generate
    from dreambooth_kit.inference.images import make_grid, save_images
    from dreambooth_kit.inference.pipeline import load_pipeline
    from dreambooth_kit.toy import world
    from dreambooth_kit.toy.evaluate import CONTEXT_PROMPTS
    from dreambooth_kit.training.train import train

    t0 = time.perf_counter()
    out = Path(out)
    if photos is None:
        photos = out / "photos"
        world.write_subject_photos(photos)  # the subject "zwx ball": 5 renders, new each run, same bytes
    photos = Path(photos)
    overrides = {
        "data.instance_dir": str(photos),
        "prior.class_dir": str(out / "class_images"),
        "train.output_dir": str(out),
        "train.overwrite": True,  # the demo's own run folder: rerunning replaces its LoRA
    }
    if steps is not None:
        overrides["train.max_steps"] = steps
    cfg = load_config("toy.yaml", overrides)
    result = train(cfg)
    rows = []
    for lora in (None, result.lora_dir):  # the base model's row, then the tuned row: same prompts, same seeds
        pipe = load_pipeline(TOY_MODEL, lora=lora, scheduler="dpmpp_2m")
        row = []
        for i, prompt in enumerate(CONTEXT_PROMPTS):
            row += generate(
                pipe, prompt, seed=cfg.train.seed + i, steps=20, guidance_scale=4.0, height=32, width=32
            )
        rows.append(row)
    paths = save_images(rows[1], out / "samples", overwrite=True)  # the demo's own folder, remade each run
    grid = make_grid([r.image.resize((128, 128), 0) for row in rows for r in row], cols=len(CONTEXT_PROMPTS))
    grid_path = out / "demo_grid.png"
    grid.save(grid_path)
    return [
        "",
        "== dreambooth-kit demo: done ==",
        f"model        : {TOY_MODEL} (pretrained on the toy world, 32 px, v-prediction)",
        f"photos       : {photos.resolve()} (the subject: {world.IDENTIFIER} ball)",
        f"class images : {Path(cfg.prior.class_dir).resolve()} ({result.class_images_generated} generated this run)",
        f"training     : {result.steps} steps, loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}",
        f"LoRA         : {result.lora_path}",
        f"images       : {', '.join(str(Path(p).resolve()) for p in paths)}",
        f"grid         : {grid_path.resolve()} (top: base model, bottom: with the LoRA; prompts: {'; '.join(CONTEXT_PROMPTS)}; "
        f"no photo shows the {world.NEW_CONTEXT_BACKGROUND} background: that column is a new context)",
        f"total time   : {time.perf_counter() - t0:.1f} s",
    ]

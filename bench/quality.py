"""Does it learn? DreamBooth's claims measured in the toy world, as a Markdown table and a PNG grid.

For each condition (the base model; LoRA without / with prior preservation, by class images or by the
base model as teacher; full fine-tune without / with it), over several training seeds: train on the subject's 5 photos with ``configs/toy.yaml``
(the seed-000 recipe scaled down), sample "a photo of zwx ball" (alone and on each background) and
"a photo of a ball", and score them with the toy judge (dreambooth_kit/toy/evaluate.py says what each
number means). Reports what comes out: mean ± spread over seeds.

Usage: python bench/quality.py [--seeds 3] [--steps 800] [--per-prompt 8] [--out runs/quality]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

CONDITIONS = {
    "base model": None,
    "LoRA no prior": {"adapter.type": "lora", "prior.with_prior_preservation": False},
    "LoRA + prior": {"adapter.type": "lora", "prior.with_prior_preservation": True},
    # No class images: the frozen base model's own class-prompt predictions are the prior's target.
    "LoRA + teacher prior": {
        "adapter.type": "lora",
        "prior.with_prior_preservation": True,
        "prior.mode": "teacher",
    },
    # Options (issue: what kohya/OneTrainer users expect), each on the LoRA + prior recipe.
    "LoRA + prior + caption dropout 0.5": {
        "adapter.type": "lora",
        "prior.with_prior_preservation": True,
        "data.caption_dropout": 0.5,
    },
    # The same training as LoRA + prior (the average does not feed back): its lora_ema/ is scored.
    # data.masks' test bed: the photos show a black box beside the subject (world.py, clutter), which
    # no caption names. Without masks against masks that keep the box out of the instance loss.
    "LoRA + prior (cluttered photos)": {
        "adapter.type": "lora",
        "prior.with_prior_preservation": True,
        "world.clutter": True,
    },
    "LoRA + prior + masks (cluttered photos)": {
        "adapter.type": "lora",
        "prior.with_prior_preservation": True,
        "world.clutter": True,
        "data.masks": "MASKS",
    },
    # Nothing of the background trains: does the box stay out then?
    "LoRA + prior + masks at weight 0 (cluttered photos)": {
        "adapter.type": "lora",
        "prior.with_prior_preservation": True,
        "world.clutter": True,
        "data.masks": "MASKS",
        "train.unmasked_weight": 0.0,
    },
    # data.buckets' test bed: photos 2 and 3 are 5:3 and 3:5 with the subject near one end
    # (world.py, framing), which a centre square crop cuts. Centre crops against buckets.
    "LoRA + prior (framed photos)": {
        "adapter.type": "lora",
        "prior.with_prior_preservation": True,
        "world.framing": True,
    },
    "LoRA + prior + buckets (framed photos)": {
        "adapter.type": "lora",
        "prior.with_prior_preservation": True,
        "world.framing": True,
        "data.buckets": True,
        "data.bucket_step": 8,  # the toy model's VAE 4x and UNet 2x
    },
    # The identifier's token vector trained with the LoRA (the same learning rate).
    "LoRA + prior + pivotal": {
        "adapter.type": "lora",
        "prior.with_prior_preservation": True,
        "adapter.pivotal": True,
    },
    # The adapter types at the LoRA recipe's rank (8), alpha (8) and learning rate (1e-3).
    "DoRA + prior": {"adapter.type": "dora", "prior.with_prior_preservation": True},
    "LoHa + prior": {"adapter.type": "loha", "prior.with_prior_preservation": True},
    "LoKr + prior": {"adapter.type": "lokr", "prior.with_prior_preservation": True},
    "LoRA + prior + EMA": {
        "adapter.type": "lora",
        "prior.with_prior_preservation": True,
        "train.ema": True,
    },
    "full no prior": {
        "adapter.type": "full",
        "prior.with_prior_preservation": False,
        "train.learning_rate": 1e-4,
    },
    "full + prior": {
        "adapter.type": "full",
        "prior.with_prior_preservation": True,
        "train.learning_rate": 1e-4,
    },
}
COLUMNS = [
    ("subject_fidelity", "subject fidelity ↑"),
    ("subject_rate", "subject rate ↑"),
    ("subject_rate_strict", "strict ↑"),
    ("context_background", "background follows prompt ↑"),
    ("context_subject_rate", "subject on that background ↑"),
    ("new_context_background", "new context: gray background ↑"),
    ("new_context_subject_rate", "subject on gray ↑"),
    ("new_context_subject_rate_strict", "strict ↑"),
    ("subject_clutter", "clutter drawn ↓"),
    ("class_subject_rate", "'a ball' is the subject ↓"),
    ("class_plain", "'a ball' is a plain ball ↑"),
    ("pres", "PRES ↓"),
    ("div", "DIV ↑"),
]


def run_condition(name: str, overrides: dict | None, seed: int, out: Path, steps: int, per_prompt: int):
    from dreambooth_kit.config import TOY_MODEL, load_config
    from dreambooth_kit.toy import world
    from dreambooth_kit.toy.evaluate import score
    from dreambooth_kit.training.train import train

    overrides = dict(overrides) if overrides is not None else None
    clutter = bool(overrides and overrides.pop("world.clutter", False))
    framing = bool(overrides and overrides.pop("world.framing", False))
    kind = "photos-clutter" if clutter else "photos-framed" if framing else "photos"
    photos, masks = out / kind, out / "masks-clutter"
    if not photos.is_dir():
        world.write_subject_photos(photos, clutter=clutter, masks=masks if clutter else None, framing=framing)
    if overrides is None:
        return score(TOY_MODEL, per_prompt=per_prompt), 0.0
    if overrides.get("data.masks") == "MASKS":
        overrides["data.masks"] = str(masks)
    run = out / f"{name.replace(' ', '_').replace(',', '').replace('+', 'with')}-seed{seed}"
    cfg = load_config(
        "toy.yaml",
        {
            "data.instance_dir": str(photos),
            "prior.class_dir": str(out / "class_images"),
            "train.output_dir": str(run),
            "train.overwrite": True,
            "train.seed": seed,
            "train.max_steps": steps,
            **overrides,
        },
    )
    t0 = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - t0
    if cfg.adapter.type == "full":
        return score(result.pipeline_dir, per_prompt=per_prompt), seconds
    lora = run / "lora_ema" if cfg.train.ema else result.lora_dir
    return score(TOY_MODEL, lora=lora, per_prompt=per_prompt), seconds


def grid(out: Path, rows: dict[str, Path | None], steps: int) -> Path:
    """One row per condition: 'zwx ball' on each background, then four 'a ball' samples (seed 0 run)."""
    from PIL import Image, ImageDraw

    from dreambooth_kit.config import TOY_MODEL
    from dreambooth_kit.toy.evaluate import CLASS_PROMPT, CONTEXT_PROMPTS
    from dreambooth_kit.toy.model import sample

    cell, label = 96, 150
    n_cols = len(CONTEXT_PROMPTS) + 4
    sheet = Image.new("RGB", (label + n_cols * cell, len(rows) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (name, weights) in enumerate(rows.items()):
        model, lora = (
            (weights, None) if weights and (weights / "model_index.json").exists() else (TOY_MODEL, weights)
        )
        images = sample(model, CONTEXT_PROMPTS, per_combo=1, seed=7, lora=lora)
        images += sample(model, [CLASS_PROMPT], per_combo=4, seed=7, lora=lora)
        draw.text((6, r * cell + cell // 2 - 6), name, fill="black")
        for c, img in enumerate(images):
            sheet.paste(img.resize((cell, cell), Image.NEAREST), (label + c * cell, r * cell))
    path = out / "quality_grid.png"
    sheet.save(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--per-prompt", type=int, default=8)
    ap.add_argument("--out", default="runs/quality")
    ap.add_argument("--conditions", default=",".join(CONDITIONS))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    rows: dict[str, Path | None] = {}
    for name in args.conditions.split(","):
        seeds = [0] if CONDITIONS[name] is None else range(args.seeds)
        for seed in seeds:
            scores, seconds = run_condition(name, CONDITIONS[name], seed, out, args.steps, args.per_prompt)
            results.setdefault(name, []).append(dataclasses.asdict(scores) | {"train_s": seconds})
            print(f"{name} seed {seed}: {results[name][-1]}", flush=True)
        run = out / f"{name.replace(' ', '_').replace(',', '').replace('+', 'with')}-seed0"
        final = "pipeline" if "full" in name else "lora_ema" if "EMA" in name else "lora"
        rows[name] = None if CONDITIONS[name] is None else run / final
    (out / "quality.json").write_text(json.dumps(results, indent=2))
    header = "| condition | " + " | ".join(t for _, t in COLUMNS) + " | train s |"
    lines = [header, "|" + " --- |" * (len(COLUMNS) + 2)]
    for name, rs in results.items():
        cells = []
        for key, _ in COLUMNS + [("train_s", "")]:
            vals = [r[key] for r in rs]
            spread = statistics.pstdev(vals) if len(vals) > 1 else 0.0
            cells.append(f"{statistics.mean(vals):.2f} ± {spread:.2f}" if len(vals) > 1 else f"{vals[0]:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    (out / "quality.md").write_text(table + "\n")
    print("\n" + table)
    print(f"\ngrid: {grid(out, rows, args.steps)}")


if __name__ == "__main__":
    main()

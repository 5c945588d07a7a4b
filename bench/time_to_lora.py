"""Time to a finished LoRA: the whole recipe's wall time, with the class-image store cold and warm.

Each row runs `dreambooth-kit train --config CONFIG` as a user does (a fresh process: imports,
preflight, class images, model loading, training, the final save) into a new output folder and a new
prior.class_dir:
  cold   the store is empty: every class image is generated
  warm   a second subject of the same class: the store holds the first run's class images
The "before step 1" column is the start-up: from the command's start to the first training step,
read off the log (the time the "step 1/N" line arrives, less the first step's own length, taken as
the time between the "step 1" and "step 2" lines).

Cases:
  tiny      tiny.yaml: the built-in random tiny model at 64 px, 10 class images, 20 steps
  toy       toy.yaml: the toy world at 32 px, 50 class images, 200 steps (800 in the recipe)
  sd21-512  SD 2.1-base shapes (random weights), 512 px, no prior preservation, 2 steps: the
            start-up at real size (building the model takes minutes and ~9 GB; add it with --cases)

Usage: python bench/time_to_lora.py [--cases tiny,toy] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = {  # name: (config, overrides)
    "tiny": ("tiny.yaml", ["train.max_steps=20"]),
    "toy": ("toy.yaml", ["train.max_steps=200"]),
    "sd21-512": ("sd21_base_lora.yaml", ["prior.with_prior_preservation=false", "train.max_steps=2",
                                         "train.mixed_precision=no", "train.gradient_checkpointing=false"]),
}  # fmt: skip


def run(name: str, workdir: Path, store: Path, label: str) -> dict:
    """One `dreambooth-kit train` in its own process; the times come from its log lines' arrival."""
    config, extra = CASES[name]
    out = workdir / f"{name}-{label}"
    args = [f"train.output_dir={out}", f"prior.class_dir={out}/class_images", "train.log_every=1", *extra]
    args += _model_args(name, workdir)
    env = {**os.environ, "DREAMBOOTH_KIT_CLASS_STORE": str(store), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "dreambooth_kit", "train", "--config", config, *args]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, cwd=workdir)
    seen: dict[str, float] = {}
    for line in proc.stderr:
        for mark in ("step 1/", "step 2/"):
            if mark in line and mark not in seen:
                seen[mark] = time.perf_counter() - start
        if "class images: " in line and "class" not in seen:  # the first: copied, generating or using
            seen["class"] = line.strip().split("class images: ", 1)[1].split(" (")[0].split(" in /")[0]
    if proc.wait():
        raise SystemExit(f"{name} {label}: exit {proc.returncode}")
    total = time.perf_counter() - start
    first_step = seen["step 2/"] - seen["step 1/"]
    return {
        "case": name, "store": label, "total_s": total, "before_step_1_s": seen["step 1/"] - first_step,
        "class_images": seen.get("class", "none"),
    }  # fmt: skip


def _model_args(name: str, workdir: Path) -> list[str]:
    if name == "tiny":
        return [f"data.instance_dir={REPO / 'dreambooth_kit' / 'demo_subject'}"]
    if name == "toy":
        from dreambooth_kit.toy.world import write_subject_photos

        photos = workdir / "toy-photos"
        if not photos.exists():
            write_subject_photos(photos)
        return [f"data.instance_dir={photos}"]
    from dreambooth_kit.tiny import build_tiny_sd2

    model = workdir / "sd21-base-random"
    if not model.exists():
        build_tiny_sd2(model, shape="sd21-base", prediction_type="epsilon")
    return [f"model.pretrained={model}", f"data.instance_dir={REPO / 'dreambooth_kit' / 'demo_subject'}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="tiny,toy")
    ap.add_argument("--workdir", default=None, help="keep runs and built models here (default: a temp dir)")
    args = ap.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dbk-ttl-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for name in args.cases.split(","):
            store = workdir / f"store-{name}-{time.time_ns()}"  # cold: a store no run has filled
            labels = ("cold", "warm") if name != "sd21-512" else ("no prior",)
            rows += [run(name, workdir, store, label) for label in labels]
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n{'case':<9} {'store':<9} {'total s':>8} {'before step 1 s':>16}  class images")
    for r in rows:
        print(
            f"{r['case']:<9} {r['store']:<9} {r['total_s']:>8.1f} {r['before_step_1_s']:>16.1f}  {r['class_images']}"
        )


if __name__ == "__main__":
    main()

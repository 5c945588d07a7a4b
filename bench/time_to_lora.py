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

--stop: train.stop=never (800 steps) against train.stop=auto on the toy world, with and without
prior preservation, over training seeds (--seeds, default 3), in this process: wall time, the steps
trained, the step whose weights the final LoRA holds, and the final LoRA scored by the quality
judge (bench/quality.py's scores: subject fidelity, subject rate, PRES). The auto runs score every
100 steps with the toy judge (the evaluate section of toy.yaml); each auto run's scores also give
the stop step other stop_patience values would have chosen (the rule reads only the scores so far).

Usage: python bench/time_to_lora.py [--cases tiny,toy] [--workdir DIR]
       python bench/time_to_lora.py --stop [--seeds 3] [--workdir DIR]
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
    from dreambooth_kit.models.tiny import build_tiny_sd2

    model = workdir / "sd21-base-random"
    if not model.exists():
        build_tiny_sd2(model, shape="sd21-base", prediction_type="epsilon")
    return [f"model.pretrained={model}", f"data.instance_dir={REPO / 'dreambooth_kit' / 'demo_subject'}"]


STOP_EVERY = 100  # steps between the auto runs' scores


def stop_run(workdir: Path, stop: str, prior: bool, seed: int, steps: int = 800) -> dict:
    """One toy training run, in this process, and its final LoRA's quality scores."""
    from dreambooth_kit.config import TOY_MODEL, load_config
    from dreambooth_kit.toy import world
    from dreambooth_kit.toy.evaluate import score
    from dreambooth_kit.training.train import train

    photos = workdir / "toy-photos"
    if not photos.exists():
        world.write_subject_photos(photos)
    out = workdir / f"{stop}-{'prior' if prior else 'noprior'}-seed{seed}"
    over = {"data.instance_dir": str(photos), "prior.class_dir": str(workdir / "class_images"),
            "train.output_dir": str(out), "train.overwrite": True, "train.seed": seed,
            "prior.with_prior_preservation": prior, "train.stop": stop, "train.max_steps": steps}  # fmt: skip
    if stop == "auto":
        over["validation.every_steps"] = STOP_EVERY
    start = time.perf_counter()
    result = train(load_config("toy.yaml", over))
    seconds = time.perf_counter() - start
    q = score(TOY_MODEL, lora=result.lora_dir)
    row = {"stop": stop, "prior": prior, "seed": seed, "seconds": seconds, "steps": result.steps,
           "weights_of": result.best_step or result.steps, "fidelity": q.subject_fidelity,
           "subject_rate": q.subject_rate, "pres": q.pres}  # fmt: skip
    if stop == "auto":
        row["stops_by_patience"] = _stops_by_patience(out)
    print(row, flush=True)
    return row


def _stops_by_patience(out: Path) -> dict[int, tuple]:
    """(stop step, best step) the rule gives over this run's scores for stop_patience 1..4."""
    import json

    from dreambooth_kit.training.stopping import AutoStop

    rows = json.loads((out / "eval" / "auto_stop.json").read_text())["scores"]
    found = {}
    for k in (1, 2, 3, 4):
        rule = AutoStop(0.02, k)
        for r in rows:
            rule.add(r["step"], {m: v for m, v in r.items() if m not in ("checkpoint", "step")})
            d = rule.decide()
            if d.stop:
                found[k] = (r["step"], d.best_step)
                break
        else:
            found[k] = (None, rule.decide().best_step)
    return found


def stop_study(workdir: Path, seeds: int) -> None:
    import statistics

    # The class images first, untimed: every run below reuses them, so no row pays for them.
    stop_run(workdir, "never", True, 99, steps=1)
    rows = [
        stop_run(workdir, stop, prior, seed)
        for prior in (True, False)
        for seed in range(seeds)
        for stop in ("never", "auto")
    ]
    print("\n| prior | stop | steps | weights of step | wall s | subject fidelity | subject rate | PRES |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for prior in (True, False):
        for stop in ("never", "auto"):
            rs = [r for r in rows if r["prior"] == prior and r["stop"] == stop]

            def cell(key: str, fmt: str = ".2f", rs=rs) -> str:
                vals = [r[key] for r in rs]
                return f"{statistics.mean(vals):{fmt}} ± {statistics.pstdev(vals):{fmt}}"

            print(f"| {'yes' if prior else 'no'} | {stop} | {cell('steps', '.0f')} | {cell('weights_of', '.0f')} "
                  f"| {cell('seconds', '.0f')} | {cell('fidelity')} | {cell('subject_rate')} | {cell('pres')} |")  # fmt: skip
    for r in rows:
        if r["stop"] == "auto":
            print(f"prior={r['prior']} seed={r['seed']}: (stop, best) by patience {r['stops_by_patience']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="tiny,toy")
    ap.add_argument("--workdir", default=None, help="keep runs and built models here (default: a temp dir)")
    ap.add_argument("--stop", action="store_true", help="train.stop never against auto (see above)")
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dbk-ttl-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.stop:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        stop_study(workdir, args.seeds)
        return
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

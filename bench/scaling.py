"""Multi-process scaling on CPU: seconds/step and examples/s at 1 and 2 processes, printed as a table.

Each row runs the README's multi-process command on the tiny model,
  ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node N bench/scaling.py --one CASE
which calls train() in every process (a gloo process group); the main process reports the median
step time after the warm-up. Every process trains train.batch_size=1 photo + 1 class image, so N
processes train 2 N examples per step: N times one process's batch, as `accelerate launch
--multi_gpu` does with one process per GPU.

Rows: 1 process x 1 thread, 1 process x 2 threads (all of a 2-core machine) and 2 processes x 1
thread each (torchrun's default). Cases:
  lora-64   LoRA r=4 at 64 px: the gradient all-reduce is 0.1 MB
  lora-256  LoRA r=4 at 256 px: 16x the compute per step, same all-reduce
  full-64   the whole UNet at 64 px: the all-reduce is every UNet gradient (7 MB for the tiny model)

Usage: python bench/scaling.py [--cases lora-64,lora-256,full-64] [--steps N]
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from _harness import child_result, parse_args

REPO = Path(__file__).resolve().parents[1]
CASES = {  # name: (adapter type, resolution, warm-up steps, timed steps)
    "lora-64": ("lora", 64, 3, 20),
    "lora-256": ("lora", 256, 2, 8),
    "full-64": ("full", 64, 3, 20),
}
LAYOUTS = [(1, 1), (1, 2), (2, 1)]  # (processes, threads per process)


def run_case(name: str, timed: int | None, workdir: Path) -> dict | None:
    """In every process under torchrun; returns the row on the main process only."""
    from PIL import Image

    from dreambooth_kit.config import load_config
    from dreambooth_kit.models.tiny import build_tiny_sd2
    from dreambooth_kit.training.train import train

    adapter, res, warmup, n = CASES[name]
    n = timed or n
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    model = workdir / "model"
    if rank == 0 and not model.exists():  # built by the parent before any launch; this is a fallback
        build_tiny_sd2(model, prediction_type="epsilon")
    # Class images already there (the benchmark times training, not sampling): one per photo.
    cls, photos = workdir / f"class-{res}", workdir / "photos"
    for i, photo in enumerate(sorted((REPO / "dreambooth_kit" / "demo_subject").glob("*.jpg"))):
        if rank == 0 and not (cls / f"c{i}.png").exists():
            cls.mkdir(exist_ok=True)
            Image.effect_noise((res, res), 40).convert("RGB").save(cls / f"c{i}.png")
            photos.mkdir(exist_ok=True)
            shutil.copy(photo, photos / photo.name)
    cfg = load_config(
        "tiny.yaml",
        {
            "model.pretrained": str(model),
            "model.native_resolution": res,
            "data.instance_dir": str(photos),
            "data.resolution": res,
            "prior.class_dir": str(cls),
            "prior.num_class_images": 5,
            "adapter.type": adapter,
            "train.output_dir": str(workdir / f"run-{name}-{world}-{os.environ['OMP_NUM_THREADS']}"),
            "train.overwrite": True,
            "train.max_steps": warmup + n,
            "train.log_every": 1000,
        },
    )
    result = train(cfg)
    if rank:
        return None
    step = statistics.median(result.step_seconds[warmup:])
    return {"case": name, "processes": world, "s_per_step": step, "examples_per_s": 2 * world / step}


def _launch(name: str, procs: int, threads: int, steps: int | None, workdir: Path) -> dict | None:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    cmd += [__file__, "--one", name, "--workdir", str(workdir)]
    cmd += ["--steps", str(steps)] if steps else []
    row = child_result(cmd, f"{name} x{procs}", env)
    return row and row | {"threads": threads}


def main() -> None:
    args = parse_args(__doc__, ",".join(CASES), "timed steps per row (default per case)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dbk-scaling-"))
    if args.one:
        row = run_case(args.one, args.steps, workdir)
        if row:
            print("RESULT " + json.dumps(row), flush=True)
        return
    from dreambooth_kit.models.tiny import build_tiny_sd2

    rows = []
    try:
        if not (workdir / "model").exists():
            build_tiny_sd2(workdir / "model", prediction_type="epsilon")
        for name in args.cases.split(","):
            rows += [r for p, t in LAYOUTS if (r := _launch(name, p, t, args.steps, workdir))]
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n{'case':<9} {'processes':>9} {'threads':>7} {'s/step':>8} {'examples/s':>10} {'vs 1x1':>7}")
    for r in rows:
        one = next(o for o in rows if o["case"] == r["case"] and o["processes"] == 1 and o["threads"] == 1)
        print(
            f"{r['case']:<9} {r['processes']:>9} {r['threads']:>7} {r['s_per_step']:>8.3f} "
            f"{r['examples_per_s']:>10.1f} {r['examples_per_s'] / one['examples_per_s']:>6.2f}x"
        )


if __name__ == "__main__":
    main()

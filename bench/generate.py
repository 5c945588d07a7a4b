"""Generation benchmark: seconds per image, printed as a table.

Rows: a bare diffusers StableDiffusionPipeline (the baseline), our API on the base model, with a
LoRA unfused, and with the LoRA fused. Same model, prompt, size, steps, sampler and seeds.
Each row: 1 warm-up image, then the median of N timed single-image calls.

Usage: python bench/generate.py [--shape tiny|sd21-base] [--steps 20] [--images 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

PROMPT = "a photo of zwx toy"


def _time(fn, n: int) -> float:
    fn()  # warm-up: first-call allocations, lazy imports
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _make_lora(model: Path, out: Path) -> Path:
    """A rank-4 LoRA with non-zero weights on all attention layers (what training produces)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from dreambooth_kit.config import AdapterConfig
    from dreambooth_kit.training.adapters import add_lora, lora_metadata, lora_state_dicts

    cfg = AdapterConfig(rank=4, alpha=4, init_lora_weights=False)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    add_lora(unet, None, cfg)
    sd, _ = lora_state_dicts(unet, None)
    StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=sd, unet_lora_adapter_metadata=lora_metadata(cfg)
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", choices=["tiny", "sd21-base"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--images", type=int, default=3, help="timed images per row")
    ap.add_argument("--workdir", default=None, help="keep built models here")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from diffusers import StableDiffusionPipeline

    from dreambooth_kit.inference.generate import generate
    from dreambooth_kit.inference.pipeline import load_pipeline
    from dreambooth_kit.models.tiny import build_tiny_sd2

    torch.set_num_threads(os.cpu_count() or 2)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="dbk-genbench-"))
    model = build_tiny_sd2(work / f"model-{args.shape}", shape=args.shape, prediction_type="epsilon")
    lora = _make_lora(model, work / "lora")
    size = 64 if args.shape == "tiny" else 512
    kw = {"steps": args.steps, "height": size, "width": size}

    def bare_row() -> float:
        pipe = StableDiffusionPipeline.from_pretrained(
            model, safety_checker=None, requires_safety_checker=False
        )
        pipe.set_progress_bar_config(disable=True)

        def run():
            g = [torch.Generator("cpu").manual_seed(1)]
            pipe(PROMPT, num_inference_steps=args.steps, height=size, width=size, generator=g).images[0]

        return _time(run, args.images)

    def our_row(**load_kw) -> float:  # one pipeline at a time: freed when the row is done
        pipe = load_pipeline(str(model), **load_kw)
        return _time(lambda: generate(pipe, PROMPT, seed=1, **kw), args.images)

    rows = [
        ("bare diffusers pipeline", bare_row()),
        ("ours: base", our_row()),
        ("ours: LoRA unfused", our_row(lora=lora)),
        ("ours: LoRA fused", our_row(lora=lora, fuse=True)),
    ]
    ref = rows[0][1]
    print(f"\n{args.shape}, {size}x{size}, {args.steps} steps, CFG 7.5, fp32 on {os.cpu_count()} CPU cores")
    print(f"{'row':<26} {'s/image':>9} {'vs bare':>8}")
    for name, s in rows:
        print(f"{name:<26} {s:>9.3f} {s / ref:>7.2f}x")


if __name__ == "__main__":
    main()

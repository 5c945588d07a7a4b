"""Class-image batch size: seconds per image and peak memory growth at each batch size, and what
``prior.sample_batch_size: auto`` chooses on this machine, printed as a table.

Each case runs in its own subprocess (its memory apart from the others'). DPM-Solver++ 2M, guidance
7.5, one prompt; the same seeds at every batch size. Memory: the growth of the peak resident memory
over one batch (Linux; on CUDA the same from torch.cuda's peak), the measurement "auto" itself uses.
Cases:
  tiny      the tiny SD2-shaped model, 64 px, 15 steps, 16 images per row
  toy       the toy world's model, 32 px, 15 steps, 32 images per row
  sd21-512  SD 2.1-base shapes with random weights at 512 px, 2 steps, one batch per row (~6 min;
            builds a 5.2 GB model first, ~9 GB of RAM in all)

Usage: python bench/class_batch.py [--cases tiny,toy,sd21-512] [--steps N]
"""

from __future__ import annotations

import time
from pathlib import Path

from _harness import parse_args, run_cases

CASES = {
    # name: (model, size, steps, images per row (None: one batch), batch sizes)
    "tiny": ("builtin:tiny-sd2", 64, 15, 16, [1, 2, 4, 8, 16]),
    "toy": ("builtin:toy-sd2", 32, 15, 32, [1, 2, 4, 8, 16]),
    "sd21-512": ("sd21-base", 512, 2, None, [1, 2, 4]),
}


def run_case(name: str, steps: int | None, workdir: Path) -> dict:
    import torch

    from dreambooth_kit.config import ModelConfig
    from dreambooth_kit.data.batching import probe_for
    from dreambooth_kit.inference.generate import generate
    from dreambooth_kit.inference.pipeline import load_pipeline
    from dreambooth_kit.models.source import resolve_source

    model, size, default_steps, n, batches = CASES[name]
    steps = steps or default_steps
    if model == "sd21-base":
        from dreambooth_kit.models.tiny import build_tiny_sd2

        model = str(
            build_tiny_sd2(workdir / "sd21-base-random", shape="sd21-base", prediction_type="epsilon")
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    source = resolve_source(ModelConfig(pretrained=model, native_resolution=size))
    pipe = load_pipeline(source, scheduler="dpmpp_2m", device=device)
    args = {"steps": steps, "height": size, "width": size, "seed": 0}
    generate(pipe, "a photo of a dog", num_images=1, **(args | {"steps": 1}))  # warm-up
    probe, rows = probe_for(device), []
    for bs in batches:
        count = n or bs
        probe.reset()
        start = time.perf_counter()
        generate(pipe, "a photo of a dog", num_images=count, batch_size=bs, **args)
        seconds = (time.perf_counter() - start) / count
        growth = probe.peak_growth()
        rows.append({"batch": bs, "s_per_image": seconds, "peak_gib": growth / 2**30 if growth else None})
    sizes: list[int] = []
    generate(pipe, "a photo of a dog", num_images=n or 4, batch_size="auto",
             on_batch=lambda b: sizes.append(len(b)), **args)  # fmt: skip
    return {"case": name, "device": device, "steps": steps, "rows": rows, "auto": sizes}


def main() -> None:
    args = parse_args(__doc__, "tiny,toy", "sampler steps per image (default per case)")
    results = run_cases(__file__, args, run_case)
    if args.one:
        return
    print(f"\n{'case':<9} {'device':<6} {'steps':>5} {'batch':>5} {'s/image':>8} {'peak GiB':>8}")
    for r in results:
        for row in r["rows"]:
            peak = f"{row['peak_gib']:.2f}" if row["peak_gib"] is not None else "-"
            print(
                f"{r['case']:<9} {r['device']:<6} {r['steps']:>5} {row['batch']:>5} "
                f"{row['s_per_image']:>8.3f} {peak:>8}"
            )
        print(f"{r['case']:<9} auto chose batches of {r['auto']}")


if __name__ == "__main__":
    main()

"""Class-image sampler and steps, measured on the toy world with the toy judge.

The diffusers example draws class images with the model's own scheduler at 50 steps: for SD 2.1-base
that is PNDM (PLMS), for SD 2.1 (768) DDIM. This draws the toy world's class prompt ("a photo of a
ball", guidance 4.0 as configs/toy.yaml) N times per row, the same seeds in every row, and scores the
set with the toy judge (dreambooth_kit/toy/judge.py, trained on rendered images only):
  class      share of images the judge calls a ball (class correctness), with its standard error
  DIV        mean pairwise 1 - cosine of the judge's features (diversity), with a bootstrap SE
  drift      1 - mean cosine between each image and the same seed's image in the reference row
             (DPM-Solver++ 2M at 50 steps): how far fewer steps move the pictures themselves
  s/image    sampling time per image here (2 CPU cores, batches of 25)

Rows: PNDM and DDIM at 50 steps (SD 2.1-base's and SD 2.1's schedulers), the toy model's own DDPM at
50, and DPM-Solver++ 2M at 50 (the reference), 25, 20, 15 and 10 steps.

Usage: python bench/class_sampler.py [--n 200]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

ROWS = [("pndm", 50), ("ddim", 50), (None, 50), ("dpmpp_2m", 50), ("dpmpp_2m", 25), ("dpmpp_2m", 20),
        ("dpmpp_2m", 15), ("dpmpp_2m", 10)]  # fmt: skip
PROMPT, GUIDANCE, SEED = "a photo of a ball", 4.0, 50_000


def draw(scheduler: str | None, steps: int, n: int) -> tuple[list, float]:
    from dreambooth_kit.config import ModelConfig
    from dreambooth_kit.inference.generate import generate
    from dreambooth_kit.inference.pipeline import load_pipeline
    from dreambooth_kit.models.source import resolve_source

    source = resolve_source(ModelConfig(pretrained="builtin:toy-sd2", native_resolution=32))
    pipe = load_pipeline(source, scheduler=scheduler, dtype="fp32", device="cpu")
    start = time.perf_counter()
    out = generate(pipe, PROMPT, seed=SEED, num_images=n, steps=steps, guidance_scale=GUIDANCE,
                   height=32, width=32, batch_size=25)  # fmt: skip
    return [r.image for r in out], (time.perf_counter() - start) / n


def div_and_se(feats: torch.Tensor, rounds: int = 200) -> tuple[float, float]:
    """Mean pairwise 1 - cosine, and its standard error by bootstrap over images."""

    def div(f: torch.Tensor) -> float:
        sim = f @ f.T
        n = f.shape[0]
        return float(1 - (sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))

    rng = np.random.default_rng(0)
    boots = [div(feats[torch.as_tensor(rng.integers(0, len(feats), len(feats)))]) for _ in range(rounds)]
    return div(feats), float(np.std(boots))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200, help="images per row (the same seeds in every row)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(os.cpu_count() or 2)
    from dreambooth_kit.toy.judge import Judge

    judge = Judge.load()
    results = {}
    for sched, steps in ROWS:
        images, per_image = draw(sched, steps, args.n)
        print(f"{sched or 'ddpm (own)'} {steps}: {per_image:.4f} s/image", file=sys.stderr, flush=True)
        feats = judge.features(images)
        is_ball = judge.predict(images)["class"] == "ball"
        results[(sched, steps)] = (feats, is_ball.mean(), np.sqrt(is_ball.mean() * (1 - is_ball.mean()) / len(images)),
                                   *div_and_se(feats), per_image)  # fmt: skip
    ref = results[("dpmpp_2m", 50)][0]
    print(f"\n{'sampler':<10} {'steps':>5} {'class':>14} {'DIV':>14} {'drift':>7} {'s/image':>8}")
    for (sched, steps), (feats, cls, cls_se, div, div_se, per_image) in results.items():
        drift = float(1 - (feats * ref).sum(1).mean())
        name = sched or "ddpm (own)"
        print(
            f"{name:<10} {steps:>5} {cls:>7.3f} ± {cls_se:.3f} {div:>7.3f} ± {div_se:.3f} {drift:>7.3f} {per_image:>8.4f}"
        )


if __name__ == "__main__":
    main()

"""Training-step benchmark: seconds/step and peak RSS, printed as a table.

Each case runs `train()` in its own subprocess so peak RSS (ru_maxrss) belongs to that case alone.
Cases:
  tiny      the tiny SD2-shaped model at 64 px, LoRA r=4, prior on (batch 1 + 1 class), 5 timed steps
  sd21-512  SD 2.1-base shapes with random weights at 512 px, same recipe, 2 timed steps (~1 min each)

  base-*    a same-machine baseline for each case: the per-step work of diffusers'
            train_dreambooth_lora.py (VAE-encode both images and run the text encoder every step,
            then UNet forward/backward and AdamW), written out plainly here, with the same modules.
            Published reference numbers come from another host; this column is comparable.

  *-nocache the same with data.cache_latents=false (VAE encode every step)
  tiny-fp16, tiny-bf16
            the tiny case with train.mixed_precision fp16 / bf16: on CPU fp16 is true fp16 (autocast
            + GradScaler, the code path a T4 runs), to show what that precision costs here
  sd21-512-dora, -loha, -lokr, -ema
            the sd21-512 case with adapter.type dora / loha / lokr, or train.ema: each option's cost

Usage: python bench/train_step.py [--cases tiny,sd21-512-nocache,...] [--steps N]
Reference (diffusers' train_dreambooth_lora.py on this machine kind, same recipe): tiny 0.10 s/step,
0.69 GB; SD 2.1 512 px 23.75 s/step, 11.96 GB.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
from pathlib import Path

from _harness import parse_args, run_cases

REPO = Path(__file__).resolve().parents[1]
REFERENCE = {"tiny": (0.10, 0.69), "sd21-512": (23.75, 11.96)}
REFERENCE |= {"tiny-nocache": REFERENCE["tiny"], "sd21-512-nocache": REFERENCE["sd21-512"]}
CASES = {
    # name: (model shape, resolution, warm-up steps, timed steps, cache latents)
    "tiny": ("tiny", 64, 2, 10, True),
    "tiny-nocache": ("tiny", 64, 2, 10, False),
    "sd21-512": ("sd21-base", 512, 1, 2, True),
    "sd21-512-nocache": ("sd21-base", 512, 1, 2, False),
    "tiny-fp16": ("tiny", 64, 2, 10, True),
    "tiny-bf16": ("tiny", 64, 2, 10, True),
}
PRECISION = {"tiny-fp16": "fp16", "tiny-bf16": "bf16"}  # every other case: fp32 ("no")
# The training options at SD 2.1-base size: what each costs per step against sd21-512 (LoRA).
OPTIONS = {
    "dora": {"adapter.type": "dora"},
    "loha": {"adapter.type": "loha"},
    "lokr": {"adapter.type": "lokr"},
    "ema": {"train.ema": True},
}
for _opt in OPTIONS:
    CASES[f"sd21-512-{_opt}"] = CASES["sd21-512"]


def _baseline_steps(model: Path, res: int, steps: int) -> list[float]:
    """The reference script's per-step work, without our caching: for a same-machine comparison."""
    import time

    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    from dreambooth_kit.config import AdapterConfig
    from dreambooth_kit.training.adapters import add_lora

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model, subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(model, subfolder="text_encoder").requires_grad_(False)
    vae = AutoencoderKL.from_pretrained(model, subfolder="vae").requires_grad_(False)
    unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet").requires_grad_(False)
    sched = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    params = add_lora(unet, None, AdapterConfig(rank=4, alpha=4))
    opt = torch.optim.AdamW(params, lr=1e-4)
    pixels = torch.randn(2, 3, res, res).clamp(-1, 1)  # 1 instance + 1 class image
    ids = tok(
        ["a photo of zwx toy", "a photo of a toy"], padding="max_length", max_length=77, return_tensors="pt"
    )
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
            cond = te(ids.input_ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (2,))
        pred = unet(sched.add_noise(latents, noise, t), t, cond).sample
        inst, prior = F.mse_loss(pred, noise, reduction="none").mean(dim=[1, 2, 3])
        (inst + prior).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return times


def run_case(name: str, timed: int | None, workdir: Path) -> dict:
    """Runs inside the child process."""
    import torch
    from PIL import Image

    from dreambooth_kit.config import load_config
    from dreambooth_kit.models.tiny import build_tiny_sd2
    from dreambooth_kit.training.train import train

    baseline = name.startswith("base-")
    shape, res, warmup, n, cache = CASES[name.removeprefix("base-")]
    n = timed or n
    torch.set_num_threads(os.cpu_count() or 2)
    model = build_tiny_sd2(workdir / f"model-{shape}", shape=shape, prediction_type="epsilon")
    if baseline:
        timed_steps = _baseline_steps(model, res, warmup + n)[warmup:]
        return {
            "case": name,
            "steps": len(timed_steps),
            "s_per_step": statistics.median(timed_steps),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        }
    # Prior on, with class images already there: the benchmark times training, not sampling.
    # One photo + one class image (the reference's batch 1 + 1): after the warm-up step every
    # image has been seen, so timed steps show the steady state of the latent cache.
    cls, photos = workdir / "class", workdir / "photos"
    cls.mkdir(exist_ok=True)
    photos.mkdir(exist_ok=True)
    Image.effect_noise((res, res), 40).convert("RGB").save(cls / "c0.png")
    shutil.copy(REPO / "dreambooth_kit" / "demo_subject" / "01.jpg", photos / "01.jpg")
    cfg = load_config(
        "tiny.yaml",
        {
            "model.pretrained": str(model),
            "model.native_resolution": res,
            "data.instance_dir": str(photos),
            "data.cache_latents": cache,
            "data.resolution": res,
            "prior.class_dir": str(cls),
            "prior.num_class_images": 1,
            "adapter.rank": 4,
            "adapter.alpha": 4,
            "train.output_dir": str(workdir / f"run-{name}"),
            "train.overwrite": True,
            "train.max_steps": warmup + n,
            "train.log_every": 1000,
            "train.mixed_precision": PRECISION.get(name, "no"),
            **OPTIONS.get(name.rsplit("-", 1)[-1], {}),
        },
    )
    result = train(cfg)
    timed_steps = result.step_seconds[warmup:]
    return {
        "case": name,
        "steps": len(timed_steps),
        "s_per_step": statistics.median(timed_steps),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
    }


def main() -> None:
    cases = "tiny,tiny-nocache,base-tiny,sd21-512,sd21-512-nocache,base-sd21-512"
    args = parse_args(__doc__, cases, "timed steps per case (default per case)")
    rows = run_cases(__file__, args, run_case)
    if args.one:
        return
    print(f"\n{'case':<17} {'steps':>5} {'s/step':>8} {'ref s/step':>10} {'peak RSS GB':>11} {'ref GB':>7}")
    for r in rows:
        ref = REFERENCE.get(r["case"].removeprefix("base-"))
        ref_s, ref_gb = (f"{ref[0]:.2f}", f"{ref[1]:.2f}") if ref else ("-", "-")
        print(
            f"{r['case']:<17} {r['steps']:>5} {r['s_per_step']:>8.3f} {ref_s:>10} "
            f"{r['peak_rss_gb']:>11.2f} {ref_gb:>7}"
        )


if __name__ == "__main__":
    main()

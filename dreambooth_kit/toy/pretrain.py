"""Pretrain ``builtin:toy-sd2`` on the toy world, in resumable stages, on CPU.

    python -m dreambooth_kit.toy.pretrain --out runs/toy-pretrain            # every stage, then ship
    python -m dreambooth_kit.toy.pretrain --out DIR --stage unet --steps 200   # one stage

Stages, each in ``DIR/<stage>/``, each skipped when its ``done.json`` exists, the long ones saving a
checkpoint every 250 steps that a rerun resumes from (a stop loses at most those steps):

1. ``vae``   the AutoencoderKL on renders, half of them with objects in random RGB colours or colour
             bands, so it reconstructs colours and patterns the world has no word for (the subject's,
             which it never sees); then the latent scaling factor (1 / std of the latents, the rule
             behind SD's 0.18215).
2. ``decoder`` the VAE's decoder fine-tuned alone (the encoder, so the latent space, unchanged).
3. ``judge`` the world's judge (:mod:`dreambooth_kit.toy.judge`), trained on renders only, half of
             them seen through the VAE (as every generated image is).
4. ``unet``  the UNet (v-prediction, SD 2.1's betas) on captioned renders of the seen combinations,
             with a frozen, randomly initialised text encoder (enough to condition on words), an EMA
             of the weights, and 10% empty captions so classifier-free guidance works.
5. ``eval``  samples of held-out prompts (combinations never seen), judged for class, colour and
             background.
6. ``ship``  writes the weights (fp16, ~11 MB) and ``record.json`` into ``dreambooth_kit/toy/weights``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from dreambooth_kit.toy import world
from dreambooth_kit.toy.model import sample
from dreambooth_kit.util.atomic import write_json, writing

STAGES = ("vae", "decoder", "judge", "unet", "eval", "ship")
CHECKPOINT_EVERY = 250
DEFAULT_STEPS = {"vae": 1500, "unet": 6000, "decoder": 600}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _to_tensor(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def _done(stage_dir: Path) -> dict | None:
    f = stage_dir / "done.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _finish(stage_dir: Path, record: dict) -> dict:
    write_json(stage_dir / "done.json", record, indent=2)
    return record


def _save_ckpt(path: Path, state: dict) -> None:
    with writing(path) as tmp:  # a stop mid-save keeps the previous checkpoint
        torch.save(state, tmp)


def _load_ckpt(path: Path) -> dict | None:
    return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else None


def _checkpoint(d: Path, step: int, seconds: float, model, opt, sched, **extra) -> None:
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}
    _save_ckpt(d / "ckpt.pt", state | extra | {"step": step, "seconds": seconds})


def _optimise(loss, opt, sched, d: Path, name: str, step: int, steps: int, seconds: float, model) -> None:
    """One optimizer step of a stage, its progress line every 50 steps and its checkpoint every
    CHECKPOINT_EVERY steps and at the end."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    if (step + 1) % 50 == 0:
        _log(f"{name} step {step + 1}/{steps} loss {loss.item():.4f}")
    if (step + 1) % CHECKPOINT_EVERY == 0 or step + 1 == steps:
        _checkpoint(d, step + 1, seconds, model, opt, sched)


def _resume(d: Path, name: str, model, opt, sched) -> tuple[int, float, dict | None]:
    """(step, seconds so far, the checkpoint) from ``d/ckpt.pt``, its states loaded; (0, 0, None) if none."""
    ck = _load_ckpt(d / "ckpt.pt")
    if ck is None:
        return 0, 0.0, None
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    sched.load_state_dict(ck["sched"])
    _log(f"{name}: resumed at step {ck['step']}")
    return ck["step"], ck["seconds"], ck


# ------------------------------------------------------------------ stage 1: the VAE


def _vae_batch(rng: random.Random, n: int, step: int) -> torch.Tensor:
    """Renders; in a quarter of them the object has one random RGB colour and in another quarter it
    is painted in 2-3 random colour bands (horizontal or vertical, thin or wide). A VAE that has only
    seen the eight named flat colours turns colours and patterns it never saw into the nearest ones
    it knows (a cyan/magenta ball came back purple, and the judge recognised none of 20 such
    reconstructions); a real SD VAE has seen every colour and pattern, so this one must too. The
    subject itself is never shown."""
    images = []
    for i in range(n):
        scene = world.random_scene(rng, held_out=None)
        img = world.render(scene, seed=step * 1000 + i)
        kind = rng.random()
        if kind < 0.5:
            arr = np.asarray(img).copy()
            mask = np.abs(arr.astype(int) - np.array(world.BACKGROUNDS[scene.background])).sum(-1) > 60
            if kind < 0.25:
                arr[mask] = [rng.randrange(256) for _ in range(3)]
            else:
                axis = rng.randrange(2)
                cuts = sorted(rng.uniform(0.2, 0.8) for _ in range(rng.randint(1, 2)))
                colours = [[rng.randrange(256) for _ in range(3)] for _ in range(len(cuts) + 1)]
                size = arr.shape[axis]
                pos = np.arange(size)[:, None] if axis == 0 else np.arange(size)[None, :]
                band = np.searchsorted(np.array(cuts) * size, pos).repeat(size, axis=1 - axis)
                painted = np.array(colours, dtype=np.uint8)[band]
                arr[mask] = painted[mask]
            img = Image.fromarray(arr)
        images.append(img)
    return _to_tensor(images)


def stage_vae(out: Path, steps: int, seed: int) -> dict:
    from safetensors.torch import save_file

    from dreambooth_kit.toy.model import new_components

    d = out / "vae"
    d.mkdir(parents=True, exist_ok=True)
    if (rec := _done(d)) is not None:
        return rec
    _, _, vae, _, _ = new_components(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    start, seconds, _ = _resume(d, "vae", vae, opt, sched)
    vae.train()
    t0 = time.perf_counter()
    for step in range(start, steps):
        rng = random.Random(seed * 7919 + step)
        x = _vae_batch(rng, 64, step)
        dist = vae.encode(x).latent_dist
        rec = vae.decode(dist.sample()).sample
        kl = dist.kl().mean() / (3 * 32 * 32)
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-6 * kl
        _optimise(loss, opt, sched, d, "vae", step, steps, seconds + time.perf_counter() - t0, vae)
    seconds += time.perf_counter() - t0
    vae.eval()
    with torch.no_grad():  # SD chose 0.18215 = 1 / std of its latents; the same rule here
        x = _to_tensor([img for img, _, _ in world.dataset(1024, seed + 99, held_out=None)])
        std = vae.encode(x).latent_dist.mean.std().item()
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(d / "vae.safetensors"))
    return _finish(
        d, {"steps": steps, "seconds": round(seconds, 1), "scaling_factor": 1.0 / std, "seed": seed}
    )


def _load_vae(out: Path, *, decoder: bool = True):
    """The trained VAE; with ``decoder`` its fine-tuned decoder when that stage is done."""
    from safetensors.torch import load_file

    from dreambooth_kit.toy.model import new_components

    rec = _done(out / "vae")
    _, _, vae, _, _ = new_components()
    tuned = out / "decoder" / "vae.safetensors"
    use = tuned if decoder and _done(out / "decoder") else out / "vae" / "vae.safetensors"
    vae.load_state_dict(load_file(use))
    vae.register_to_config(scaling_factor=rec["scaling_factor"])
    return vae.eval().requires_grad_(False)


def stage_decoder(out: Path, steps: int, seed: int) -> dict:
    """Fine-tune the VAE's decoder alone (as SD's ft-MSE VAE was made): sharper reconstructions of
    unseen colour patterns, while the encoder, hence the latent space the UNet learned, is unchanged."""
    from safetensors.torch import save_file

    d = out / "decoder"
    d.mkdir(parents=True, exist_ok=True)
    if (rec := _done(d)) is not None:
        return rec
    vae = _load_vae(out, decoder=False)
    vae.decoder.requires_grad_(True)
    vae.post_quant_conv.requires_grad_(True)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    start, seconds, _ = _resume(d, "decoder", vae, opt, sched)
    vae.decoder.train()
    t0 = time.perf_counter()
    for step in range(start, steps):
        rng = random.Random(seed * 7927 + step)
        x = _vae_batch(rng, 64, step + 100_000)
        with torch.no_grad():
            z = vae.encode(x).latent_dist.sample()
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        _optimise(loss, opt, sched, d, "decoder", step, steps, seconds + time.perf_counter() - t0, vae)
    seconds += time.perf_counter() - t0
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(d / "vae.safetensors"))
    return _finish(d, {"steps": steps, "seconds": round(seconds, 1), "seed": seed})


# ------------------------------------------------------------------ stage 3: the UNet


def _caption_embeddings(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    ids = tokenizer(
        captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        return text_encoder(ids)[0]


def _unet_data(out: Path, n: int, seed: int, vae, tokenizer, text_encoder):
    """Renders of seen combinations, encoded once: latent mean/logvar and the caption index."""
    cache = out / "unet" / f"data-{n}-{seed}.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=True)
    captions, index, means, logvars, batch = [], [], [], [], []

    def flush():
        with torch.no_grad():
            dist = vae.encode(_to_tensor(batch)).latent_dist
        means.append(dist.mean)
        logvars.append(dist.logvar)
        batch.clear()

    for img, text, _ in world.dataset(n, seed, held_out=False):
        if text not in captions:
            captions.append(text)
        index.append(captions.index(text))
        batch.append(img)
        if len(batch) == 256:
            flush()
    if batch:
        flush()
    captions.append("")  # the unconditional caption, for classifier-free guidance
    data = {
        "mean": torch.cat(means).half(),
        "logvar": torch.cat(logvars).half(),
        "caption": torch.tensor(index),
        "embeddings": _caption_embeddings(tokenizer, text_encoder, captions),
        "captions": captions,
    }
    torch.save(data, cache)
    return data


def _unet_loss(unet, scheduler, data: dict, gen, *, scale: float, empty: int, batch: int = 64):
    """v-prediction MSE on a batch of cached latent distributions; 10% of captions dropped to the
    empty one (what classifier-free guidance at sampling needs)."""
    idx = torch.randint(0, len(data["caption"]), (batch,), generator=gen)
    mean, logvar = data["mean"][idx].float(), data["logvar"][idx].float()
    latents = (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen)) * scale
    cap = data["caption"][idx].clone()
    cap[torch.rand(batch, generator=gen) < 0.1] = empty
    cond = data["embeddings"][cap]
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
    noisy = scheduler.add_noise(latents, noise, t)
    target = scheduler.get_velocity(latents, noise, t)
    return F.mse_loss(unet(noisy, t, cond).sample, target)


def stage_unet(out: Path, steps: int, seed: int, n_images: int = 30000) -> dict:
    from diffusers.training_utils import EMAModel
    from safetensors.torch import save_file

    from dreambooth_kit.toy.model import new_components

    d = out / "unet"
    d.mkdir(parents=True, exist_ok=True)
    if (rec := _done(d)) is not None:
        return rec
    tokenizer, text_encoder, _, unet, scheduler = new_components(seed)
    text_encoder.eval().requires_grad_(False)
    vae = _load_vae(out)
    t_data = time.perf_counter()
    data = _unet_data(out, n_images, seed, vae, tokenizer, text_encoder)
    _log(
        f"unet: {len(data['caption'])} encoded renders, {len(data['captions'])} captions ({time.perf_counter() - t_data:.0f} s)"
    )
    sf = vae.config.scaling_factor
    empty = len(data["captions"]) - 1
    opt = torch.optim.AdamW(unet.parameters(), lr=5e-4, weight_decay=1e-2)
    warm = 200
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    ema = EMAModel(unet.parameters(), decay=0.999)
    gen = torch.Generator().manual_seed(seed)
    start, seconds, ck = _resume(d, "unet", unet, opt, sched)
    if ck is not None:
        ema.load_state_dict(ck["ema"])
        gen.set_state(ck["gen"])
    unet.train()
    t0 = time.perf_counter()
    for step in range(start, steps):
        loss = _unet_loss(unet, scheduler, data, gen, scale=sf, empty=empty)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema.step(unet.parameters())
        if (step + 1) % 50 == 0:
            _log(f"unet step {step + 1}/{steps} loss {loss.item():.4f}")
        if (step + 1) % CHECKPOINT_EVERY == 0 or step + 1 == steps:
            extra = {"ema": ema.state_dict(), "gen": gen.get_state()}
            _checkpoint(d, step + 1, seconds + time.perf_counter() - t0, unet, opt, sched, **extra)
    seconds += time.perf_counter() - t0
    ema.copy_to(unet.parameters())  # the EMA weights are the model (sharper samples than the last step's)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(d / "unet.safetensors"))
    save_file(
        {k: v.contiguous() for k, v in text_encoder.state_dict().items()}, str(d / "text_encoder.safetensors")
    )
    return _finish(
        d, {"steps": steps, "seconds": round(seconds, 1), "images": n_images, "seed": seed, "batch": 64}
    )


# ------------------------------------------------------------------ stage 4: competence on held-out prompts


def stage_eval(out: Path, seed: int, per_combo: int = 4) -> dict:
    from dreambooth_kit.toy.judge import Judge

    d = out / "eval"
    d.mkdir(parents=True, exist_ok=True)
    if (rec := _done(d)) is not None:
        return rec
    staging = ship(out, out / "staged-weights", final=False)
    from dreambooth_kit.toy.model import build_toy_sd2

    folder = build_toy_sd2(out / "eval" / "model", weights=staging)
    judge = Judge.load(out / "judge" / "judge.safetensors")
    t0 = time.perf_counter()
    results = {}
    for kind, combos in (("held_out", world.held_out_combos()), ("seen", _seen_sample(18, seed))):
        prompts = [world.caption(world.Scene(c, k, b, 0.25, 0.5, 0.5)) for c, k, b in combos]
        images = sample(folder, prompts, per_combo=per_combo, seed=seed)
        expected = [
            {"class": c, "colour": k, "background": b} for c, k, b in combos for _ in range(per_combo)
        ]
        results[kind] = _attribute_accuracy(judge, images, expected)
        _log(f"eval {kind}: {results[kind]}")
    return _finish(d, {"per_combo": per_combo, "seconds": round(time.perf_counter() - t0, 1), **results})


def _seen_sample(n: int, seed: int) -> list[tuple[str, str, str]]:
    seen = [
        (c, k, b)
        for c in world.CLASSES
        for k in world.COLOURS
        for b in world.BACKGROUNDS
        if not world.is_held_out(c, k, b)
    ]
    return random.Random(seed).sample(seen, n)


def _attribute_accuracy(judge, images, expected: list[dict]) -> dict:
    from dreambooth_kit.evaluation.metrics import attribute_accuracy

    return {k: round(float(v), 4) for k, v in attribute_accuracy(judge, images, expected).items()}


# ------------------------------------------------------------------ stage 5: ship


def ship(out: Path, target: Path, *, final: bool = True) -> Path:
    """fp16 weights (loaded back as fp32; ~11 MB instead of 22) and the record of how they were made."""
    from safetensors.torch import load_file, save_file

    target.mkdir(parents=True, exist_ok=True)
    vae_stage = "decoder" if _done(out / "decoder") else "vae"
    for name, sub in (("unet", "unet"), ("text_encoder", "unet"), ("vae", vae_stage)):
        sd = load_file(out / sub / f"{name}.safetensors")
        save_file({k: v.half().contiguous() for k, v in sd.items()}, str(target / f"{name}.safetensors"))
    if final and _done(out / "judge"):
        import shutil

        for name in ("judge.safetensors", "judge.json"):
            shutil.copyfile(out / "judge" / name, target / name)
    record = {
        "model": "builtin:toy-sd2",
        "made_by": "python -m dreambooth_kit.toy.pretrain",
        "resolution": world.RESOLUTION,
        "scaling_factor": _done(out / "vae")["scaling_factor"],
        "stages": {s: _done(out / s) for s in ("vae", "judge", "unet", "decoder", "eval") if _done(out / s)},
        "torch": torch.__version__,
    }
    if not final:
        record["stages"].pop("eval", None)
    (target / "record.json").write_text(json.dumps(record, indent=2))
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m dreambooth_kit.toy.pretrain",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", required=True)
    ap.add_argument("--stage", choices=STAGES, action="append", help="default: all, in order")
    ap.add_argument("--steps", type=int, default=None, help="steps for the vae/unet stage(s) run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=30000, help="renders for the UNet")
    ap.add_argument("--ship-to", default=None, help="default: dreambooth_kit/toy/weights")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    # --threads holds for this run only: main() also runs in-process (the tests call it), where a
    # thread count left behind changed every later computation's rounding (a resumed run then missed
    # the bit-for-bit equality it is tested for).
    before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        _run_stages(args)
    finally:
        torch.set_num_threads(before)
    return 0


def _run_stages(args: argparse.Namespace) -> None:
    out = Path(args.out)
    for stage in args.stage or STAGES:
        t0 = time.perf_counter()
        if stage == "vae":
            rec = stage_vae(out, args.steps or DEFAULT_STEPS["vae"], args.seed)
        elif stage == "judge":
            from dreambooth_kit.toy.judge import train_judge

            (out / "judge").mkdir(parents=True, exist_ok=True)
            if _done(out / "judge") is None:
                vae = _load_vae(out) if _done(out / "vae") else None

                def lens(x, vae=vae):
                    return vae.decode(vae.encode(x).latent_dist.mean).sample

                train_judge(out / "judge", seed=args.seed, threads=args.threads, lens=lens if vae else None)
                _finish(out / "judge", json.loads((out / "judge" / "judge.json").read_text()))
            rec = _done(out / "judge")
        elif stage == "unet":
            rec = stage_unet(out, args.steps or DEFAULT_STEPS["unet"], args.seed, args.images)
        elif stage == "decoder":
            rec = stage_decoder(out, args.steps or DEFAULT_STEPS["decoder"], args.seed)
        elif stage == "eval":
            rec = stage_eval(out, args.seed)
        else:
            from dreambooth_kit.toy.model import shipped_weights

            rec = {"shipped": str(ship(out, Path(args.ship_to) if args.ship_to else shipped_weights()))}
        _log(f"{stage}: {json.dumps(rec)[:300]} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    raise SystemExit(main())

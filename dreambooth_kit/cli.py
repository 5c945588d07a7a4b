"""``dreambooth-kit`` subcommands: parse arguments, call the public API, print results.

No logic of its own beyond turning known errors into one clear message and a non-zero exit code.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def _user_errors() -> tuple[type[BaseException], ...]:
    from .checkpoints import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .hub import HubError
    from .models import ModelLoadError
    from .preflight import PreflightError
    from .prior import ClassImageError

    return (
        ConfigError,
        DataError,
        PreflightError,
        ModelLoadError,
        ClassImageError,
        CheckpointError,
        HubError,
        FileExistsError,
        FileNotFoundError,
        ImportError,
        FloatingPointError,  # non-finite images: the message says what to change
        ValueError,  # bad arguments (sizes, seeds, LoRA for another model), named in the message
    )


def user_errors_to_exit_code(fn, *args) -> int:
    """Known user-facing errors -> one clear line on stderr and exit code 2 (no traceback)."""
    try:
        return fn(*args)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run_train(config: str, overrides: list[str]) -> int:
    """Train and map the two ways training stops early to exit codes: a signal -> 128 + signum
    (143 SIGTERM, 130 SIGINT) after a checkpoint; non-finite losses -> 1."""
    from .config import load_config
    from .guards import NonFiniteLossError, TrainingInterrupted
    from .train import train

    cfg = load_config(config, overrides)
    try:
        result = train(cfg)
    except TrainingInterrupted as e:
        print(str(e), file=sys.stderr)
        return e.exit_code
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if cfg.adapter.type == "full":
        print(f"pipeline: {result.pipeline_dir}")
    else:
        print(f"LoRA: {result.lora_path}")
    return 0


def _cmd_train(args) -> int:
    return run_train(args.config, args.overrides)


def _cmd_check_data(args) -> int:
    from .config import load_config
    from .models import resolve_model_cfg
    from .preflight import preflight
    from .train import _prediction_type

    cfg = load_config(args.config, args.overrides)
    source = resolve_model_cfg(cfg.model)
    report = preflight(cfg, prediction_type=_prediction_type(cfg, source), source=source)
    n = sum(len(r.images) for r in report.reports)
    print(f"{n} usable images, {len(report.warnings)} warnings, 0 errors")
    return 0


def _cmd_generate(args) -> int:
    from .inference import generate, load_pipeline, regenerate_from_png, save_images

    if args.from_png:
        result = regenerate_from_png(args.from_png, base=args.base, lora=args.lora[0] if args.lora else None)
        for p in save_images([result], args.out):
            print(p)
        return 0
    if not args.base or args.prompt is None:
        raise SystemExit("error: --base and --prompt are required (or --from-png IMAGE)")
    pipe = load_pipeline(
        args.base,
        lora=args.lora or None,
        lora_scale=args.lora_scale if len(args.lora_scale) > 1 else args.lora_scale[0],
        dtype=args.dtype,
        scheduler=args.scheduler,
        fuse=args.fuse,
        allow_pickle=args.allow_pickle,
        single_file_config=args.single_file_config,
    )
    results = generate(
        pipe,
        args.prompt,
        negative_prompt=args.negative_prompt,
        seed=args.seed,
        num_images=args.n,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        init_image=args.init_image,
        mask_image=args.mask_image,
        strength=args.strength,
    )
    for p in save_images(results, args.out, grid=args.grid):
        print(p)
    return 0


def _cmd_export(args) -> int:
    from .export import run_exports

    for path in run_exports(Path(args.run), args.format, fp16=args.fp16, out_dir=args.out):
        print(path)
    return 0


def _cmd_push(args) -> int:
    from .hub import push_to_hub

    files = push_to_hub(
        Path(args.run), args.repo, private=args.private, token=args.token, dry_run=args.dry_run
    )
    print(("would upload" if args.dry_run else "uploaded") + f" {len(files)} files to {args.repo}:")
    for f in files:
        print(f"  {f}")
    return 0


def _cmd_build_tiny(args) -> int:
    from .tiny import build_tiny_sd2

    print(build_tiny_sd2(args.path, seed=args.seed, overwrite=args.overwrite))
    return 0


def _cmd_demo(args) -> int:
    """Offline end to end: tiny model -> checks -> class images -> LoRA with prior -> seeded images."""
    from .demo import run_demo

    for line in run_demo(args.photos, args.out, args.steps):
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(prog="dreambooth-kit", description="DreamBooth LoRA for Stable Diffusion 2.1")
    p.add_argument("--version", action="version", version=f"dreambooth_kit {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a LoRA from a config")
    t.add_argument(
        "--config", required=True, help="YAML path or packaged name (tiny.yaml, sd21_base_lora.yaml)"
    )
    t.add_argument(
        "overrides", nargs="*", help="dotted overrides: train.max_steps=400 data.instance_dir=photos"
    )
    t.set_defaults(func=_cmd_train)

    c = sub.add_parser("check-data", help="run the preflight checks only (no model weights loaded)")
    c.add_argument("--config", required=True)
    c.add_argument("overrides", nargs="*")
    c.set_defaults(func=_cmd_check_data)

    g = sub.add_parser("generate", help="seeded images from a base model (+ LoRAs)")
    g.add_argument("--base", help="hub id, diffusers folder or builtin:tiny-sd2")
    g.add_argument(
        "--lora", action="append", default=[], help="run_dir/lora or a .safetensors file (repeatable)"
    )
    g.add_argument("--lora-scale", type=float, nargs="+", default=[1.0])
    g.add_argument("--prompt")
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--seed", type=int, default=1557, help="image i uses seed + i")
    g.add_argument("--n", "--num-images", dest="n", type=int, default=4)
    g.add_argument("--steps", type=int, default=30)
    g.add_argument("--guidance-scale", type=float, default=7.5)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument(
        "--scheduler", default=None, help="dpmpp_2m, ddim, euler_a, euler, ddpm, pndm (default: the model's)"
    )
    g.add_argument("--init-image", default=None, help="img2img / inpainting source image")
    g.add_argument("--mask-image", default=None, help="inpainting mask (white = repaint)")
    g.add_argument("--strength", type=float, default=0.75, help="img2img: how much to change (0..1)")
    g.add_argument("--fuse", action="store_true", help="fuse the LoRA into the weights (base speed)")
    g.add_argument("--grid", action="store_true", help="also write grid.png")
    g.add_argument("--dtype", default="auto", help="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16")
    g.add_argument("--allow-pickle", action="store_true", help="allow .ckpt/.bin files (they can run code)")
    g.add_argument(
        "--single-file-config",
        default=None,
        help="for a single-file --base: a diffusers folder with its configs",
    )
    g.add_argument("--from-png", default=None, help="re-create an image from the settings stored in it")
    g.add_argument("--out", default="outputs")
    g.set_defaults(func=_cmd_generate)

    x = sub.add_parser("export", help="write a finished LoRA run in other formats")
    x.add_argument("--run", required=True, help="the run folder (holds config.yaml and lora/)")
    x.add_argument(
        "--format",
        action="append",
        required=True,
        choices=["kohya", "merged-diffusers", "single-file"],
        help="kohya: one LoRA file for A1111/ComfyUI/kohya; merged-diffusers: base + LoRA fused; "
        "single-file: the merged model as one A1111-style .safetensors + .yaml (repeatable)",
    )
    x.add_argument("--fp16", action="store_true", help="write half-precision weights (half the size)")
    x.add_argument("--out", default=None, help="default: <run>/export")
    x.set_defaults(func=_cmd_export)

    h = sub.add_parser("push", help="upload a run's final files (never checkpoints) to the Hugging Face Hub")
    h.add_argument("--run", required=True)
    h.add_argument("--repo", required=True, help="user/name")
    h.add_argument("--private", action="store_true")
    h.add_argument("--token", default=None, help="default: HF_TOKEN or `hf auth login`")
    h.add_argument("--dry-run", action="store_true", help="list what would be uploaded")
    h.set_defaults(func=_cmd_push)

    d = sub.add_parser("demo", help="offline end-to-end run on the built-in tiny model")
    d.add_argument("--photos", default=None, help="default: the five demo photos in the package")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=int, default=30)
    d.set_defaults(func=_cmd_demo)

    b = sub.add_parser("build-tiny", help="write the tiny SD2-shaped model to a folder")
    b.add_argument("path")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--overwrite", action="store_true")
    b.set_defaults(func=_cmd_build_tiny)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(message)s",
        stream=sys.stderr,
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return user_errors_to_exit_code(args.func, args)

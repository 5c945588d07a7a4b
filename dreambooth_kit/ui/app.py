"""The Gradio app of ``dreambooth-kit ui``: five tabs (Photos, Train, Evaluate, Generate, Export)
under one photo folder and one run folder, each button wired to a plain handler (``handlers``,
``results``), and the server's launch. The only module that imports gradio, and only when the ``ui``
command runs; without the extra installed it says which ``pip install`` brings it.

A handler's :class:`~dreambooth_kit.errors.UserError` is shown as an error message in the page (its
one line), never as a traceback. The Train tab reads the run folder every two seconds (a timer in
the page), so closing the browser changes nothing for the training, and reopening the page shows it
again.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from types import SimpleNamespace

from dreambooth_kit.errors import MissingExtra, UserError
from dreambooth_kit.ui import handlers, results
from dreambooth_kit.ui.paths import Roots

DEFAULT_CONFIG = "sd21_base_lora.yaml"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
REFRESH_SECONDS = 2.0
# A small image (the toy model's 32 px) fills the image box instead of sitting in its middle.
CSS = "#gen-image img { width: 100%; height: 100%; object-fit: contain; }"
ELEM = {  # element ids, for the browser test and for anyone styling the page
    "photos": "photo-folder", "run": "run-folder", "upload": "photo-upload", "check": "photo-check",
    "summary": "photo-summary", "table": "photo-table", "start": "train-start", "stop": "train-stop",
    "resume": "train-resume", "state": "train-state", "progress": "train-progress", "grids": "train-grids",
    "generate": "gen-button", "image": "gen-image", "infotext": "gen-infotext", "export": "export-button",
    "files": "export-files", "evaluate": "eval-button", "metrics": "eval-table", "steps": "train-steps",
    "every_v": "train-every-v", "every_c": "train-every-c", "more": "train-more", "extra": "train-extra",
    "loss": "train-loss", "prompt": "gen-prompt", "seed": "gen-seed", "gen_steps": "gen-steps",
    "guidance": "gen-guidance", "eval_seeds": "eval-seeds", "eval_plot": "eval-plot",
    "eval_extra": "eval-extra",
}  # fmt: skip


def require_gradio():
    """gradio, or :class:`MissingExtra` naming the extra that installs it."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a training machine
    try:
        import gradio
    except ImportError as e:
        raise MissingExtra(
            f"dreambooth-kit ui needs gradio ({e}); install the extra: pip install 'dreambooth_kit[ui]'"
        ) from e
    return gradio


def exposure_warning(host: str, share: bool, roots: Roots) -> str | None:
    """The warning printed when the UI listens beyond this machine (``--host 0.0.0.0``, ``--share``)."""
    if host in LOOPBACK and not share:
        return None
    where = "through a public gradio.live link" if share else f"on {host}"
    return (
        f"warning: the UI is reachable {where}: anyone who can reach it can start trainings and read the "
        f"photos and runs under {roots}. It has no password; use it only on a network you trust"
    )


def serve(roots: Roots, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
          config: str = DEFAULT_CONFIG) -> int:  # fmt: skip
    """Build the app and serve it until Ctrl-C."""
    require_gradio()
    warning = exposure_warning(host, share, roots)
    if warning:
        print(warning, file=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own startup requests, one INFO line each
    app = build_app(roots, config)
    app.queue().launch(server_name=host, server_port=port, share=share, **launch_options(roots))
    return 0


def launch_options(roots: Roots) -> dict:
    """``launch()``'s settings: gradio may serve the roots (the photos, grids, images and exports the
    tabs show), less the hidden files and folders at their top (.ssh, .git, .env where a root is a
    home folder); the page's fonts are the system's (no request to a font server)."""
    gr = require_gradio()
    hidden = [str(p) for r in roots.folders for p in r.iterdir() if p.name.startswith(".")]
    theme = gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )
    return {
        "allowed_paths": [str(r) for r in roots.folders],
        "blocked_paths": hidden,
        "show_error": True,
        "theme": theme,
        "css": CSS,
    }


def _shown(fn):
    """A handler whose UserError becomes the page's error message (one line, no traceback)."""
    gr = require_gradio()

    @functools.wraps(fn)
    def wrapped(*args):
        try:
            return fn(*args)
        except UserError as e:
            raise gr.Error(str(e), duration=None, print_exception=False) from None

    return wrapped


def build_app(roots: Roots, config: str = DEFAULT_CONFIG):
    """The gr.Blocks of the UI, for ``roots`` (every path typed is checked against them)."""
    gr = require_gradio()
    with gr.Blocks(title="dreambooth_kit", analytics_enabled=False) as app:
        gr.Markdown(f"## dreambooth_kit · DreamBooth for Stable Diffusion 2.1\nFolders: `{roots}`")
        with gr.Row():
            photos = gr.Textbox("photos", label="Photo folder", elem_id=ELEM["photos"], scale=1)
            run = gr.Textbox("runs/my_subject", label="Run folder", elem_id=ELEM["run"], scale=1)
        shared = SimpleNamespace(photos=photos, run=run)
        with gr.Tabs():
            with gr.Tab("Photos", id="photos"):
                photo_tab = _photos_tab(gr)
            with gr.Tab("Train", id="train"):
                train_tab = _train_tab(gr, config)
            with gr.Tab("Evaluate", id="evaluate"):
                _evaluate_tab(gr, roots, shared)
            with gr.Tab("Generate", id="generate"):
                _generate_tab(gr, roots, shared)
            with gr.Tab("Export", id="export"):
                _export_tab(gr, roots, shared)
        _wire_photos(gr, roots, shared, photo_tab, train_tab)
        _wire_train(gr, roots, shared, train_tab)
    return app


# ------------------------------------------------------------------ photos


def _photos_tab(gr) -> SimpleNamespace:
    gr.Markdown("Upload 5-20 photos of the subject, or type a folder above and press Check. Each photo "
                "is checked before any model loads.")  # fmt: skip
    with gr.Row():
        upload = gr.File(label="Upload photos (and .txt captions)", file_count="multiple",
                         type="filepath", elem_id=ELEM["upload"])  # fmt: skip
        check = gr.Button("Check the folder", elem_id=ELEM["check"])
    summary = gr.Markdown(elem_id=ELEM["summary"])
    gallery = gr.Gallery(label="Photos", columns=8, height=220, object_fit="contain", fit_columns=False)
    table = gr.Dataframe(headers=["photo", "size", "check"], label="Checks", wrap=True,
                         interactive=False, elem_id=ELEM["table"])  # fmt: skip
    gr.Markdown("### Identifier\nRare words the base model reacts to least, for the class you type "
                "(this loads the model of the Train tab).")  # fmt: skip
    with gr.Row():
        noun = gr.Textbox(label="Class noun", placeholder="dog")
        suggest = gr.Button("Suggest identifiers")
    found = gr.Dataframe(headers=["rank", "word", "change", "instance prompt"], interactive=False)
    return SimpleNamespace(upload=upload, check=check, summary=summary, gallery=gallery, table=table,
                           noun=noun, suggest=suggest, found=found)  # fmt: skip


def _photo_outputs(check: handlers.PhotoCheck):
    rows = [[r.path.name, r.size, r.verdict] for r in check.rows]
    return check.summary, [(str(r.path), r.caption) for r in check.rows if r.size], rows


def _wire_photos(gr, roots: Roots, shared, tab, train) -> None:
    outputs = [tab.summary, tab.gallery, tab.table]

    @_shown
    def uploaded(files, folder, config):
        return _photo_outputs(handlers.save_uploads(roots, list(files or []), folder, config))

    @_shown
    def checked(folder, config):
        return _photo_outputs(handlers.check_photos(roots, folder, config))

    @_shown
    def suggested(noun, config, model):
        rows = handlers.suggest_identifiers(roots, noun, config, model)
        return rows, rows[0][1] if rows else gr.skip(), noun

    tab.upload.upload(uploaded, [tab.upload, shared.photos, train.config], outputs)
    tab.check.click(checked, [shared.photos, train.config], outputs)
    tab.suggest.click(
        suggested, [tab.noun, train.config, train.model], [tab.found, train.identifier, train.noun]
    )


# ------------------------------------------------------------------ train


def _train_tab(gr, config: str) -> SimpleNamespace:
    import dreambooth_kit as dbk

    with gr.Row():
        preset = gr.Dropdown(dbk.packaged_configs(), value=config, label="Config", allow_custom_value=True,
                             info="a packaged recipe, or a YAML inside the folders")  # fmt: skip
        model = gr.Textbox(
            label="Model", placeholder="the config's (builtin:toy-sd2, a hub id, a folder or one file)"
        )
    with gr.Row():
        identifier = gr.Textbox(label="Identifier", placeholder="zwx (empty: the config's prompts)")
        noun = gr.Textbox(label="Class", placeholder="dog")
        steps = gr.Number(800, label="Steps", precision=0, minimum=1, elem_id=ELEM["steps"])
        stop = gr.Checkbox(False, label="stop: auto (at the best validation step)")
    with gr.Row():
        adapter = gr.Radio(list(handlers.ADAPTERS), value="LoRA", label="Adapter")
        prior = gr.Radio(list(handlers.PRIOR_MODES), value="class images", label="Prior preservation")
        every_v = gr.Number(200, label="Validation grid every (steps; 0: none)", precision=0, minimum=0,
                            elem_id=ELEM["every_v"])  # fmt: skip
        every_c = gr.Number(200, label="Checkpoint every (steps; 0: when stopped)", precision=0, minimum=0,
                            elem_id=ELEM["every_c"])  # fmt: skip
    with gr.Accordion("More settings (key=value, one a line)", open=False, elem_id=ELEM["more"]):
        extra = gr.Textbox(lines=3, show_label=False, placeholder="train.learning_rate=5e-5\nadapter.rank=8",
                           elem_id=ELEM["extra"])  # fmt: skip
    with gr.Row():
        start = gr.Button("Start", variant="primary", elem_id=ELEM["start"])
        stop_btn = gr.Button("Stop (checkpoint)", variant="stop", elem_id=ELEM["stop"])
        resume = gr.Button("Resume", elem_id=ELEM["resume"])
    said = gr.Markdown()
    state = gr.Markdown(elem_id=ELEM["state"])
    progress = gr.Markdown(elem_id=ELEM["progress"])
    with gr.Row():
        loss = gr.Plot(label="Loss", elem_id=ELEM["loss"])
        grids = gr.Gallery(label="Validation grids", columns=2, height=300, object_fit="contain",
                           fit_columns=False, elem_id=ELEM["grids"])  # fmt: skip
    log = gr.Textbox(label="Log (last lines)", lines=8, max_lines=8, autoscroll=True)
    form = [preset, model, identifier, noun, steps, stop, adapter, prior, every_v, every_c, extra]
    return SimpleNamespace(config=preset, model=model, identifier=identifier, noun=noun, form=form,
                           start=start, stop=stop_btn, resume=resume, said=said, state=state,
                           progress=progress, loss=loss, grids=grids, log=log)  # fmt: skip


def _wire_train(gr, roots: Roots, shared, tab) -> None:
    def form(run, photos, config, model, ident, noun, steps, auto, adapter, prior, every_v, every_c, extra):
        return handlers.TrainForm(config, run, photos, model, ident, noun, int(steps or 1), bool(auto),
                                  adapter, prior, int(every_v or 0), int(every_c or 0), extra)  # fmt: skip

    tab.start.click(_shown(lambda *a: handlers.start_training(roots, form(*a))),
                    [shared.run, shared.photos, *tab.form], tab.said)  # fmt: skip
    tab.stop.click(_shown(lambda run: handlers.stop_training(roots, run)), shared.run, tab.said)
    tab.resume.click(_shown(lambda run: handlers.resume_training(roots, run)), shared.run, tab.said)
    seen = gr.State({})
    timer = gr.Timer(REFRESH_SECONDS)
    outputs = [tab.state, tab.progress, tab.loss, tab.grids, tab.log, seen]
    timer.tick(functools.partial(_refresh, gr, roots), [shared.run, seen], outputs, show_progress="hidden")


def _refresh(gr, roots: Roots, run: str, seen: dict):
    """The Train tab's live view; each part is sent only when it changed (a gallery re-sent every
    two seconds would close the grid the user is looking at)."""
    try:
        status = handlers.training_status(roots, run)
    except UserError as e:
        return (f"**{e}**", "", None, [], "", {})
    p = status.progress
    parts = {
        "state": f"**{status.state}**: {status.message}",
        "progress": _progress_text(p),
        "loss": (p.step, len(p.losses)) if p else None,
        "grids": [(str(path), step) for path, step in status.grids],
        "log": status.log,
    }
    out = [parts[k] if parts[k] != seen.get(k) else gr.skip() for k in ("state", "progress")]
    out.append(_loss_figure(p) if parts["loss"] != seen.get("loss") else gr.skip())
    grids = [(path, f"step {step}") for path, step in parts["grids"]]
    out.append(grids if parts["grids"] != seen.get("grids") else gr.skip())
    out.append(parts["log"] if parts["log"] != seen.get("log") else gr.skip())
    return (*out, parts)


def _progress_text(p) -> str:
    if p is None or not p.losses:
        return ""
    return " · ".join(
        filter(None, [f"step **{p.step}** of {p.max_steps}", f"loss {p.losses[-1][1]:.4f}", p.eta()])
    )


def _loss_figure(progress):
    if progress is None or not progress.losses:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 2.6), dpi=100)
    ax = fig.add_subplot()
    ax.plot([s for s, _ in progress.losses], [v for _, v in progress.losses], linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_xlim(0, max(progress.max_steps, 1))
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------ evaluate, generate, export


def _evaluate_tab(gr, roots: Roots, shared) -> None:
    gr.Markdown("DreamBooth's metrics for each checkpoint of the run folder (images drawn once and "
                "reused by the next call); the best checkpoint is starred.")  # fmt: skip
    with gr.Row():
        which = gr.Textbox("all", label="Checkpoints", info="all, latest, or step-000400,800,final,base")
        seeds = gr.Number(0, label="Images per prompt (0: the run's evaluate.seeds)", precision=0, minimum=0,
                          elem_id=ELEM["eval_seeds"])  # fmt: skip
        button = gr.Button("Evaluate", variant="primary", elem_id=ELEM["evaluate"])
    extra = gr.Textbox(label="More evaluate settings (evaluate.key=value, one a line)", lines=2,
                       placeholder="evaluate.steps=20\nevaluate.class_images=16", elem_id=ELEM["eval_extra"])  # fmt: skip
    best = gr.Markdown()
    table = gr.Dataframe(label="Metrics", interactive=False, elem_id=ELEM["metrics"])
    plot = gr.Image(label="Metrics over steps", type="filepath", interactive=False, elem_id=ELEM["eval_plot"])

    @_shown
    def evaluated(run, which, seeds, extra):
        view = results.evaluate_run(roots, run, which, int(seeds or 0) or None, extra)
        frame = {"headers": view.headers, "data": view.rows}
        return f"**{view.best}**", frame, str(view.plot) if view.plot else None

    button.click(evaluated, [shared.run, which, seeds, extra], [best, table, plot])


def _generate_tab(gr, roots: Roots, shared) -> None:
    with gr.Row():
        with gr.Column(scale=3):
            prompt = gr.Textbox(label="Prompt", placeholder="a photo of zwx dog on the beach", lines=2,
                                elem_id=ELEM["prompt"])  # fmt: skip
            negative = gr.Textbox(label="Negative prompt")
            with gr.Row():
                seed = gr.Number(1557, label="Seed", precision=0, elem_id=ELEM["seed"])
                steps = gr.Number(30, label="Steps", precision=0, minimum=1, elem_id=ELEM["gen_steps"])
                guidance = gr.Number(7.5, label="Guidance scale", elem_id=ELEM["guidance"])
                scheduler = gr.Dropdown([results.MODEL_DEFAULT, *results.SCHEDULERS], value=results.MODEL_DEFAULT,
                                        label="Sampler")  # fmt: skip
            with gr.Row():
                base = gr.Textbox(label="Base model", placeholder="empty: the run's model")
                use_run = gr.Checkbox(True, label="the run folder's LoRA")
            with gr.Row():
                loras = gr.Textbox(label="More LoRAs (files or folders, one a line)", lines=2)
                scales = gr.Textbox("1", label="LoRA scales (one for all, or one each)")
            button = gr.Button("Generate", variant="primary", elem_id=ELEM["generate"])
            png = gr.File(label="Reuse the settings of a PNG", file_types=[".png"], type="filepath")
        with gr.Column(scale=2):
            image = gr.Image(
                label="Image", type="filepath", interactive=False, height=360, elem_id=ELEM["image"]
            )
            infotext = gr.Textbox(label="Infotext (A1111 parameters)", lines=4, elem_id=ELEM["infotext"])
    fields = [prompt, negative, seed, steps, guidance, scheduler, base, use_run, loras, scales]

    @_shown
    def generated(run, *values):
        form = results.GenerateForm(run, *values)
        path, text = results.generate_image(roots, form)
        return str(path), text

    @_shown
    def reused(path):
        if not path:
            return [gr.skip()] * len(fields)
        s = results.reuse_settings(path)
        keys = ["prompt", "negative_prompt", "seed", "steps", "guidance_scale", "scheduler", "base",
                "use_run_lora", "loras", "lora_scales"]  # fmt: skip
        return [s[k] for k in keys]

    button.click(generated, [shared.run, *fields], [image, infotext])
    png.upload(reused, png, fields)


def _export_tab(gr, roots: Roots, shared) -> None:
    gr.Markdown("The run folder's finished LoRA in other formats, written into its `export/` folder: "
                "kohya (A1111, ComfyUI), the merged model as a diffusers folder (zipped to download) "
                "or as one A1111-style file.")  # fmt: skip
    with gr.Row():
        formats = gr.CheckboxGroup(
            ["kohya", "merged-diffusers", "single-file"], value=["kohya"], label="Formats"
        )
        fp16 = gr.Checkbox(False, label="fp16 (half the size)")
        button = gr.Button("Export", variant="primary", elem_id=ELEM["export"])
    files = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id=ELEM["files"])

    @_shown
    def exported(run, formats, fp16):
        return [str(p) for p in results.export_run(roots, run, formats, fp16)]

    button.click(exported, [shared.run, formats, fp16], files)

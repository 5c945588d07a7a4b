"""``dreambooth-kit export`` and ``export.formats``: the asked formats of a finished LoRA run (kohya, merged
diffusers folder, single file) written into the run's ``export/`` folder."""

from __future__ import annotations

from pathlib import Path

from dreambooth_kit.export.kohya import ExportError, ExportInputMissing, export_kohya
from dreambooth_kit.export.merged import export_merged_diffusers, export_single_file
from dreambooth_kit.training.layout import RunLayout


def _copy_embeddings(lora_dir: Path, dest: Path) -> list[Path]:
    """adapter.pivotal: the identifiers' embedding files, for A1111's and ComfyUI's ``embeddings`` folder
    (the kohya LoRA alone would miss the trained vectors)."""
    from dreambooth_kit.training.pivotal import embedding_paths
    from dreambooth_kit.training.runfolder import Run
    from dreambooth_kit.util.atomic import write_bytes

    written = []
    for path in embedding_paths(lora_dir, Run.open(lora_dir).config() or {}):
        dest.mkdir(parents=True, exist_ok=True)
        written.append(write_bytes(dest / path.name, path.read_bytes()))
    return written


def run_exports(
    run_dir: Path, formats: list[str], *, fp16: bool = False, out_dir: str | Path | None = None
) -> list[Path]:
    """Write the asked formats of a finished LoRA run into ``<run>/export`` (or ``out_dir``)."""
    run_dir = Path(run_dir)
    lora = RunLayout(run_dir).lora_weights
    if not lora.exists():
        raise ExportInputMissing(f"{lora.resolve()}: no finished LoRA in this run (exports need one)")
    out = Path(out_dir) if out_dir else RunLayout(run_dir).export
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in dict.fromkeys(formats):
        if fmt == "kohya":
            written.append(export_kohya(lora, out / RunLayout(run_dir).kohya_export.name, fp16=fp16))
            written += _copy_embeddings(lora.parent, out / "embeddings")
        elif fmt == "merged-diffusers":
            written.append(export_merged_diffusers(run_dir, out / "merged-diffusers", fp16=fp16))
        elif fmt == "single-file":
            written.append(
                export_single_file(run_dir, out / f"{run_dir.resolve().name}.safetensors", fp16=fp16)
            )
        else:
            raise ExportError(f"export format {fmt!r}: use kohya, merged-diffusers or single-file")
    return written

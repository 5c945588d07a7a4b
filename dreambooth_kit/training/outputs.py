"""The final outputs of a run: the LoRA (diffusers format + adapter metadata) or, for full
fine-tunes, a complete pipeline.

Nothing trained is lost at the end: a checkpoint of the final step is on disk before the final
output is written (LoRA runs always, ~3x the LoRA's size; full fine-tunes when periodic checkpoints
are on, since theirs hold the whole UNet and its optimizer state, ~10 GB at SD 2.1). The output is
written to a temp folder and swapped in with the same atomic exchange as checkpoints, so a kill at any
moment leaves either the old or the new output whole. A full disk, a file-size limit or a permission
error is reported in one line with the space needed and how to finish (``train.resume=latest``).
Non-finite weights are never written.
"""

from __future__ import annotations

import errno
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dreambooth_kit.config import AdapterConfig, save_config_dict
from dreambooth_kit.errors import NonFiniteError, UserError
from dreambooth_kit.training.layout import RunLayout
from dreambooth_kit.training.lycoris import LYCORIS_TYPES

if TYPE_CHECKING:
    from dreambooth_kit.models.source import ModelSource
    from dreambooth_kit.training.loop import LoopState

log = logging.getLogger("dreambooth_kit")

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


class FinalSaveError(UserError, OSError):
    """The final LoRA/pipeline could not be written; the trained weights are in a checkpoint."""


def save_final(run: LoopState, source: ModelSource) -> Path:
    """``run`` is the loop's state after the last step; ``source`` the run's base model (a full
    fine-tune's pipeline takes its frozen parts from it, at its revision and variant)."""
    s = run.settings
    final = run.out / ("pipeline" if s.adapter.type == "full" else "lora")
    from dreambooth_kit.training.checkpoint_index import CheckpointError, CheckpointSaveFailed

    try:
        checkpoint = _final_checkpoint(run)
    # Still try the final output: a LoRA is a third of its checkpoint.
    except (CheckpointError, CheckpointSaveFailed) as e:
        log.warning("%s; writing the final output anyway", e)
        checkpoint = None
    try:
        written = _write_final(run, source, final.name)
        if run.ema is not None:  # train.ema: the average beside it, by the same code (ema.py)
            with run.ema.swapped_in():
                _write_final(run, source, RunLayout(run.out).final_ema(s.adapter.type).name)
        return written
    except OSError as e:
        raise _final_save_error(e, final, checkpoint, run) from e
    except Exception as e:  # safetensors' SafetensorError wraps "No space left on device (os error 28)"
        if _reason(e, final) is None:
            raise
        raise _final_save_error(e, final, checkpoint, run) from e


def _write_final(run: LoopState, source: ModelSource, name: str) -> Path:
    s = run.settings
    if s.adapter.type == "full":
        return save_pipeline(
            s.config_dict,
            s.train.save_precision,
            run.accelerator,
            run.comps,
            run.unet,
            run.text_encoder,
            run.out,
            source.location,
            source.load_kwargs(),
            name=name,
        )
    extra = None
    if run.pivots is not None:  # adapter.pivotal: lora/<identifier>.safetensors, A1111's embedding file
        from dreambooth_kit.training.pivotal import checkpoint_tensors, embedding_files

        extra = embedding_files(checkpoint_tensors(run.pivots))
    return save_lora(
        s.adapter, s.config_dict, run.accelerator, run.unet, run.text_encoder, run.out, name=name, extra=extra
    )


def _final_checkpoint(run: LoopState) -> Path | None:
    """The complete checkpoint of the final step, written now if the loop did not write one."""
    from dreambooth_kit.training.checkpoint_index import list_checkpoints
    from dreambooth_kit.training.checkpoints import save_step_checkpoint

    done = dict(list_checkpoints(run.out))
    if run.step in done:
        return done[run.step]
    if run.settings.adapter.type == "full" and run.settings.checkpoint.every_steps is None:
        return None
    return save_step_checkpoint(run)


def _reason(error: BaseException, folder: Path) -> str | None:
    from dreambooth_kit.util.disk_space import disk_full_reason

    reason = disk_full_reason(error, folder)
    if reason:
        return reason
    e: BaseException | None = error
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return "permission denied"
        e = e.__cause__ or e.__context__
    return None


def _final_save_error(
    error: BaseException, final: Path, checkpoint: Path | None, run: LoopState
) -> FinalSaveError:
    reason = _reason(error, final) or f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"
    need = _output_bytes(run)
    try:
        free = f", {shutil.disk_usage(final.parent).free / 1e6:.1f} MB free"
    except OSError:
        free = ""
    where = (
        f"the trained weights are safe in {checkpoint}; fix that, then finish with: "
        f"dreambooth-kit train --config {run.out / 'config.yaml'} train.resume=latest"
        if checkpoint is not None
        else _no_checkpoint_hint(run)
    )
    return FinalSaveError(
        f"could not write {final} ({reason}; it needs about {need / 1e6:.1f} MB{free}); {where}"
    )


def _no_checkpoint_hint(run: LoopState) -> str:
    from dreambooth_kit.training.checkpoint_index import list_checkpoints

    done = list_checkpoints(run.out)
    newest = (
        f"the newest complete checkpoint is {done[-1][1]} (step {done[-1][0]})" if done else "none was saved"
    )
    if run.settings.adapter.type == "full" and run.settings.checkpoint.every_steps is None:
        return f"full fine-tunes checkpoint the final step only with checkpoint.every_steps; {newest}"
    return f"the final step could not be checkpointed either; {newest}"


def _output_bytes(run: LoopState) -> int:
    """What the final output weighs: the trainable tensors for a LoRA, every model for a pipeline."""
    if run.settings.adapter.type == "full":
        half = run.settings.train.save_precision == "fp16"
        models = [run.comps.unet, run.comps.vae, run.comps.text_encoder]
        return sum(p.numel() * (2 if half else 4) for m in models if m is not None for p in m.parameters())
    return sum(p.numel() * 4 for p in run.params)


def refuse_non_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise NonFiniteError(
            f"refusing to write a {what} with non-finite weights ({len(bad)} tensors, e.g. {bad[0]}); "
            "lower train.learning_rate or use train.mixed_precision=bf16"
        )


def clean_tmp_outputs(out: Path) -> list[Path]:
    """Remove temp folders a killed final save left in ``out`` (call under the folder lock)."""
    removed = []
    for pattern in (".tmp-lora*", ".tmp-pipeline*", ".tmp-replaced-lora-*", ".tmp-replaced-pipeline-*"):
        for path in out.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)
            log.info("removed %s, left by an interrupted final save", path)
            removed.append(path)
    return removed


def _tmp_folder(out: Path, name: str) -> Path:
    # A random suffix: a folder left by a killed save is never mistaken for this one (clean-up of
    # `.tmp-*` happens at the next start, under the folder lock).
    from dreambooth_kit.util.atomic import temp_path

    tmp = temp_path(out / name)
    tmp.mkdir(parents=True)
    return tmp


def _swap_in(tmp: Path, final: Path) -> Path:
    """Make ``tmp`` the output ``final`` in one atomic step (an earlier output is replaced only with
    train.overwrite or train.resume, checked before training)."""
    from dreambooth_kit.util.atomic import fsync_tree, publish_folder

    fsync_tree(tmp)
    publish_folder(tmp, final)
    return final


def save_pipeline(
    config: dict,
    save_precision: str,
    accelerator,
    comps,
    unet,
    text_encoder,
    out: Path,
    source: str,
    load_kwargs: dict | None = None,
    *,
    name: str = "pipeline",
) -> Path:
    """Full fine-tune: a complete diffusers pipeline (safetensors) that
    ``StableDiffusionPipeline.from_pretrained`` loads, with the run's ``config`` (a
    ``to_dict()``) beside it as ``dreambooth_kit_config.yaml``. ``load_kwargs``: the base model's
    ``revision``/``variant`` (ModelSource.load_kwargs), so the frozen parts are the trained-on ones."""
    from diffusers import StableDiffusionPipeline

    final = out / name
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return final
    unet = accelerator.unwrap_model(unet)
    te = accelerator.unwrap_model(text_encoder) if text_encoder is not None else None
    refuse_non_finite(unet.state_dict(), "model")
    # Frozen parts are reloaded from the base in fp32, so the saved dtype is exactly save_precision.
    extra = {"text_encoder": te} if te is not None else {}
    pipe = StableDiffusionPipeline.from_pretrained(
        source, unet=unet, safety_checker=None, requires_safety_checker=False, **extra, **(load_kwargs or {})
    )
    pipe.scheduler = type(pipe.scheduler).from_config(comps.noise_scheduler.config)
    dtype = torch.float16 if save_precision == "fp16" else torch.float32
    tmp = _tmp_folder(out, name)
    try:
        pipe.to(dtype=dtype)
        pipe.save_pretrained(tmp, safe_serialization=True)
        # As the merged export: loadable by transformers 4.x stacks too (text_model. keys, vocab.json)
        from dreambooth_kit.export.merged import readable_by_transformers4

        readable_by_transformers4(tmp, pipe.tokenizer)
        save_config_dict(config, tmp / "dreambooth_kit_config.yaml")
        _swap_in(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the swap; the old output after an exchange
        unet.to(dtype=torch.float32)
    return final


def save_lora(
    adapter: AdapterConfig,
    config: dict,
    accelerator,
    unet,
    text_encoder,
    out: Path,
    *,
    name: str = "lora",
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write ``<name>/pytorch_lora_weights.safetensors`` (diffusers format + ``adapter``'s metadata)
    and the resolved ``config`` (a ``to_dict()``) beside it as ``config.yaml``."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return out / name
    te = accelerator.unwrap_model(text_encoder) if text_encoder else None
    return write_lora(adapter, config, accelerator.unwrap_model(unet), te, out / name, extra=extra)


def write_lora(
    adapter: AdapterConfig,
    config: dict,
    unet,
    text_encoder,
    lora_dir: Path,
    *,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """The LoRA of peft-adapted ``unet`` (and ``text_encoder``) as the folder ``lora_dir``, written
    beside it and swapped in: the final LoRA of a run, or a checkpoint's (`evaluate`'s best).
    ``extra``: more safetensors files for the folder, {name: tensors} (adapter.pivotal's embeddings)."""
    from diffusers import StableDiffusionPipeline

    from dreambooth_kit.training.adapters import lora_metadata, lora_state_dicts

    if adapter.type in LYCORIS_TYPES:
        return _write_lycoris(adapter, config, unet, text_encoder, lora_dir, extra)
    unet_sd, te_sd = lora_state_dicts(unet, text_encoder)
    refuse_non_finite({**unet_sd, **(te_sd or {})}, "LoRA")

    def weights(tmp: Path) -> None:
        StableDiffusionPipeline.save_lora_weights(
            tmp,
            unet_lora_layers=unet_sd,
            text_encoder_lora_layers=te_sd,
            unet_lora_adapter_metadata=lora_metadata(adapter),
            text_encoder_lora_adapter_metadata=lora_metadata(adapter, text_encoder=True) if te_sd else None,
            safe_serialization=True,
        )

    return _publish_lora(lora_dir, weights, config, extra)


def _publish_lora(lora_dir: Path, weights, config: dict, extra) -> Path:
    """``weights(folder)`` and the rest of a LoRA folder (``extra`` files, config.yaml) written beside
    ``lora_dir`` and swapped in: a reader sees the old folder or the whole new one."""
    tmp = _tmp_folder(lora_dir.parent, lora_dir.name)
    try:
        weights(tmp)
        _write_extra(tmp, extra)
        save_config_dict(config, tmp / "config.yaml")
        _swap_in(tmp, lora_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return lora_dir


def _write_extra(folder: Path, extra: dict[str, dict[str, torch.Tensor]] | None) -> None:
    from safetensors.torch import save_file

    for name, tensors in (extra or {}).items():
        refuse_non_finite(tensors, name)
        save_file(tensors, str(folder / name), metadata={"format": "pt"})


def _write_lycoris(
    adapter: AdapterConfig, config: dict, unet, text_encoder, lora_dir: Path, extra=None
) -> Path:
    """A LoHa/LoKr run's result (lycoris.py says why not diffusers' format), written and swapped in
    like a LoRA."""
    from safetensors.torch import save_file

    from dreambooth_kit.training.lycoris import file_metadata, state_dict

    sd = state_dict(unet, text_encoder)
    refuse_non_finite(sd, "LoRA")
    meta = file_metadata(adapter, text_encoder is not None)
    return _publish_lora(
        lora_dir, lambda tmp: save_file(sd, str(tmp / LORA_WEIGHTS), metadata=meta), config, extra
    )

"""The merged model: the base with the run's LoRA fused in, as a diffusers folder or one original-layout
single file (A1111/ComfyUI checkpoint folders).

The merged diffusers folder is written as transformers 4.x reads it too (:func:`readable_by_transformers4`):
the text encoder's weights keyed ``text_model.…`` and the tokenizer's ``vocab.json``/``merges.txt`` beside
transformers 5's ``tokenizer.json``. Without them diffusers 0.32 + transformers 4.54 and 0.39 + 4.57 fail
to load the folder at all (the slow CLIPTokenizer finds no vocabulary file), and with only the tokenizer
fixed they would load a randomly initialised text encoder with a warning.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from dreambooth_kit.export.kohya import run_prediction_type
from dreambooth_kit.training.layout import RunLayout
from dreambooth_kit.util.atomic import writing_folder


def _merged_pipeline(run_dir: Path, *, fp16: bool):
    """The run's base with its LoRA fused in (diffusers' own fuse -> unload path), on CPU.

    The base is loaded as training loaded it (``model.allow_pickle``, ``model.single_file_config``) and
    with the run's prediction type, so a run trained on a .ckpt or a single file exports too, and the
    merged scheduler says what the run trained (``pipe.scheduler.config.prediction_type``)."""

    from dreambooth_kit.config import load_config
    from dreambooth_kit.inference.pipeline import load_pipeline
    from dreambooth_kit.models.source import resolve_source
    from dreambooth_kit.training.runfolder import Run

    run = RunLayout(run_dir)
    cfg = load_config(run.config)
    # The model the run trained on: its record while that folder exists and config.yaml still names
    # that model (a cache may have been cleared, the run copied to another machine, or config.yaml
    # edited to point at the base's new place: then resolved again from config.yaml), with the run's
    # prediction type, so a run trained on a .ckpt, a single file or a hub revision exports.
    recorded = Run.open(run_dir).model_source()
    usable = recorded is not None and recorded.is_local and recorded.pretrained == cfg.model.pretrained
    source = recorded if usable else resolve_source(cfg.model)
    source = dataclasses.replace(source, prediction_type=run_prediction_type(cfg.model))
    pipe = load_pipeline(source, lora=run.lora, fuse=True, device="cpu", dtype="fp32")
    pipe.unload_lora_weights()  # the fused weights stay; the LoRA layers go
    from dreambooth_kit.training.pivotal import write_into_table

    # adapter.pivotal: the vectors into the text encoder's table (the LoRA folder holds its config.yaml)
    write_into_table(pipe, run.lora, Run.open(run.lora).config() or {})
    if fp16:
        pipe.to(dtype=torch.float16)
    return pipe


def export_merged_diffusers(run_dir: Path, out_dir: Path, *, fp16: bool = False) -> Path:
    """The base model with the run's LoRA fused into its weights, as a diffusers folder that
    ``StableDiffusionPipeline.from_pretrained`` loads with no LoRA support at all; written to a temp
    folder and swapped in."""
    out_dir = Path(out_dir)
    pipe = _merged_pipeline(run_dir, fp16=fp16)
    with writing_folder(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        readable_by_transformers4(tmp, pipe.tokenizer)
    return out_dir


def readable_by_transformers4(folder: Path, tokenizer) -> None:
    """Make a diffusers folder saved under transformers 5 loadable by transformers 4.x as well; 5.x
    reads the result exactly as before (it maps ``text_model.`` away, as for every SD 2.x hub model).

    - ``text_encoder/*.safetensors``: keys ``text_model.…``. transformers 5 saves CLIPTextModel flat
      (``encoder.layers.0…``); 4.x's class has a ``text_model`` level and initialises every flat key
      at random, with only a warning.
    - ``tokenizer/vocab.json`` + ``merges.txt``: 5.x saves ``tokenizer.json`` only; diffusers loads
      the ``CLIPTokenizer`` that model_index.json names, which in 4.x is the slow tokenizer reading
      these two files (without them: TypeError, the folder does not load). Written by the tokenizers
      library from the same BPE model, so both tokenizers give the same ids."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    te_dir = Path(folder) / "text_encoder"
    for f in sorted(te_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            meta = h.metadata() or {}
            sd = {k: h.get_tensor(k) for k in h.keys()}
        if all(k.startswith("text_model.") for k in sd):
            continue
        save_file({_text_model_key(k): v for k, v in sd.items()}, str(f), metadata=meta | {"format": "pt"})
    index = te_dir / "model.safetensors.index.json"
    if index.is_file():  # a sharded text encoder: the index names every key's shard
        data = json.loads(index.read_text())
        data["weight_map"] = {_text_model_key(k): v for k, v in data["weight_map"].items()}
        index.write_text(json.dumps(data, indent=2))
    tok_dir = Path(folder) / "tokenizer"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if tok_dir.is_dir() and backend is not None and not (tok_dir / "vocab.json").exists():
        backend.model.save(str(tok_dir))  # tokenizers' BPE writes vocab.json and merges.txt


def _text_model_key(key: str) -> str:
    return key if key.startswith("text_model.") else f"text_model.{key}"


def export_single_file(run_dir: Path, out_path: Path, *, fp16: bool = False) -> Path:
    """The merged model as one original-layout ``.safetensors`` (A1111/ComfyUI checkpoint folders)
    with the matching ``v2-inference(-v).yaml`` beside it."""
    from dreambooth_kit.models.singlefile import save_single_file

    pipe = _merged_pipeline(run_dir, fp16=False)
    return save_single_file(pipe, out_path, prediction_type=pipe.scheduler.config.prediction_type, fp16=fp16)

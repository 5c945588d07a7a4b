"""What a checkpoint holds of the trained weights, hooked into accelerate's ``save_state``/``load_state``: the
LoRA tensors only (never the frozen base), DeepSpeed's own weight files, the pivotal-tuning token
vectors and the EMA weights beside them."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dreambooth_kit.training.checkpoint_index import LORA_SUFFIX, CheckpointError, _earlier_hint, _short
from dreambooth_kit.training.layout import CHECKPOINT_EMA
from dreambooth_kit.training.resume_checks import ADAPTER_KEY_PARTS

if TYPE_CHECKING:
    from accelerate import Accelerator

    from dreambooth_kit.training.ema import TrainedEMA


def register_lora_hooks(accelerator: Accelerator, models: dict[str, torch.nn.Module]) -> None:
    """Make ``accelerator.save_state``/``load_state`` store only the LoRA tensors of ``models``.

    ``models`` maps a name to a peft-adapted model (``{"unet": unet, "text_encoder": te}``), prepared
    or not: models are matched to the accelerator's prepared ones after unwrapping, when a save or
    load runs, so this may be called before or after ``accelerator.prepare``. Each becomes
    ``<name>_lora.safetensors`` (peft's ``get_peft_model_state_dict``) and is taken out of
    accelerate's list, so the frozen base (3.4 GB at SD 2.1) is never written. Other prepared models
    are still saved by accelerate itself. Calling this again replaces the earlier registration.
    """
    for handle in getattr(accelerator, "_dreambooth_kit_lora_hooks", ()):
        handle.remove()
    accelerator._dreambooth_kit_lora_hooks = (
        accelerator.register_save_state_pre_hook(functools.partial(_save_lora_hook, accelerator, models)),
        accelerator.register_load_state_pre_hook(functools.partial(_load_lora_hook, accelerator, models)),
    )


def _lora_models(
    accelerator: Accelerator, models: dict[str, torch.nn.Module], prepared: list
) -> list[tuple[int, str, torch.nn.Module]]:
    """(index in ``prepared``, name, unwrapped model) of each registered model."""
    wanted = {id(accelerator.unwrap_model(m)): name for name, m in models.items()}
    found = []
    for i, m in enumerate(prepared):
        inner = accelerator.unwrap_model(m)
        if id(inner) in wanted:
            found.append((i, wanted.pop(id(inner)), inner))
    if wanted:
        raise CheckpointError(
            f"register_lora_hooks: {sorted(wanted.values())} not prepared by this accelerator; "
            "pass the models given to accelerator.prepare()"
        )
    return found


def _save_lora_hook(
    accelerator: Accelerator,
    models: dict[str, torch.nn.Module],
    prepared: list,
    weights: list,
    output_dir: str,
) -> None:
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    found = _lora_models(accelerator, models, prepared)
    if accelerator.is_main_process:
        for _, name, model in found:
            state = get_peft_model_state_dict(model)
            state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
            save_file(state, os.path.join(output_dir, name + LORA_SUFFIX), metadata={"format": "pt"})
    # `prepared` is accelerator._models itself: only the weights list may be shortened.
    for i, _, _ in reversed(found):
        weights.pop(i)


def _load_lora_hook(
    accelerator: Accelerator, models: dict[str, torch.nn.Module], prepared: list, input_dir: str
) -> None:
    found = _lora_models(accelerator, models, prepared)
    for _, name, model in found:
        load_lora_file(model, Path(input_dir).resolve() / (name + LORA_SUFFIX))
    # This list is a copy made by load_state: popping keeps accelerate's model files aligned.
    for i, _, _ in reversed(found):
        prepared.pop(i)


def load_lora_file(model: torch.nn.Module, path: Path) -> None:
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    try:
        state = load_file(path)
    except Exception as e:
        raise CheckpointError(
            f"{path} cannot be read ({type(e).__name__}); {_earlier_hint(path.parent)}"
        ) from e
    try:
        result = set_peft_model_state_dict(model, state)
    except RuntimeError as e:  # shape mismatch: another rank or other target modules
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), _short(e))
        raise CheckpointError(
            f"{path} does not fit the model's LoRA ({detail}); it was saved with another "
            "adapter.rank or adapter.target_modules"
        ) from e
    missing = [k for k in result.missing_keys if any(p in k for p in ADAPTER_KEY_PARTS)]
    if result.unexpected_keys or missing:
        raise CheckpointError(
            f"{path} does not fit the model's LoRA: {len(result.unexpected_keys)} unknown "
            f"and {len(missing)} missing tensors (e.g. {(result.unexpected_keys or missing)[0]})"
        )


def register_deepspeed_weights_hook(accelerator: Accelerator) -> None:
    """Under DeepSpeed, also write each prepared model's weights as ``model.safetensors`` (then
    ``model_1``, ...) in every checkpoint, as accelerate does without DeepSpeed.

    accelerate hands a DeepSpeed checkpoint to the engine, which writes the weights only inside its
    torch pickles (``pytorch_model/mp_rank_00_model_states.pt``): ``evaluate`` and anyone scoring a
    step would have to unpickle them, and loading a pickle needs an explicit opt-in here. Under
    ZeRO-2 every process holds the whole weights, so the main process writes them (fp32 for the
    SD 2.1 UNet: 3.5 GB per checkpoint, beside DeepSpeed's ~14 GB). Resuming reads DeepSpeed's own
    files; these are for reading a step's weights."""
    accelerator.register_save_state_pre_hook(functools.partial(_save_deepspeed_weights, accelerator))


def _save_deepspeed_weights(accelerator: Accelerator, prepared: list, weights: list, output_dir: str) -> None:
    from safetensors.torch import save_file

    if not accelerator.is_main_process:
        return
    for i, model in enumerate(prepared):
        state = accelerator.unwrap_model(model).state_dict()
        state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        name = "model" if i == 0 else f"model_{i}"
        save_file(state, os.path.join(output_dir, f"{name}.safetensors"), metadata={"format": "pt"})


def read_checkpoint_pivots(pivots, folder: Path) -> None:
    """adapter.pivotal's vectors from a checkpoint (refused when it has none: trained without)."""
    from safetensors.torch import load_file

    from dreambooth_kit.training.pivotal import CHECKPOINT_FILE, load_checkpoint_tensors

    file = folder / CHECKPOINT_FILE
    if not file.is_file():
        raise CheckpointError(
            f"{folder} holds no {CHECKPOINT_FILE} (it was trained without adapter.pivotal); resume it "
            "with adapter.pivotal=false"
        )
    load_checkpoint_tensors(pivots, load_file(str(file)))


def trained_models(
    accelerator: Accelerator, unet, text_encoder=None, pivots=None
) -> dict[str, torch.nn.Module]:
    """The unwrapped trained models by name: the UNet, the text encoder when it is trained, and
    adapter.pivotal's vectors; what ``ema/`` holds, in this order."""
    return (
        {"unet": accelerator.unwrap_model(unet)}
        | ({"text_encoder": accelerator.unwrap_model(text_encoder)} if text_encoder is not None else {})
        | ({"pivotal": pivots} if pivots is not None else {})  # the vectors, not a model
    )


def write_checkpoint_ema(folder: Path, models: dict[str, torch.nn.Module], *, lora: bool) -> None:
    """The average (already swapped in) as ``folder/ema/``: each model's LoRA in peft keys, or a full
    fine-tune's models as accelerate names them (``model``, ``model_1``)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from dreambooth_kit.training.pivotal import CHECKPOINT_FILE, checkpoint_tensors

    dest = folder / CHECKPOINT_EMA
    dest.mkdir()
    for i, (name, model) in enumerate(models.items()):
        if name == "pivotal":
            save_file(
                checkpoint_tensors(model), os.path.join(dest, CHECKPOINT_FILE), metadata={"format": "pt"}
            )
            continue
        state = get_peft_model_state_dict(model) if lora else model.state_dict()
        state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        file = name + LORA_SUFFIX if lora else ("model" if i == 0 else f"model_{i}") + ".safetensors"
        save_file(state, os.path.join(dest, file), metadata={"format": "pt"})


def read_checkpoint_ema(
    ema: TrainedEMA, folder: Path, models: dict[str, torch.nn.Module], *, lora: bool, steps: int
) -> None:
    """A checkpoint's ``ema/`` into ``ema``; the models' own weights are left as they were."""
    from safetensors.torch import load_file

    src = folder / CHECKPOINT_EMA
    if not src.is_dir():
        raise CheckpointError(
            f"{folder} holds no {CHECKPOINT_EMA}/ (it was trained without train.ema): resume it with "
            "train.ema=false, or start a new run with train.ema=true"
        )
    ema.model.store(ema.params)
    try:
        for i, (name, model) in enumerate(models.items()):
            if name == "pivotal":
                read_checkpoint_pivots(model, src)
            elif lora:
                load_lora_file(model, src / (name + LORA_SUFFIX))
            else:
                file = ("model" if i == 0 else f"model_{i}") + ".safetensors"
                model.load_state_dict(load_file(src / file))
        ema.take_from_model(steps)
    finally:
        ema.model.restore(ema.params)

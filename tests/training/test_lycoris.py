"""adapter.type dora / loha / lokr: trained through peft's configs, saved, loaded by generate and
evaluate, and exported with the key names and scales A1111 and ComfyUI read."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_cfg
from safetensors.torch import load_file

from dreambooth_kit.inference.generate import generate
from dreambooth_kit.inference.pipeline import load_pipeline
from dreambooth_kit.training.train import train

PROMPT = "a photo of zwx toy"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    """A 2-step run of each type (lr 1e-2: the adapters move enough to change an image)."""
    from conftest import train_tiny

    return {
        kind: train_tiny(
            tmp_path_factory.mktemp(kind),
            tiny_model,
            **{"adapter.type": kind, "train.max_steps": 2, "train.learning_rate": 1e-2, "adapter.alpha": 8},
        )  # fmt: skip
        for kind in ("dora", "loha", "lokr")
    }


def _image(pipe, **kw) -> np.ndarray:
    return np.asarray(generate(pipe, PROMPT, seed=3, steps=2, **kw)[0].image, dtype=np.int16)


@pytest.mark.parametrize("kind", ["dora", "loha", "lokr"])
def test_each_type_trains_its_own_tensors_and_generate_loads_them(runs, tiny_model, kind):
    result = runs[kind]
    sd = load_file(result.lora_path)
    part = {"dora": "lora_magnitude_vector", "loha": "hada_w1_a", "lokr": "lokr_w1"}[kind]
    assert any(part in k for k in sd), list(sd)[:4]
    base = _image(load_pipeline(str(tiny_model)))
    tuned = load_pipeline(str(tiny_model), lora=result.lora_dir)
    assert np.abs(_image(tuned) - base).max() > 0  # the adapter acts
    off = _image(load_pipeline(str(tiny_model), lora=result.lora_dir, lora_scale=0.0))
    if kind == "dora":  # peft scales DoRA's low-rank part only: its magnitudes act at scale 0 too
        assert np.abs(off - _image(tuned)).max() > 0
    else:  # lora_scale reaches the LyCORIS layers (diffusers' set_adapters does not): 0 = the base model
        assert np.abs(off - base).max() <= 1


def test_plain_diffusers_loads_the_dora_as_trained(runs, tiny_model):
    from diffusers import StableDiffusionPipeline

    ours = load_pipeline(str(tiny_model), lora=runs["dora"].lora_dir, dtype="float32")
    plain = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    plain.load_lora_weights(runs["dora"].lora_dir)
    g = torch.Generator().manual_seed(0)
    a = plain(PROMPT, num_inference_steps=2, generator=g, output_type="np").images[0]
    g = torch.Generator().manual_seed(0)
    b = ours(PROMPT, num_inference_steps=2, generator=g, output_type="np").images[0]
    assert np.abs(a - b).max() < 1e-5


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_the_lycoris_export_applies_the_weight_change_peft_trained(runs, tiny_model, tmp_path, kind):
    """Each exported layer's weight change, computed as A1111 and ComfyUI compute it from these keys
    (LoHa: (w1a @ w1b) * (w2a @ w2b) * alpha / rows of w1b; LoKr with whole factors: kron(w1, w2)
    at scale 1), equals peft's get_delta_weight of the trained layer."""
    from dreambooth_kit.export.kohya import export_kohya
    from dreambooth_kit.training.lycoris import kohya_name

    path = export_kohya(runs[kind].lora_dir, tmp_path / f"{kind}.safetensors")
    exported = load_file(path)
    pipe = load_pipeline(str(tiny_model), lora=runs[kind].lora_dir, dtype="float32")
    checked = 0
    for module_name, module in pipe.unet.named_modules():
        if not hasattr(module, "get_delta_weight") or "lora0" not in getattr(module, "scaling", {}):
            continue
        want = module.get_delta_weight("lora0")
        name = kohya_name(f"unet.{module_name}")
        if kind == "loha":
            w = {p: exported[f"{name}.hada_{p}"] for p in ("w1_a", "w1_b", "w2_a", "w2_b")}
            scale = float(exported[f"{name}.alpha"]) / w["w1_b"].shape[0]
            got = (w["w1_a"] @ w["w1_b"]) * (w["w2_a"] @ w["w2_b"]) * scale
        else:
            assert f"{name}.alpha" not in exported and f"{name}.lokr_w2_a" not in exported
            got = torch.kron(exported[f"{name}.lokr_w1"], exported[f"{name}.lokr_w2"]).reshape(want.shape)
        torch.testing.assert_close(got.reshape(want.shape), want, rtol=1e-4, atol=1e-6)
        checked += 1
    assert checked == len({k.rsplit(".", 1)[0] for k in exported}) > 0  # every exported layer


def test_a_dora_kohya_export_is_refused_with_the_reason_and_the_way_out(runs, tmp_path):
    from dreambooth_kit.export.kohya import ExportError, export_kohya

    with pytest.raises(
        ExportError, match="A1111 normalises DoRA per input column, peft trains it per output row"
    ):
        export_kohya(runs["dora"].lora_dir, tmp_path / "dora.safetensors")


@pytest.mark.parametrize("kind", ["dora", "loha", "lokr"])
def test_a_resumed_run_of_each_type_ends_with_the_uninterrupted_runs_tensors(
    runs, tiny_model, tmp_path, kind
):
    """3 steps straight against the 2-step run's last checkpoint resumed to 3 steps (into another
    folder): the same adapter tensors, bit for bit."""
    from dreambooth_kit.training.checkpoint_index import list_checkpoints

    first = runs[kind]
    photos = first.output_dir.parent / "photos"
    common = {"adapter.type": kind, "train.max_steps": 3, "train.learning_rate": 1e-2, "adapter.alpha": 8}
    straight = train(tiny_cfg(tmp_path / "a", tiny_model, photos, **common))
    (step, ckpt), *_ = list_checkpoints(first.output_dir)
    resumed = train(tiny_cfg(tmp_path / "b", tiny_model, photos, **common, **{"train.resume": str(ckpt)}))
    a, b = load_file(straight.lora_path), load_file(resumed.lora_path)
    assert step == 2 and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_lokr_factor_stored_in_two_parts_is_exported_whole_with_its_scale():
    """At SD sizes peft stores LoKr's second factor as two matrices (a 320-wide layer at rank 4:
    20 x 4 and 4 x 20); A1111 cannot read that, so the export multiplies it out."""
    from peft import LoKrConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict

    from dreambooth_kit.training.lycoris import to_lycoris

    torch.manual_seed(0)
    model = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(320, 320)), LoKrConfig(r=4, alpha=8, target_modules=["0"])
    )
    layer = model.base_model.model[0]
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.normal_()
    sd = {
        f"unet.{k.removeprefix('base_model.model.')}": v for k, v in get_peft_model_state_dict(model).items()
    }
    assert any(k.endswith("lokr_w2_a") for k in sd)
    out = to_lycoris(sd, {"type": "lokr", "rank": 4, "alpha": 8})
    got = torch.kron(out["lora_unet_0.lokr_w1"], out["lora_unet_0.lokr_w2"])
    torch.testing.assert_close(got, layer.get_delta_weight("default"), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["dora", "loha", "lokr"])
def test_the_merged_export_draws_what_the_adapter_draws(runs, tiny_model, tmp_path, kind):
    """The way out for A1111 and ComfyUI users of any type: the base with the adapter fused in."""
    from dreambooth_kit.export.merged import export_merged_diffusers

    merged = export_merged_diffusers(runs[kind].output_dir, tmp_path / "merged")
    with_adapter = _image(load_pipeline(str(tiny_model), lora=runs[kind].lora_dir, dtype="float32"))
    fused = _image(load_pipeline(str(merged), dtype="float32"))
    base = _image(load_pipeline(str(tiny_model), dtype="float32"))
    assert np.abs(fused - with_adapter).max() <= 2 and np.abs(fused - base).max() > 2


def test_a_loha_model_card_loads_it_with_dreambooth_kit_not_diffusers_alone(runs):
    from dreambooth_kit.training import card

    card = card.model_card(runs["loha"].output_dir, repo_id="me/zwx-loha")
    assert "from dreambooth_kit import load_pipeline" in card and "load_lora_weights" not in card


def test_a_dora_run_asking_for_a_kohya_export_is_refused_before_training():
    from dreambooth_kit.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="export.formats: kohya cannot hold a DoRA as trained"):
        load_config("tiny.yaml", {"adapter.type": "dora", "export.formats": ["kohya"]})

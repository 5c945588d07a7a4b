from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import E2E_TIMEOUT, REPO, tiny_cfg
from safetensors import safe_open
from safetensors.torch import load_file

from dreambooth_kit.training.train import train

# ------------------------------------------------------------------ end to end on the tiny model


def test_training_writes_lora_with_metadata_and_config(trained_run):
    r = trained_run["result"]
    assert r.steps == 3 and len(r.losses) == 3 and all(np.isfinite(r.losses))
    assert r.lora_path.exists() and (r.lora_dir / "config.yaml").exists()
    assert (r.output_dir / "config.yaml").exists()
    with safe_open(r.lora_path, "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert keys and all(k.startswith("unet.") for k in keys)
    lora_meta = json.loads(meta["lora_adapter_metadata"])
    assert lora_meta["unet.r"] == 4 and lora_meta["unet.lora_alpha"] == 8


def test_training_changes_lora_weights(trained_run):
    sd = load_file(trained_run["result"].lora_path)
    ups = [v for k, v in sd.items() if "lora_B" in k or "lora.up" in k]
    assert ups and any(v.abs().max() > 0 for v in ups)  # B starts at zero; training moved it


def test_base_weights_bit_identical_after_training(trained_run):
    assert trained_run["unet_file"].read_bytes() == trained_run["unet_bytes_before"]


def test_lora_loads_in_plain_diffusers_and_changes_output(trained_run, tiny_model):
    from diffusers import StableDiffusionPipeline

    def run(pipe):
        g = torch.Generator().manual_seed(0)
        return pipe(
            "a photo of zwx toy", num_inference_steps=2, height=64, width=64, generator=g, output_type="np"
        ).images

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    base = run(pipe)
    pipe.load_lora_weights(trained_run["result"].lora_dir)
    with_lora = run(pipe)
    assert np.abs(base - with_lora).max() > 1e-4
    pipe.unload_lora_weights()
    assert np.allclose(run(pipe), base, atol=1e-6)  # unloading restores the base


def test_alpha_not_rank_lora_reloads_at_the_right_scale(tmp_path, tiny_model):
    """r=4, alpha=8 (scale 2): the saved file reloads to the in-memory outputs, and the metadata
    is what makes that true."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    from dreambooth_kit.config import AdapterConfig
    from dreambooth_kit.training.adapters import add_lora, lora_metadata, lora_state_dicts

    cfg = AdapterConfig(rank=4, alpha=8, init_lora_weights=False)  # random B: the LoRA is not a no-op
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    add_lora(unet, None, cfg)
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 77, 32)
    with torch.no_grad():
        expected = unet(x, t, c).sample
    sd, _ = lora_state_dicts(unet, None)

    def reloaded(metadata):
        out = tmp_path / ("with" if metadata else "without")
        StableDiffusionPipeline.save_lora_weights(
            out, unet_lora_layers=sd, unet_lora_adapter_metadata=metadata
        )
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
        pipe.load_lora_weights(out)
        with torch.no_grad():
            return pipe.unet(x, t, c).sample

    assert torch.allclose(reloaded(lora_metadata(cfg)), expected, atol=1e-5)
    assert not torch.allclose(reloaded(None), expected, atol=1e-3)  # alpha lost -> wrong scale


def test_preflight_fails_before_any_model_loads(tmp_path, tiny_model, photos, monkeypatch):
    import dreambooth_kit.models.source as models
    from dreambooth_kit.data.preflight import PreflightError

    (photos / "notimage.jpg").write_text("this is not a jpeg")
    monkeypatch.setattr(
        models, "load_components", lambda *a, **k: pytest.fail("model loaded before preflight")
    )
    with pytest.raises(PreflightError, match="notimage.jpg"):
        train(tiny_cfg(tmp_path, tiny_model, photos))
    assert not (tmp_path / "class_images").exists() or not any((tmp_path / "class_images").iterdir())


def test_existing_lora_is_not_overwritten(tmp_path, tiny_model, photos):
    run = tmp_path / "run" / "lora"
    run.mkdir(parents=True)
    (run / "pytorch_lora_weights.safetensors").write_bytes(b"user's earlier LoRA")
    with pytest.raises(FileExistsError, match="train.overwrite"):
        train(tiny_cfg(tmp_path, tiny_model, photos))
    assert (run / "pytorch_lora_weights.safetensors").read_bytes() == b"user's earlier LoRA"


def test_same_seed_same_lora(tmp_path, tiny_model, photos):
    """Two runs with the same config produce bit-identical LoRA tensors (CPU)."""
    a = train(
        tiny_cfg(
            tmp_path / "a",
            tiny_model,
            photos,
            **{"train.max_steps": 2, "prior.with_prior_preservation": False},
        )
    )
    b = train(
        tiny_cfg(
            tmp_path / "b",
            tiny_model,
            photos,
            **{"train.max_steps": 2, "prior.with_prior_preservation": False},
        )
    )
    sa, sb = load_file(a.lora_path), load_file(b.lora_path)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.losses == b.losses


def test_text_encoder_lora_and_min_snr_and_accumulation(tmp_path, tiny_model, photos):
    r = train(
        tiny_cfg(
            tmp_path,
            tiny_model,
            photos,
            **{
                "adapter.train_text_encoder": True,
                "train.snr_gamma": 5.0,
                "train.gradient_accumulation_steps": 2,
                "train.gradient_checkpointing": True,
                "train.noise_offset": 0.05,
                "train.lr_scheduler": "cosine",
                "train.lr_warmup_steps": 1,
                "train.max_steps": 2,
            },
        )
    )
    sd = load_file(r.lora_path)
    assert any(k.startswith("text_encoder.") for k in sd) and any(k.startswith("unet.") for k in sd)
    assert r.steps == 2


def test_bf16_mixed_precision_keeps_lora_params_fp32(tmp_path, tiny_model, photos, monkeypatch):
    """Checked on the parameters the optimizer steps, during training: the saved file is cast to fp32
    whatever the training precision, so asserting on it could not fail."""
    import dreambooth_kit.training.loop as loop_mod

    seen = {}
    real_step = loop_mod._step

    def spy(ctx, *a, **k):
        seen["trained"] = {p.dtype for p in ctx.params}
        seen["optimized"] = {p.dtype for g in ctx.optimizer.param_groups for p in g["params"]}
        seen["frozen"] = {p.dtype for p in ctx.unet.parameters() if not p.requires_grad}
        return real_step(ctx, *a, **k)

    monkeypatch.setattr(loop_mod, "_step", spy)
    train(tiny_cfg(tmp_path, tiny_model, photos, **{"train.mixed_precision": "bf16", "train.max_steps": 1}))
    assert seen == {"trained": {torch.float32}, "optimized": {torch.float32}, "frozen": {torch.bfloat16}}


def test_set_attention_picks_sdpa_and_explains_missing_xformers(tiny_model, monkeypatch):
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    from dreambooth_kit.models.source import set_attention

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    assert set_attention(unet, "sdpa") == "sdpa"
    assert all(isinstance(p, AttnProcessor2_0) for p in unet.attn_processors.values())
    monkeypatch.setitem(sys.modules, "xformers", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"dreambooth_kit\[xformers\]"):
        set_attention(unet, "xformers")


def test_8bit_adam_without_bitsandbytes_is_explained(tmp_path, tiny_model, photos, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(ImportError, match=r"dreambooth_kit\[bnb\]"):
        train(
            tiny_cfg(
                tmp_path,
                tiny_model,
                photos,
                **{"train.use_8bit_adam": True, "prior.with_prior_preservation": False},
            )
        )


@pytest.mark.slow
def test_accelerate_launch_runs_two_steps(tmp_path, tiny_model, photos):
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "accelerate_config.yaml"),
        "-m", "dreambooth_kit.training.train", "--config", "tiny.yaml",
        f"model.pretrained={tiny_model}", f"data.instance_dir={photos}", f"prior.class_dir={tmp_path / 'cls'}",
        "prior.num_class_images=2", "prior.sample_steps=1", f"train.output_dir={out}", "train.max_steps=2",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=E2E_TIMEOUT, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert "step 2/2" in proc.stderr


# ------------------------------------------------------------------ modes and features


def test_full_finetune_saves_a_pipeline_plain_diffusers_loads(tmp_path, tiny_model, photos):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    base_bytes = (tiny_model / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    r = train(
        tiny_cfg(
            tmp_path,
            tiny_model,
            photos,
            **{
                "adapter.type": "full",
                "train.max_steps": 2,
                "train.learning_rate": 1e-3,
                "train.save_precision": "fp16",
            },
        )
    )
    pipe_dir = r.pipeline_dir
    assert pipe_dir == tmp_path / "run" / "pipeline" and (pipe_dir / "model_index.json").exists()
    assert not list(pipe_dir.rglob("*.bin"))  # safetensors only
    saved = load_file(pipe_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(v.dtype == torch.float16 for v in saved.values())  # train.save_precision=fp16
    # The resolved run config (prediction type included) travels with the pipeline, byte for byte.
    run_config = (r.output_dir / "config.yaml").read_bytes()
    assert (pipe_dir / "dreambooth_kit_config.yaml").read_bytes() == run_config
    pipe = StableDiffusionPipeline.from_pretrained(pipe_dir, dtype=torch.float32)  # fp16 runs on CUDA
    base = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    trained, orig = pipe.unet.state_dict(), base.state_dict()
    assert trained.keys() == orig.keys()
    assert any(not torch.allclose(trained[k].float(), orig[k], atol=1e-3) for k in orig)
    assert (tiny_model / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == base_bytes
    images = pipe("a photo of zwx toy", num_inference_steps=1, height=64, width=64, output_type="np").images
    assert images.shape == (1, 64, 64, 3)


def test_validation_writes_samples_without_changing_training(tmp_path, tiny_model, photos):
    common = {"train.max_steps": 4, "prior.with_prior_preservation": False}
    plain = train(tiny_cfg(tmp_path / "a", tiny_model, photos, **common))
    validated = train(
        tiny_cfg(
            tmp_path / "b",
            tiny_model,
            photos,
            **common,
            **{"validation.every_steps": 2, "validation.num_images": 2, "validation.steps": 2},
        )
    )
    for step in ("step-000002", "step-000004"):
        d = validated.output_dir / "samples" / step
        assert (d / "grid.png").exists() and len(list(d.glob("p0-*.png"))) == 2
    a, b = load_file(plain.lora_path), load_file(validated.lora_path)
    assert all(torch.equal(a[k], b[k]) for k in a)  # validation left the trajectory untouched


def test_periodic_checkpoints_keep_last_two(tmp_path, tiny_model, photos):
    r = train(
        tiny_cfg(
            tmp_path,
            tiny_model,
            photos,
            **{"train.max_steps": 8, "checkpoint.every_steps": 2, "checkpoint.keep_last": 2},
        )
    )
    names = sorted(p.name for p in (r.output_dir / "checkpoints").iterdir())
    assert names == ["step-000006", "step-000008"]
    big = max(f.stat().st_size for f in (r.output_dir / "checkpoints" / "step-000008").iterdir())
    base = (tiny_model / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert big < base / 4  # the LoRA and optimizer state only, never the frozen base


def test_resume_with_another_rank_is_refused_naming_the_field(tmp_path, tiny_model, photos):
    from dreambooth_kit.training.checkpoint_index import CheckpointError

    train(tiny_cfg(tmp_path, tiny_model, photos, **{"train.max_steps": 2, "checkpoint.every_steps": 2}))
    cfg = tiny_cfg(
        tmp_path, tiny_model, photos, **{"train.max_steps": 4, "train.resume": "latest", "adapter.rank": 8}
    )
    with pytest.raises(CheckpointError, match="adapter.rank"):
        train(cfg)
    ok = train(tiny_cfg(tmp_path, tiny_model, photos, **{"train.max_steps": 4, "train.resume": "latest"}))
    assert ok.steps == 4 and len(ok.losses) == 2  # continued from step 2


def test_two_concepts_and_captions(tmp_path, tiny_model, photos):
    import shutil

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    imgs = sorted(photos.glob("*.jpg"))
    for p in imgs[:3]:
        shutil.copy(p, a / p.name)
    for p in imgs[3:]:
        shutil.copy(p, b / p.name)
    (a / imgs[0].with_suffix(".txt").name).write_text("a photo of zwx toy on a beach")
    cfg = tiny_cfg(
        tmp_path,
        tiny_model,
        photos,
        **{
            "data.instance_dir": "",
            "data.identifier": None,
            "data.use_captions": True,
            "concepts": [
                {"instance_dir": str(a), "instance_prompt": "a photo of zwx toy", "identifier": "zwx"},
                {
                    "instance_dir": str(b),
                    "instance_prompt": "a photo of sks robot",
                    "class_prompt": "a photo of a robot",
                },
            ],
            "train.max_steps": 3,
        },
    )
    r = train(cfg)
    cls = tmp_path / "class_images"
    m0 = json.loads((cls / "concept-0" / "manifest.json").read_text())
    m1 = json.loads((cls / "concept-1" / "manifest.json").read_text())
    assert m0["prompt"] == "a photo of a toy" and m1["prompt"] == "a photo of a robot"
    assert r.steps == 3 and r.lora_path.exists()


def test_tensorboard_logs_loss_and_lr(tmp_path, tiny_model, photos):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = train(
        tiny_cfg(tmp_path, tiny_model, photos, **{"train.report_to": "tensorboard", "train.max_steps": 3})
    )
    events = list((r.output_dir / "logs").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"loss", "lr", "loss_instance", "loss_prior", "step_time"} <= set(tags)
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]


def test_text_encoder_gets_its_own_learning_rate():
    from dreambooth_kit.config import load_config
    from dreambooth_kit.training.build import build_optimizer

    unet_p, te = torch.nn.Parameter(torch.zeros(2)), torch.nn.Linear(2, 2)
    cfg = load_config("tiny.yaml", {"train.learning_rate": 1e-4, "train.text_encoder_learning_rate": 5e-6})
    opt = build_optimizer(cfg, [unet_p, *te.parameters()], 1, te)
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 5e-6]
    assert opt.param_groups[0]["params"] == [unet_p] and len(opt.param_groups[1]["params"]) == 2
    assert len(build_optimizer(cfg, [unet_p], 1, None).param_groups) == 1


# ------------------------------------------------------------------ reliability: folders, launches, records


def test_resolved_prediction_type_is_recorded_in_the_run_config(trained_run):
    """The tiny model is v-prediction and the config left model.prediction_type null: exports read
    the resolved value from config.yaml instead of guessing (a v run labelled epsilon gives noise)."""
    import yaml

    assert trained_run["cfg"].model.prediction_type is None
    result = trained_run["result"]
    for path in (result.output_dir / "config.yaml", result.lora_dir / "config.yaml"):
        assert yaml.safe_load(path.read_text())["model"]["prediction_type"] == "v_prediction", path


@pytest.mark.parametrize("where", ["itself", "parent"])
def test_output_dir_that_is_a_file_is_named_before_anything_is_created(tmp_path, tiny_model, photos, where):
    from dreambooth_kit.data.preflight import PreflightError

    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    out = blocker if where == "itself" else blocker / "run"
    cfg = tiny_cfg(tmp_path, tiny_model, photos, **{"train.output_dir": str(out)})
    with pytest.raises(PreflightError, match=f"train.output_dir: {out}.* {blocker} is a file, not a folder|"
                       f"train.output_dir: {blocker} is a file, not a folder"):  # fmt: skip
        train(cfg)
    assert blocker.read_text() == "not a folder" and not (tmp_path / "class_images").exists()


class _Acc:
    """What check_launch/check_deepspeed read of an Accelerator: the process count and, under a
    DeepSpeed launch, the plugin's config (as accelerate builds it from the accelerate config)."""

    def __init__(self, n: int, deepspeed: dict | None = None):
        self.num_processes = n
        plugin = None if deepspeed is None else SimpleNamespace(deepspeed_config=deepspeed)
        self.state = SimpleNamespace(deepspeed_plugin=plugin)


@pytest.mark.parametrize(
    "env, n, expect",
    [
        ({"WORLD_SIZE": "2", "RANK": "0"}, 1, "ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2"),
        ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, 1, "starts ONE process"),
        ({"WORLD_SIZE": "2", "RANK": "1"}, 2, None),
        ({"ACCELERATE_USE_CPU": "True"}, 1, None),  # `accelerate launch --cpu`, one process asked
        ({}, 1, None),
    ],
)  # fmt: skip
def test_launch_mismatch_is_refused_with_the_right_command(env, n, expect):
    from dreambooth_kit.training.launch import LaunchError, check_launch

    if expect is None:
        check_launch(_Acc(n), env)
    else:
        with pytest.raises(LaunchError, match=expect):
            check_launch(_Acc(n), env)


def test_several_deepspeed_processes_without_gpus_are_refused_with_the_reason():
    """accelerate joins a DeepSpeed process group through a GPU backend only: on CPU each of 2
    processes runs alone (measured with accelerate launch --num_processes 2 and the ZeRO-2 recipe)."""
    from dreambooth_kit.training.launch import LaunchError, check_launch

    with pytest.raises(LaunchError, match="DeepSpeed runs as one process: --num_processes 1"):
        check_launch(_Acc(1, deepspeed={}), {"WORLD_SIZE": "2", "RANK": "0"})


_ZERO2 = {
    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
    "gradient_accumulation_steps": 1,
}


@pytest.mark.parametrize(
    "adapter, te, ds, accumulate, adam8, expect",
    [
        ("full", False, _ZERO2, 1, False, None),
        ("full", False, {**_ZERO2, "gradient_accumulation_steps": "auto"}, 4, False, None),
        ("full", False, {**_ZERO2, "zero_optimization": {"stage": 2}}, 1, True, None),  # no offload
        ("lora", False, _ZERO2, 1, False, "DeepSpeed is for adapter.type=full.*multi_gpu.yaml"),
        ("full", True, _ZERO2, 1, False, "set adapter.train_text_encoder=false"),
        ("full", False, {**_ZERO2, "zero_optimization": {"stage": 3}}, 1, False, "ZeRO stage 3 .* zero_stage: 2"),
        ("full", False, _ZERO2, 1, True, "Set train.use_8bit_adam=false"),
        ("full", False, _ZERO2, 2, False, "gradient_accumulation_steps is 1 but train.gradient_accumulation_steps is 2"),
    ],
)  # fmt: skip
def test_deepspeed_launches_that_would_train_wrongly_are_refused(adapter, te, ds, accumulate, adam8, expect):
    from dreambooth_kit.training.launch import LaunchError, check_deepspeed

    t = SimpleNamespace(gradient_accumulation_steps=accumulate, use_8bit_adam=adam8)
    check_deepspeed(_Acc(1), "lora", True, t)  # no DeepSpeed: nothing to check
    if expect is None:
        check_deepspeed(_Acc(1, deepspeed=ds), adapter, te, t)
    else:
        with pytest.raises(LaunchError, match=expect):
            check_deepspeed(_Acc(1, deepspeed=ds), adapter, te, t)


@pytest.mark.slow
def test_torchrun_without_accelerate_use_cpu_is_refused_before_anything_is_written(
    tmp_path, tiny_model, photos
):
    """Two processes that each think they are alone would train twice into one folder."""
    import os

    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
        "-m", "dreambooth_kit.training.train", "--config", "tiny.yaml", f"model.pretrained={tiny_model}",
        f"data.instance_dir={photos}", f"prior.class_dir={tmp_path / 'cls'}", f"train.output_dir={out}",
        "train.max_steps=1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=E2E_TIMEOUT, cwd=tmp_path, env=env)
    assert proc.returncode != 0
    assert "launched as 2 processes (WORLD_SIZE=2) but accelerate runs 1" in proc.stderr, proc.stderr[-3000:]
    assert "ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m dreambooth_kit.training.train" in proc.stderr
    assert not (tmp_path / "cls").exists() and not (out / "config.yaml").exists()


@pytest.mark.slow
def test_accelerate_launch_cpu_with_two_processes_is_refused(tmp_path, tiny_model, photos):
    """accelerate's CPU launcher starts one process whatever --num_processes says."""
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
        "-m", "dreambooth_kit.training.train", "--config", "tiny.yaml", f"model.pretrained={tiny_model}",
        f"data.instance_dir={photos}", f"prior.class_dir={tmp_path / 'cls'}", f"train.output_dir={out}",
        "train.max_steps=1",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=E2E_TIMEOUT, cwd=tmp_path)
    assert proc.returncode != 0
    assert "starts ONE process" in proc.stderr and "ACCELERATE_USE_CPU=1 torchrun" in proc.stderr
    assert not out.exists() and not (tmp_path / "cls").exists()


# ------------------------------------------------------------------ prior.mode=teacher


def test_teacher_prior_makes_no_class_images_and_targets_the_frozen_base(
    tmp_path, tiny_model, photos, monkeypatch
):
    """prior.mode=teacher: no class images; the prior term compares the LoRA model's class-prompt
    prediction with the base model's on the same inputs. The base's is the same UNet with its
    adapters off, checked here against a separately loaded copy of the base UNet."""
    from diffusers import UNet2DConditionModel

    import dreambooth_kit.training.loop as loop_mod

    base = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet").eval()
    unet_file = tiny_model / "unet" / "diffusion_pytorch_model.safetensors"
    before = unet_file.read_bytes()
    calls = []
    real_forward = loop_mod._teacher_prior

    def spy(ctx, noisy, timesteps, encode, prompts, weights):
        with torch.no_grad():
            cond = encode(prompts)  # a frozen text encoder here: the base model's conditioning
            expected = base(noisy.float(), timesteps, cond.float(), return_dict=False)[0]
        seen = {}
        real_loss = loop_mod.teacher_prior_loss

        def capture(student, teacher, *, weights=None):
            seen["student"], seen["teacher"] = student.detach(), teacher.detach()
            return real_loss(student, teacher, weights=weights)

        monkeypatch.setattr(loop_mod, "teacher_prior_loss", capture)
        prior = real_forward(ctx, noisy, timesteps, encode, prompts, weights)
        monkeypatch.setattr(loop_mod, "teacher_prior_loss", real_loss)
        calls.append((prior.item(), torch.allclose(seen["teacher"], expected, atol=1e-5), seen))
        return prior

    monkeypatch.setattr(loop_mod, "_teacher_prior", spy)
    cfg = tiny_cfg(tmp_path, tiny_model, photos, **{"prior.mode": "teacher", "train.learning_rate": 1e-2})
    result = train(cfg)
    assert result.class_images_generated == 0 and not (tmp_path / "class_images").exists()
    assert len(calls) == cfg.train.max_steps
    assert calls[0][0] == 0.0  # step 1: the LoRA is still a no-op (B = 0), student == teacher
    assert calls[-1][0] > 0.0  # then the subject pulls the class prompt away and the term pushes back
    assert all(matches for _, matches, _ in calls)  # the target is the base model's own prediction
    assert not torch.allclose(calls[-1][2]["student"], calls[-1][2]["teacher"])
    assert unet_file.read_bytes() == before  # the base weights are untouched
    assert result.lora_path.exists()


def test_teacher_prior_with_a_text_encoder_lora_asks_the_base_text_encoder(
    tmp_path, tiny_model, photos, monkeypatch
):
    """With adapter.train_text_encoder the class prompt's conditioning also goes through a LoRA; the
    teacher must see the base text encoder's, so both models' adapters are off for it."""
    from diffusers import UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    import dreambooth_kit.training.loop as loop_mod

    tok = AutoTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")
    base_te = CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder").eval()
    base_unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet").eval()
    real_loss, checked = loop_mod.teacher_prior_loss, []
    state = {}

    def spy(ctx, noisy, timesteps, encode, prompts, weights):
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids  # fmt: skip
        with torch.no_grad():
            state["expected"] = base_unet(noisy.float(), timesteps, base_te(ids)[0], return_dict=False)[0]
        return real(ctx, noisy, timesteps, encode, prompts, weights)

    def capture(student, teacher, *, weights=None):
        checked.append(torch.allclose(teacher.float(), state["expected"], atol=1e-5))
        return real_loss(student, teacher, weights=weights)

    real = loop_mod._teacher_prior
    monkeypatch.setattr(loop_mod, "_teacher_prior", spy)
    monkeypatch.setattr(loop_mod, "teacher_prior_loss", capture)
    overrides = {
        "prior.mode": "teacher",
        "adapter.train_text_encoder": True,
        "adapter.init_lora_weights": False,  # random B: both LoRAs change outputs from step 1
    }
    train(tiny_cfg(tmp_path, tiny_model, photos, **overrides))
    assert checked and all(checked)


@pytest.mark.slow
def test_a_full_fine_tunes_pipeline_takes_its_frozen_parts_at_the_runs_variant(tmp_path, tiny_model, photos):
    """Before, the full fine-tune's pipeline reloaded its frozen parts (VAE, and the text encoder
    when not trained) without model.revision/variant: the default files, not the trained-on ones."""
    from conftest import with_variant_files
    from diffusers import AutoencoderKL

    folder = with_variant_files(tiny_model, tmp_path / "m")
    cfg = tiny_cfg(tmp_path, folder, photos, **{"adapter.type": "full", "model.variant": "fp16",
                                                "train.max_steps": 1, "prior.with_prior_preservation": False})  # fmt: skip
    result = train(cfg)
    saved = AutoencoderKL.from_pretrained(result.pipeline_dir / "vae")
    variant = AutoencoderKL.from_pretrained(folder / "vae", variant="fp16")
    assert all(torch.equal(a, b) for a, b in zip(saved.parameters(), variant.parameters(), strict=True))
    # Laid out as transformers 4.x stacks read it too (before: a flat text encoder, tokenizer.json only).
    from safetensors import safe_open

    with safe_open(str(result.pipeline_dir / "text_encoder" / "model.safetensors"), framework="pt") as f:
        assert all(k.startswith("text_model.") for k in f.keys())
    assert (result.pipeline_dir / "tokenizer" / "vocab.json").is_file()


def test_a_trained_lora_is_readable_by_other_users_under_the_usual_umask(trained_run):
    """The final LoRA and its checkpoint files take the umask's permissions (0644 under 022), not
    safetensors' owner-only 0600."""
    import os
    import stat

    mask = os.umask(0)
    os.umask(mask)
    result = trained_run["result"]
    ckpt = sorted((result.output_dir / "checkpoints").glob("step-*"))[-1]
    for f in (result.lora_path, ckpt / "unet_lora.safetensors"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f


def test_a_tracker_that_is_not_installed_is_named_with_its_extra(tmp_path, tiny_model, photos):
    """Before, train.report_to=wandb without wandb trained with no logging at all (one accelerate
    warning); tensorboard already had this error. Checked before anything is written."""
    import importlib.util

    from dreambooth_kit.errors import MissingExtra

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    cfg = tiny_cfg(tmp_path, tiny_model, photos, **{"train.report_to": "wandb"})
    with pytest.raises(
        MissingExtra, match=r"train.report_to=wandb needs wandb: pip install 'dreambooth_kit\[wandb\]'"
    ):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_a_run_says_its_plan_its_pace_each_grid_and_where_everything_went(
    tmp_path, tiny_model, photos, caplog, capfd, monkeypatch
):
    """Feedback on long work: the plan before class images, a measured estimate after the first
    steps, one line per validation grid, no accelerate lines per checkpoint, a summary with every
    output and the next commands; config.yaml with absolute paths, so it works from any folder."""
    import logging

    from dreambooth_kit.config import load_config
    from dreambooth_kit.training.runreport import ETA_AFTER_STEPS

    monkeypatch.chdir(tmp_path)
    photos.rename(tmp_path / "my_photos")
    steps = ETA_AFTER_STEPS + 2
    cfg = tiny_cfg(
        tmp_path, tiny_model, tmp_path / "my_photos",
        **{"data.instance_dir": "my_photos", "prior.class_dir": "", "train.output_dir": "run",
           "prior.store": "off", "train.max_steps": steps, "train.log_every": 100,
           "checkpoint.every_steps": steps // 2, "validation.every_steps": steps // 2,
           "validation.num_images": 1, "validation.steps": 1},
    )  # fmt: skip
    with caplog.at_level(logging.INFO):
        train(cfg)
    messages = [r.getMessage() for r in caplog.records]
    text = "\n".join(messages)
    run = tmp_path / "run"
    plan = next(i for i, m in enumerate(messages) if m.startswith("== training plan =="))
    first_class = next(i for i, m in enumerate(messages) if m.startswith("class images:"))
    assert plan < first_class
    assert f"5 in {tmp_path / 'my_photos'} ('a photo of zwx toy', 64 px)" in messages[plan]
    assert f"4 class images of 'a photo of a toy' in {run / 'class_images'}" in messages[plan]
    assert (
        sum(m.startswith(f"{ETA_AFTER_STEPS} steps in ") and f"to step {steps}" in m for m in messages) == 1
    )
    grids = [m for m in messages if m.startswith("validation samples at step")]
    assert grids == [
        f"validation samples at step {s}: {run / 'samples' / f'step-{s:06d}' / 'grid.png'} (1 images)"
        for s in (steps // 2, steps)
    ]
    assert not any(r.name.startswith("accelerate") and r.levelno < logging.WARNING for r in caplog.records)
    assert "Saving current state" not in text and "checkpoint saved:" in text
    summary = next(m for m in messages if m.startswith("== training done =="))
    assert str(run / "lora" / "pytorch_lora_weights.safetensors") in summary
    assert f"dreambooth-kit export --run {run} --format kohya" in summary
    assert f"--lora {run / 'lora'}" in summary and str(run / "checkpoints") in summary
    assert "class images: 100%" in capfd.readouterr().err  # generated (store off), with a progress bar
    # The saved config's paths are absolute: read from another folder, it names the same places.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    saved = load_config(str(run / "config.yaml"))
    assert saved.data.instance_dir == str(tmp_path / "my_photos")
    assert saved.prior.class_dir == str(run / "class_images") and saved.train.output_dir == str(run)
    assert saved.model.pretrained == str(tiny_model)


def test_caption_dropout_trains_captioned_photos_with_the_bare_prompt_too(
    tmp_path, tiny_model, photos, monkeypatch
):
    """A 3-step run with data.caption_dropout 0.5: each epoch is one batch of the 5 photos, and the
    captioned photo's row holds its caption or the bare instance prompt exactly where caption_dropped
    says (both happen in these 3 epochs)."""
    from dreambooth_kit.data.dataset import caption_dropped
    from dreambooth_kit.training import loop

    mine = photos  # this test's own copy
    caption = "a photo of zwx toy on a beach"
    sorted(mine.glob("*.jpg"))[0].with_suffix(".txt").write_text(caption)
    seen: list[list[str]] = []
    real = loop._loss
    monkeypatch.setattr(
        loop, "_loss", lambda ctx, batch, *a: (seen.append(batch["prompts"]), real(ctx, batch, *a))[1]
    )
    cfg = tiny_cfg(
        tmp_path, tiny_model, mine,
        **{"data.use_captions": True, "data.caption_dropout": 0.5, "train.batch_size": 5, "train.max_steps": 3, "train.seed": 1559,
           "prior.with_prior_preservation": False},
    )  # fmt: skip
    r = train(cfg)
    assert r.steps == 3 and r.lora_path.exists() and len(seen) == 3
    kept = [not caption_dropped(cfg.train.seed, epoch, 0, 0.5) for epoch in range(3)]
    assert set(kept) == {True, False}
    assert [caption in batch for batch in seen] == kept
    assert all(batch.count(cfg.data.instance_prompt) == 5 - k for batch, k in zip(seen, kept, strict=True))


def test_zero_terminal_snr_trains_on_the_rescaled_schedule_and_generation_uses_it(
    tmp_path, tiny_model, photos, monkeypatch
):
    """The tiny model predicts v. With train.zero_terminal_snr the loss sees a schedule whose last
    timestep has (nearly) zero signal, where SD's own leaves alphas_cumprod 0.0047; the LoRA's
    config says so, and load_pipeline samples it with that schedule (trailing spacing)."""
    from dreambooth_kit.inference.pipeline import load_pipeline
    from dreambooth_kit.training import loop

    last = []
    real = loop._loss
    monkeypatch.setattr(
        loop, "_loss",
        lambda ctx, *a: (last.append(float(ctx.comps.noise_scheduler.alphas_cumprod[-1])), real(ctx, *a))[1],
    )  # fmt: skip
    r = train(
        tiny_cfg(tmp_path, tiny_model, photos, **{"train.zero_terminal_snr": True, "train.max_steps": 2})
    )
    assert len(last) == 2 and all(a < 1e-6 for a in last)
    pipe = load_pipeline(str(tiny_model), lora=r.lora_dir, scheduler="ddim")
    assert (
        pipe.scheduler.config.rescale_betas_zero_snr and pipe.scheduler.config.timestep_spacing == "trailing"
    )
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"  # the sampler asked for, on that schedule
    plain = load_pipeline(str(tiny_model), scheduler="ddim")
    assert not plain.scheduler.config.get("rescale_betas_zero_snr")
    assert float(plain.scheduler.alphas_cumprod[-1]) > 1e-3


def test_zero_terminal_snr_on_an_epsilon_model_is_refused_before_class_images(tmp_path, tiny_model, photos):
    from dreambooth_kit.config import ConfigError

    cfg = tiny_cfg(
        tmp_path, tiny_model, photos, **{"train.zero_terminal_snr": True, "model.prediction_type": "epsilon"}
    )
    with pytest.raises(
        ConfigError, match="train.zero_terminal_snr: .* predicts epsilon; a zero-SNR last timestep"
    ):
        train(cfg)
    assert not (tmp_path / "class_images").exists()

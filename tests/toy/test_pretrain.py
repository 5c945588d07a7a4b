"""The toy model's pretraining script, run for a few steps (CI never reruns the real pretraining):
stages write their records, resume instead of redoing, and the shipped layout loads like any model."""

from __future__ import annotations

import json

import torch

from dreambooth_kit.toy import pretrain


def test_stages_run_resume_and_ship_a_loadable_model(tmp_path, capsys):
    out, weights = tmp_path / "out", tmp_path / "weights"
    args = ["--out", str(out), "--steps", "2", "--images", "64", "--threads", "1"]
    threads = torch.get_num_threads()
    assert pretrain.main([*args, "--stage", "vae", "--stage", "unet"]) == 0
    # --threads is this run's: the process keeps its own count (a count left at 1 changed the
    # rounding of every later test's training in this process).
    assert torch.get_num_threads() == threads
    vae, unet = (json.loads((out / s / "done.json").read_text()) for s in ("vae", "unet"))
    assert vae["steps"] == 2 and vae["scaling_factor"] > 0 and unet["steps"] == 2
    stamp = (out / "unet" / "unet.safetensors").stat().st_mtime_ns
    assert pretrain.main([*args, "--stage", "unet"]) == 0  # done: not trained again
    assert (out / "unet" / "unet.safetensors").stat().st_mtime_ns == stamp
    pretrain.ship(out, weights, final=False)
    record = json.loads((weights / "record.json").read_text())
    assert record["scaling_factor"] == vae["scaling_factor"] and set(record["stages"]) == {"vae", "unet"}
    from safetensors.torch import load_file

    assert all(v.dtype == torch.float16 for v in load_file(weights / "unet.safetensors").values())

    from dreambooth_kit.inference.generate import generate
    from dreambooth_kit.inference.pipeline import load_pipeline
    from dreambooth_kit.toy.model import build_toy_sd2

    folder = build_toy_sd2(tmp_path / "toy-sd2", weights=weights)
    pipe = load_pipeline(str(folder))
    assert pipe.vae.config.scaling_factor == vae["scaling_factor"]
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    ((img, _),) = generate(pipe, "a photo of a red ball", seed=1, steps=2, height=32, width=32)
    assert img.size == (32, 32)


def test_an_interrupted_stage_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(pretrain, "CHECKPOINT_EVERY", 1)
    real = pretrain._vae_batch
    calls = {"n": 0}

    def stop_at_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # a stop during step 3: steps 1-2 are checkpointed
        return real(*a, **k)

    monkeypatch.setattr(pretrain, "_vae_batch", stop_at_third)
    try:
        pretrain.stage_vae(out, steps=4, seed=0)
    except KeyboardInterrupt:
        pass
    assert torch.load(out / "vae" / "ckpt.pt", weights_only=False)["step"] == 2
    assert not (out / "vae" / "done.json").exists()
    steps_run = []
    monkeypatch.setattr(
        pretrain, "_vae_batch", lambda rng, n, step: steps_run.append(step) or real(rng, n, step)
    )
    rec = pretrain.stage_vae(out, steps=4, seed=0)
    assert rec["steps"] == 4 and steps_run == [2, 3]  # resumed: only the two missing steps ran

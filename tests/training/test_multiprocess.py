"""Training in two processes on CPU through the documented command (gloo process group):
``ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m dreambooth_kit.training.train --config ...``."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import DEMO_PHOTOS, E2E_TIMEOUT, REPO
from PIL import Image

pytestmark = pytest.mark.slow


def launch_command(n: int, tmp_path, tiny_model, photos, name: str, *extra: str) -> list[str]:
    """The README's multi-process command with ``n`` processes on the tiny model."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
        "-m", "dreambooth_kit.training.train", "--config", "tiny.yaml",
        f"model.pretrained={tiny_model}", f"data.instance_dir={photos}",
        f"prior.class_dir={tmp_path / name / 'class_images'}", "prior.num_class_images=4",
        "prior.sample_batch_size=2", "prior.sample_steps=2", f"train.output_dir={tmp_path / name / 'run'}",
        "train.max_steps=2", "checkpoint.every_steps=2", "prior.store=off", *extra,
    ]  # fmt: skip


def launch(n: int, tmp_path, tiny_model, photos, name: str, *extra: str) -> subprocess.CompletedProcess:
    """Run it to the end, one thread per process (torchrun's default for several processes, set
    here for one too: equal threads give equal float rounding)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = launch_command(n, tmp_path, tiny_model, photos, name, *extra)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=E2E_TIMEOUT, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_processes_share_class_images_and_write_one_run(tmp_path, tiny_model, photos):
    """Class images: each process generates its share of the batches (2 of 4 here), and the set is
    byte-identical in pixels to a one-process run's (image i is seed + i in the same batch of 2).
    The run is written once: one LoRA, one checkpoint holding both processes' RNG states, one log
    line per step and one set of validation samples."""
    one = launch(1, tmp_path, tiny_model, photos, "one")
    val = ("validation.every_steps=2", "validation.num_images=1", "validation.steps=2")
    two = launch(2, tmp_path, tiny_model, photos, "two", *val)
    assert "generating 4 of 4 missing" in one.stderr
    assert two.stderr.count("generating 2 of 4 missing") == 2  # both processes, 2 images each
    files = sorted(p.name for p in (tmp_path / "one" / "class_images").glob("class-*.png"))
    assert files == [f"class-{i:05d}.png" for i in range(4)]
    for name in files:
        a, b = (np.asarray(Image.open(tmp_path / d / "class_images" / name)) for d in ("one", "two"))
        assert np.array_equal(a, b), name
    assert (tmp_path / "two" / "class_images" / "manifest.json").is_file()
    run = tmp_path / "two" / "run"
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()
    (ckpt,) = (run / "checkpoints").iterdir()
    assert sorted(p.name for p in ckpt.glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    assert not list(run.glob("**/.tmp-*"))
    # Logged and sampled once, by the main process.
    assert two.stderr.count("step 2/2") == 1, two.stderr[-2000:]
    assert sorted(p.name for p in (run / "samples" / "step-000002").iterdir()) == ["grid.png", "p0-1557.png"]


def test_two_processes_at_batch_1_train_as_one_process_at_batch_2(tmp_path, tiny_model, photos):
    """accelerate gives process r batches r, r + 2, ... of the sampler's order, and every random draw
    (posterior sample, noise, timesteps) is made for both processes' rows at once, each keeping its
    own (loop.BatchRows): so 2 processes at batch 1 see the examples and random numbers of 1 process
    at batch 2, and DDP's gradient mean is that batch's. The LoRAs agree to float rounding, far
    below what the 2 steps changed. Within an epoch:
    at its end, when the photo count is not a multiple of processes x batch, the epoch is filled
    with its first rows where one process trains on a smaller last batch."""
    import torch
    from safetensors.torch import load_file

    common = ("train.learning_rate=1e-2", "train.log_every=1")
    logs = [
        launch(1, tmp_path, tiny_model, photos, "one", "train.batch_size=2", *common).stderr,
        launch(2, tmp_path, tiny_model, photos, "two", "train.batch_size=1", *common).stderr,
    ]
    # The logged loss is the whole batch's: the mean over both processes' rows (one all-gather).
    losses = [[float(x) for x in re.findall(r"step \d/2 loss ([0-9.]+)", log)] for log in logs]
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], abs=2e-4), losses
    one, two = (
        load_file(tmp_path / d / "run" / "lora" / "pytorch_lora_weights.safetensors") for d in ("one", "two")
    )
    assert one.keys() == two.keys()
    # LoRA B starts at 0, so B is the update itself: compared as one vector. Per value, Adam's step
    # m / sqrt(v) moves a weight whose gradient is near 0 by ~lr either way under the all-reduce's
    # rounding: a few values of A or B may differ by up to 2e-3 (measured in 1 of 2 sampler setups),
    # so the rest is checked as a share of values, not as a maximum.
    b_keys = [k for k in one if "lora_B" in k or "lora.up" in k]
    update = torch.cat([one[k].flatten() for k in b_keys])
    gap_b = torch.cat([(one[k] - two[k]).flatten() for k in b_keys])
    moved = torch.cat([((one[k] - two[k]).abs() > 1e-4).flatten() for k in one]).float().mean()
    print(f"LoRA B: {update.norm():.3e} (L2), 1 vs 2 processes {gap_b.norm():.3e}; "
          f"{moved:.2%} of all LoRA values differ by more than 1e-4")  # fmt: skip
    assert update.abs().max() > 1e-3
    # Measured: 0.02% of B's norm and 0.04% of the values. With each process drawing its own random
    # numbers, whole steps go in other directions (the largest difference was 4.0e-02).
    assert gap_b.norm() <= 0.01 * update.norm() and moved <= 0.01


def test_full_fine_tune_under_ddp_saves_unwrapped_weights_equal_to_one_process(tmp_path, tiny_model, photos):
    """A full fine-tune in 2 processes (DDP wraps the UNet): the checkpoint's model.safetensors and
    the final pipeline hold the unwrapped UNet (plain diffusers keys, no "module." prefix), and it
    matches 1 process at batch 2 to float rounding, far below what the 2 steps changed."""
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    common = ("adapter.type=full", "train.learning_rate=1e-3")
    launch(1, tmp_path, tiny_model, photos, "one", "train.batch_size=2", *common)
    launch(2, tmp_path, tiny_model, photos, "two", "train.batch_size=1", *common)
    unet = "pipeline/unet/diffusion_pytorch_model.safetensors"
    base = load_file(tiny_model / "unet" / "diffusion_pytorch_model.safetensors")
    one, two = (load_file(tmp_path / d / "run" / unet) for d in ("one", "two"))
    assert one.keys() == two.keys() == base.keys()
    # Compared as whole vectors: Adam's first steps move every weight by about lr, whatever its
    # gradient's size, so a weight whose gradient is near 0 may move either way by rounding
    # (measured: 0.2% of the weights differ by more than 1e-5, by at most 3.3e-04).
    update = torch.cat([(one[k] - base[k]).flatten() for k in base]).norm()
    gap = torch.cat([(one[k] - two[k]).flatten() for k in base]).norm()
    print(f"full fine-tune: 2 steps moved the UNet by {update:.3e} (L2); 1 vs 2 processes {gap:.3e}")
    assert gap <= 0.01 * update  # measured 0.12%
    ckpt = load_file(tmp_path / "two" / "run" / "checkpoints" / "step-000002" / "model.safetensors")
    assert ckpt.keys() == two.keys() and all(torch.equal(ckpt[k], two[k]) for k in ckpt)
    StableDiffusionPipeline.from_pretrained(tmp_path / "two" / "run" / "pipeline")


def test_sigterm_to_torchrun_checkpoints_both_processes_and_the_resume_is_exact(tmp_path, tiny_model, photos):
    """SIGTERM to torchrun's agent, which forwards it to both processes: they stop at the same step
    (the gated 4th, as in test_resume), write one checkpoint with both RNG states and exit; the
    resumed 2-process run ends with the LoRA of an uninterrupted 2-process run, bit for bit. The 6
    steps cross an epoch end (5 photos, 2 x 1 per step): the filled last batch must be the same
    after the resume (accelerate's own filling, from the resumed iteration's first rows, was not)."""
    import shutil
    import signal

    import torch
    from safetensors.torch import load_file
    from test_resume import _env

    steps = (
        "train.max_steps=6",
        "train.log_every=1",
        "train.learning_rate=1e-2",
        "checkpoint.every_steps=null",
    )
    launch(2, tmp_path, tiny_model, photos, "straight", *steps)
    shutil.copytree(tmp_path / "straight" / "class_images", tmp_path / "cut" / "class_images")
    env = {**_env(tmp_path), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = launch_command(2, tmp_path, tiny_model, photos, "cut", *steps)
    proc = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env, cwd=tmp_path
    )
    lines, gated, received = [], 0, 0
    for line in proc.stderr:  # events, not times: both processes at the gate, then both signalled
        lines.append(line)
        # Counted, not tested per line: the two processes write to one pipe, and two messages
        # written at once can share a line (seen: the test then never signalled, and hung).
        gated += line.count("dbk-test: gate reached")
        if gated == 2 and received == 0 and "gate reached" in line:
            os.kill(proc.pid, signal.SIGTERM)
        received += line.count("received SIGTERM")
        if received == 2:
            (tmp_path / "go").touch()
            break
    out, err = proc.communicate(timeout=E2E_TIMEOUT)
    log = "".join(lines) + err + out
    run = tmp_path / "cut" / "run"
    ckpts = sorted((run / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == ["step-000004"], log[-3000:]
    assert sorted(p.name for p in ckpts[0].glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    assert not (run / "lora").exists()
    plain = launch_command(1, tmp_path, tiny_model, photos, "cut", *steps, "train.resume=latest")[5:]
    one = subprocess.run([sys.executable, *plain],  # one process, as `python -m dreambooth_kit.training.train`
                         env={**os.environ, "ACCELERATE_USE_CPU": "1"}, capture_output=True, text=True, timeout=E2E_TIMEOUT)  # fmt: skip
    assert one.returncode == 2 and "written by 2 processes, this run has 1" in one.stderr, one.stderr[-2000:]
    launch(2, tmp_path, tiny_model, photos, "cut", *steps, "train.resume=latest")
    a, b = (
        load_file(tmp_path / d / "run" / "lora" / "pytorch_lora_weights.safetensors")
        for d in ("straight", "cut")
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# Loaded into both processes through PYTHONPATH: in its 3rd training step (the 3rd loss) process 1
# alone sends itself SIGTERM, as a preemption that reaches one rank (a node's own kill, a job
# scheduler signalling one task). An event inside the step, so the outcome never depends on timing.
ONE_RANK_SIGTERM = """
import os, signal, torch.nn.functional as F
_mse, _calls = F.mse_loss, [0]
def _signal_rank_1(*a, **k):
    _calls[0] += 1
    if _calls[0] == 3 and os.environ.get("RANK") == "1":
        os.kill(os.getpid(), signal.SIGTERM)
    return _mse(*a, **k)
F.mse_loss = _signal_rank_1
"""


def test_sigterm_to_one_rank_stops_both_at_the_same_step_with_one_checkpoint(tmp_path, tiny_model, photos):
    """Before, each process read its own stop flag: process 1 went into the checkpoint's collectives
    at step 3 while process 0 went into step 4's, a hang (the preemption checkpoint lost). Now the
    processes agree on the stop at the step boundary: both stop after step 3, one checkpoint holds
    both RNG states, and the run resumes."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(ONE_RANK_SIGTERM)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{site}{os.pathsep}{REPO}"}  # fmt: skip
    steps = ("train.max_steps=5", "train.log_every=1", "checkpoint.every_steps=2")
    cmd = launch_command(2, tmp_path, tiny_model, photos, "one-rank", *steps)
    # The failure this guards against is a hang: 15 minutes, far above the ~30 s this takes.
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    run = tmp_path / "one-rank" / "run"
    assert proc.returncode != 0 and proc.stderr.count("received SIGTERM") == 1, proc.stderr[-3000:]
    assert proc.stderr.count("interrupted at step 3") >= 1, proc.stderr[-3000:]
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert ckpts == ["step-000002", "step-000003"], proc.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints" / "step-000003").glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]
    launch(2, tmp_path, tiny_model, photos, "one-rank", *steps, "train.resume=latest")
    assert (run / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_deepspeed_zero2_offload_recipe_trains_saves_and_resumes_on_cpu(tmp_path, tiny_model, photos):
    """The DeepSpeed recipe as documented, on CPU (one process: accelerate joins a DeepSpeed process
    group only on GPUs): a full fine-tune of the UNet through DeepSpeed's engine, ZeRO-2 and its
    CPU Adam (the offloaded optimizer), accelerate's save_state/load_state with the engine, and the
    final pipeline gathered from it. Resuming from the step-2 checkpoint ends where the
    uninterrupted run ends, to within 1e-6: DeepSpeed's CPU Adam keeps beta^t by multiplying once
    per step, and a resumed run computes it with pow(), 1 float rounding apart (its cpu_adam.h)."""
    import shutil

    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    pytest.importorskip("deepspeed")
    recipe = REPO / "configs" / "accelerate" / "deepspeed_zero2_offload.yaml"
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}

    def run(name: str, *extra: str) -> subprocess.CompletedProcess:
        cmd = launch_command(1, tmp_path, tiny_model, photos, name, "adapter.type=full", "train.max_steps=3",
                             "checkpoint.keep_last=2", "train.learning_rate=1e-3", "validation.every_steps=2",
                             "validation.num_images=1", "validation.steps=2", *extra)[5:]  # fmt: skip
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(recipe), *cmd]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=E2E_TIMEOUT, cwd=tmp_path)

    lora = run("lora", "adapter.type=lora")  # the last value of a key wins
    assert lora.returncode and "error: DeepSpeed is for adapter.type=full" in lora.stderr, lora.stderr[-3000:]
    assert not (tmp_path / "lora").exists()  # refused before anything is written
    straight = run("straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    out = tmp_path / "straight" / "run"
    ckpt = out / "checkpoints" / "step-000002"
    assert (ckpt / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "COMPLETE.json").is_file()
    unet_file = "pipeline/unet/diffusion_pytorch_model.safetensors"
    base = load_file(tiny_model / "unet" / "diffusion_pytorch_model.safetensors")
    trained = load_file(out / unet_file)
    moved = max((trained[k].float() - base[k].float()).abs().max() for k in base)
    assert moved > 1e-4, "DeepSpeed's steps did not change the UNet"
    StableDiffusionPipeline.from_pretrained(out / "pipeline")  # the gathered save loads in plain diffusers
    # Each checkpoint also holds the UNet's weights in safetensors, as without DeepSpeed (evaluate
    # reads them; DeepSpeed's own copy is a torch pickle): the last one is the final UNet.
    last = load_file(out / "checkpoints" / "step-000003" / "model.safetensors")
    assert last.keys() == trained.keys() and all(torch.equal(last[k], trained[k]) for k in last)

    cut = tmp_path / "cut" / "run"
    shutil.copytree(
        out, cut, ignore=shutil.ignore_patterns("pipeline", "step-000003", ".dreambooth_kit.lock*")
    )
    shutil.copytree(tmp_path / "straight" / "class_images", tmp_path / "cut" / "class_images")
    resumed = run("cut", "train.resume=latest")
    assert resumed.returncode == 0 and "resumed from" in resumed.stderr, resumed.stderr[-3000:]
    again = load_file(cut / unet_file)
    gap = max((again[k].float() - trained[k].float()).abs().max() for k in trained)
    print(f"DeepSpeed: 3 steps moved the UNet by {moved:.3e}; resumed vs uninterrupted {gap:.3e}")
    assert gap <= 1e-6 < moved


# Loaded into the trainer through PYTHONPATH: every loss from the 3rd micro-batch on is NaN.
NAN_FROM_THIRD = """
import torch.nn.functional as F
_mse, _calls = F.mse_loss, [0]
def _nan_later(*a, **k):
    _calls[0] += 1
    return _mse(*a, **k) * (float("nan") if _calls[0] >= 3 else 1.0)
F.mse_loss = _nan_later
"""


def test_deepspeed_with_accumulation_stops_on_a_non_finite_loss(tmp_path, tiny_model, photos):
    """Under DeepSpeed, accelerate's backward() runs DeepSpeed's step, which counts micro-batches
    itself: skipping a non-finite one (what happens without DeepSpeed) would shift its accumulation
    window against ours. With accumulation the run stops instead, naming why, and writes no model."""
    pytest.importorskip("deepspeed")
    recipe = (REPO / "configs" / "accelerate" / "deepspeed_zero2_offload.yaml").read_text()
    assert "gradient_accumulation_steps: 1\n" in recipe
    config = tmp_path / "zero2_accumulate2.yaml"
    config.write_text(recipe.replace("gradient_accumulation_steps: 1\n", "gradient_accumulation_steps: 2\n"))
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NAN_FROM_THIRD)
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env["PYTHONPATH"] = f"{site}{os.pathsep}{REPO}"
    args = launch_command(1, tmp_path, tiny_model, photos, "nan", "adapter.type=full", "train.max_steps=3",
                          "train.gradient_accumulation_steps=2", "checkpoint.every_steps=null")[5:]  # fmt: skip
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=E2E_TIMEOUT, cwd=tmp_path)
    assert proc.returncode, proc.stderr[-3000:]
    assert "error: non-finite loss at step 2 under DeepSpeed with gradient accumulation" in proc.stderr, (
        proc.stderr[-3000:]
    )
    assert not (tmp_path / "nan" / "run" / "pipeline").exists()


def test_bucketed_two_processes_at_batch_1_train_as_one_process_at_batch_2(tmp_path, tiny_model):
    """data.buckets under DDP: a step's batches (one per process) are one bucket, so the processes
    stack latents of one shape and draw their random numbers for the rows of one batch, as without
    buckets. Two square and two 80x48 photos, 2 + 2 class images: every bucket holds an even count
    of rows, so nothing is filled and 2 processes at batch 1 train on 1 process's batches of 2,
    bucket for bucket. 3 steps cross the epoch boundary (2 batches an epoch)."""
    import torch
    from safetensors.torch import load_file

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, f in enumerate(sorted(DEMO_PHOTOS.iterdir())[:4]):
        img = Image.open(f)
        (img.crop((0, 24, 128, 104)) if i >= 2 else img).save(photos / f.name)
    common = ("data.buckets=true", "data.bucket_step=16", "train.learning_rate=1e-2", "train.log_every=1",
              "train.max_steps=3", "checkpoint.every_steps=3")  # fmt: skip
    logs = [
        launch(1, tmp_path, tiny_model, photos, "one", "train.batch_size=2", *common).stderr,
        launch(2, tmp_path, tiny_model, photos, "two", "train.batch_size=1", *common).stderr,
    ]
    assert all("buckets: 2 at 64x64, 2 at 80x48" in log for log in logs), logs[1][-2000:]
    losses = [[float(x) for x in re.findall(r"step \d/3 loss ([0-9.]+)", log)] for log in logs]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], abs=2e-4), losses
    one, two = (
        load_file(tmp_path / d / "run" / "lora" / "pytorch_lora_weights.safetensors") for d in ("one", "two")
    )
    b_keys = [k for k in one if "lora_B" in k or "lora.up" in k]
    update = torch.cat([one[k].flatten() for k in b_keys])
    gap_b = torch.cat([(one[k] - two[k]).flatten() for k in b_keys])
    assert update.abs().max() > 1e-3 and gap_b.norm() <= 0.01 * update.norm()


def test_deepspeed_takes_a_bucketed_loader(tmp_path, tiny_model, photos):
    """A bucket sampler's loader has no batch_size, from which accelerate reads DeepSpeed's "auto"
    micro-batch, and it refused to prepare it (ValueError: "has `None` as batch size", seen): the
    trainer sets it to train.batch_size."""
    pytest.importorskip("deepspeed")
    recipe = REPO / "configs" / "accelerate" / "deepspeed_zero2_offload.yaml"
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    cmd = launch_command(1, tmp_path, tiny_model, photos, "ds", "adapter.type=full", "data.buckets=true",
                         "data.bucket_step=16", "train.batch_size=2")[5:]  # fmt: skip
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(recipe), *cmd]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=E2E_TIMEOUT, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 2/2" in proc.stderr and (tmp_path / "ds" / "run" / "pipeline" / "unet").is_dir()


# Loaded into each trainer through PYTHONPATH: evaluate's scorer replaced by scripted scores (the
# tiny model learns no subject to score), fidelity rising to step 4, then flat.
SCRIPTED_SCORES = """
import dreambooth_kit.evaluation.scoring as _ev
_SCRIPT = {0: 0.60, 2: 0.70, 4: 0.80, 6: 0.805, 8: 0.81, 10: 0.81, 12: 0.81}
def _scripted(spec):
    def score(pipe, step, acc, out):
        return {"subject_fidelity": _SCRIPT[step], "pres": 0.6, "subject_rate": 1.0, "div": 0.2}
    return score
_ev.validation_scorer = _scripted
"""


def test_auto_stop_under_two_processes_stops_both_at_the_main_processs_decision(tmp_path, tiny_model, photos):
    """train.stop=auto with 2 processes: only the main process scores; its decision reaches both (a
    process deciding alone would leave the other in the next step's all-reduce). Both stop at step 8
    of 12, and the final LoRA is step 4's checkpoint, bit for bit."""
    import torch
    from safetensors.torch import load_file

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SCRIPTED_SCORES)
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{site}{os.pathsep}{REPO}",
    }
    cmd = launch_command(2, tmp_path, tiny_model, photos, "auto", "train.stop=auto", "train.max_steps=12",
                         "validation.every_steps=2", "validation.num_images=1", "validation.steps=2",
                         "checkpoint.every_steps=null")  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=E2E_TIMEOUT, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train.stop=auto: stopping at step 8 of 12; step 4 has been the best" in proc.stderr
    run = tmp_path / "auto" / "run"
    saved = load_file(run / "lora" / "pytorch_lora_weights.safetensors")  # diffusers' names of peft's tensors
    final = {
        k.removeprefix("unet.").replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B."): v
        for k, v in saved.items()
    }
    best = load_file(run / "checkpoints" / "step-000004" / "unet_lora.safetensors")
    assert best.keys() == final.keys() and all(torch.equal(best[k], final[k]) for k in best)
    assert sorted(p.name for p in (run / "checkpoints" / "step-000008").glob("random_states_*.pkl")) == [
        "random_states_0.pkl",
        "random_states_1.pkl",
    ]

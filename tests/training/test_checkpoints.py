"""Checkpoints on a small real setup: the tiny SD2 UNet with a LoRA, AdamW, a diffusers LR schedule and
a dataloader, all prepared by accelerate on CPU."""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import E2E_TIMEOUT

from dreambooth_kit.config import AdapterConfig, DreamBoothConfig
from dreambooth_kit.errors import UserError
from dreambooth_kit.training import checkpoint_index
from dreambooth_kit.training.checkpoint_index import (
    CheckpointError,
    CheckpointSaveFailed,
    list_checkpoints,
    step_name,
)
from dreambooth_kit.training.checkpoints import clean_tmp, load_checkpoint, resolve_resume, save_checkpoint
from dreambooth_kit.training.lora_state import register_lora_hooks
from dreambooth_kit.training.resume_checks import check_compatible
from dreambooth_kit.util import atomic, disk_space

LOG = "dreambooth_kit"


def _accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # accelerate's singletons survive between tests; clear them as train.py does.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return Accelerator(cpu=True)


def _run_config(rank: int = 4, alpha: float | None = 8) -> dict:
    cfg = DreamBoothConfig()
    cfg.model.pretrained = "builtin:tiny-sd2"
    cfg.adapter.rank, cfg.adapter.alpha = rank, alpha
    return cfg.to_dict()


def _setup(tiny_model: Path, out: Path, *, rank: int = 4, text_encoder: bool = False, extra_model=False):
    from diffusers import UNet2DConditionModel
    from diffusers.optimization import get_scheduler

    from dreambooth_kit.training.adapters import add_lora

    acc = _accelerator()
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet")
    unet.requires_grad_(False)
    te = None
    if text_encoder:
        from transformers import CLIPTextModel

        te = CLIPTextModel.from_pretrained(tiny_model / "text_encoder")
        te.requires_grad_(False)
    params = add_lora(unet, te, AdapterConfig(rank=rank, alpha=8, train_text_encoder=text_encoder))
    linear = torch.nn.Linear(3, 2) if extra_model else None  # a fully trained model beside the LoRAs
    if linear is not None:
        params += list(linear.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scheduler = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=2, num_training_steps=20)
    loader = torch.utils.data.DataLoader(torch.arange(8.0), batch_size=2, shuffle=True)
    models = [m for m in (unet, linear, te) if m is not None]
    *models, optimizer, loader, scheduler = acc.prepare(*models, optimizer, loader, scheduler)
    unet = models[0]
    lora = {"unet": unet} | ({"text_encoder": models[-1]} if te is not None else {})
    register_lora_hooks(acc, lora)
    env = SimpleNamespace(
        acc=acc,
        unet=unet,
        te=models[-1] if te is not None else None,
        linear=models[1] if linear is not None else None,
        opt=optimizer,
        sched=scheduler,
        out=out,
        run_config=_run_config(rank=rank),
    )
    return env


@pytest.fixture
def env(tiny_model, tmp_path):
    return _setup(tiny_model, tmp_path / "run")


def _train(env, steps: int = 1) -> None:
    cfg = env.acc.unwrap_model(env.unet).config
    for _ in range(steps):
        x = torch.randn(1, cfg.in_channels, 8, 8)
        cond = torch.randn(1, 4, cfg.cross_attention_dim)
        if env.te is not None:
            cond = env.te(torch.randint(0, 50, (1, 4)))[0]
        loss = env.unet(x, torch.randint(0, 1000, (1,)), cond).sample.pow(2).mean()
        if env.linear is not None:
            loss = loss + env.linear(torch.ones(3)).sum()
        env.acc.backward(loss)
        env.opt.step()
        env.sched.step()
        env.opt.zero_grad()


def _save(env, step: int, keep_last: int | None = None, out: Path | None = None, **extra) -> Path:
    return save_checkpoint(
        env.acc,
        out or env.out,
        step,
        extra_state={"epoch": 0, **extra},
        run_config=env.run_config,
        keep_last=keep_last,
    )


def _lora(model) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def _assert_same(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def _names(out: Path) -> list[str]:
    return sorted(p.name for p in (out / checkpoint_index.CHECKPOINTS).iterdir())


# ------------------------------------------------------------------ save / load round trip


def test_checkpoint_holds_lora_and_training_state_but_never_the_base(env, tiny_model):
    from safetensors import safe_open

    _train(env)
    path = _save(env, 250)

    assert path == env.out / "checkpoints" / "step-000250" == env.out / "checkpoints" / step_name(250)
    files = {p.name: p.stat().st_size for p in path.iterdir()}
    for name in ["unet_lora.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl"]:
        assert name in files
    assert {"state.json", "run.json", "COMPLETE.json"} <= files.keys()
    assert "model.safetensors" not in files and "pytorch_model.bin" not in files
    base_bytes = (tiny_model / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert max(files.values()) < base_bytes / 10, files  # the LoRA is ~1% of the UNet
    with safe_open(path / "unet_lora.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert set(keys) == set(_lora(env.unet))

    assert json.loads((path / "state.json").read_text()) == {"step": 250, "epoch": 0}
    assert json.loads((path / "run.json").read_text()) == env.run_config
    complete = json.loads((path / "COMPLETE.json").read_text())
    assert complete["step"] == 250
    assert complete["files"] == {k: v for k, v in files.items() if k != "COMPLETE.json"}
    assert _names(env.out) == ["step-000250"]  # no temporary folder left behind
    assert list_checkpoints(env.out) == [(250, path)]


def test_load_restores_lora_optimizer_scheduler_and_rng_exactly(env):
    _train(env, 2)
    path = _save(env, 2, data_position=[1, 3])
    expected_rand, expected_py = torch.rand(8), random.random()  # what comes right after the save
    lora, opt, sched = _lora(env.unet), copy.deepcopy(env.opt.state_dict()), env.sched.state_dict()
    assert opt["state"], "the optimizer must have state for this test to mean anything"

    _train(env, 3)  # move everything on
    assert not all(torch.equal(v, _lora(env.unet)[k]) for k, v in lora.items())
    assert env.sched.state_dict()["last_epoch"] != sched["last_epoch"]

    state = load_checkpoint(env.acc, path)

    assert state == {"step": 2, "epoch": 0, "data_position": [1, 3]}
    _assert_same(lora, _lora(env.unet), "lora")
    _assert_same(opt, env.opt.state_dict(), "optimizer")
    _assert_same(sched, env.sched.state_dict(), "scheduler")
    assert env.opt.param_groups[0]["lr"] == sched["_last_lr"][0]
    assert torch.equal(torch.rand(8), expected_rand)
    assert random.random() == expected_py


def test_text_encoder_lora_and_a_fully_trained_model_round_trip(tiny_model, tmp_path):
    # LoRA models are taken out of accelerate's model list: the others must keep their own files.
    env = _setup(tiny_model, tmp_path / "run", text_encoder=True, extra_model=True)
    _train(env)
    path = _save(env, 1)
    files = {p.name for p in path.iterdir()}
    assert {"unet_lora.safetensors", "text_encoder_lora.safetensors", "model.safetensors"} <= files
    assert "model_1.safetensors" not in files  # exactly one non-LoRA model file
    unet, te, linear = _lora(env.unet), _lora(env.te), copy.deepcopy(env.linear.state_dict())

    _train(env, 2)
    load_checkpoint(env.acc, path)

    _assert_same(unet, _lora(env.unet), "unet")
    _assert_same(te, _lora(env.te), "text_encoder")
    _assert_same(linear, env.linear.state_dict(), "linear")


# ------------------------------------------------------------------ failures while saving


@pytest.mark.parametrize("where", ["optimizer", "fsync"])
def test_failed_save_keeps_the_previous_checkpoint(env, monkeypatch, where):
    _train(env)
    first = _save(env, 2, keep_last=1)
    lora = _lora(env.unet)
    _train(env)

    def boom(*a, **k):
        raise RuntimeError("injected failure")

    if where == "optimizer":  # inside accelerate's save_state
        monkeypatch.setattr(env.opt, "state_dict", boom)
    else:  # after save_state, while marking the folder complete
        monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(CheckpointSaveFailed, match="saving step-000004 failed") as info:
        _save(env, 4, keep_last=1)
    monkeypatch.undo()

    assert "injected failure" in str(info.value) and "step-000002 intact" in str(info.value)
    # Not the disk's fault: not a one-line user error, so the CLI shows the cause's traceback
    # (before, every failure became a CheckpointError and a bug lost its traceback).
    assert not isinstance(info.value, UserError) and isinstance(info.value.__cause__, RuntimeError)
    assert _names(env.out) == ["step-000002"]  # nothing pruned, no step-4, no temporary folder
    assert resolve_resume(env.out, "latest") == first.resolve()
    _train(env)
    assert load_checkpoint(env.acc, first)["step"] == 2
    _assert_same(lora, _lora(env.unet))


def test_leftover_of_a_killed_save_is_ignored_then_cleaned(env, caplog):
    _train(env)
    first = _save(env, 2)
    # What a kill during step 4's save leaves: accelerate's files in the temporary folder, no COMPLETE.
    leftover = env.out / "checkpoints" / ".tmp-step-000004-dead"
    env.acc.save_state(str(leftover))
    assert (leftover / "optimizer.bin").exists()

    with caplog.at_level(logging.INFO, logger=LOG):
        assert list_checkpoints(env.out) == [(2, first)]
        assert resolve_resume(env.out, "latest") == first.resolve()
    assert any(".tmp-step-000004-dead" in r.getMessage() for r in caplog.records)

    assert clean_tmp(env.out) == [leftover]
    assert _names(env.out) == ["step-000002"]
    assert clean_tmp(env.out) == []


def _no_space(*a, **k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_names_both_steps_and_prunes_nothing(env, monkeypatch):
    _train(env)
    _save(env, 2, keep_last=2)
    _save(env, 4, keep_last=2)
    monkeypatch.setattr(torch, "save", _no_space)  # accelerate writes optimizer/scheduler/RNG with it
    with pytest.raises(CheckpointError) as info:
        _save(env, 6, keep_last=2)  # a success would prune step-000002
    monkeypatch.undo()
    size = sum(p.stat().st_size for p in (env.out / "checkpoints" / "step-000004").iterdir())
    assert str(info.value) == (
        f"no space left while saving step-000006; step-000004 intact (a checkpoint takes about "
        f"{size / 1e6:.1f} MB; free space on the disk of {(env.out / 'checkpoints').resolve()}, "
        "then rerun with train.resume=latest)"
    )
    assert _names(env.out) == ["step-000002", "step-000004"]
    assert [s for s, _ in list_checkpoints(env.out)] == [2, 4]


def test_disk_full_on_the_first_save(env, monkeypatch):
    monkeypatch.setattr(torch, "save", _no_space)
    with pytest.raises(CheckpointError) as info:
        _save(env, 2)
    assert str(info.value) == (
        "no space left while saving step-000002; no earlier checkpoint (free space on the disk of "
        f"{(env.out / 'checkpoints').resolve()}, then rerun with train.resume=latest)"
    )
    assert _names(env.out) == []


def _file_too_large(*a, **k):
    raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))


def test_file_size_limit_is_named_with_its_fix(env, monkeypatch):
    _train(env)
    _save(env, 2, keep_last=1)
    monkeypatch.setattr(torch, "save", _file_too_large)
    with pytest.raises(CheckpointError) as info:
        _save(env, 4, keep_last=1)
    monkeypatch.undo()
    assert str(info.value) == (
        "file size limit reached while saving step-000004; step-000002 intact "
        "(raise it with `ulimit -f unlimited`, then rerun with train.resume=latest)"
    )
    assert _names(env.out) == ["step-000002"]


@pytest.mark.parametrize(
    "error, reason",
    [
        (OSError(errno.ENOSPC, "No space left on device"), disk_space.NO_SPACE),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), disk_space.NO_SPACE),
        (OSError(errno.EFBIG, "File too large"), disk_space.FILE_SIZE_LIMIT),
        # safetensors' (Rust) wording for each; it is not an OSError
        (
            RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
            disk_space.NO_SPACE,
        ),
        (
            RuntimeError("Error while serializing: I/O error: File too large (os error 27)"),
            disk_space.FILE_SIZE_LIMIT,
        ),
        (RuntimeError("injected failure"), None),
        (OSError(errno.EIO, "Input/output error"), None),
    ],
)
def test_disk_full_reason(tmp_path, error, reason):
    assert disk_space.disk_full_reason(error, tmp_path) == reason
    assert disk_space._is_no_space(error, tmp_path) is (reason is not None)  # kept for the final save


def test_disk_full_reason_follows_the_cause_chain(tmp_path):
    try:
        try:
            raise OSError(errno.EFBIG, "File too large")
        except OSError as inner:
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"
            ) from inner
    except RuntimeError as outer:
        assert disk_space.disk_full_reason(outer, tmp_path) == disk_space.FILE_SIZE_LIMIT


_ULIMIT_SCRIPT = """
import resource, sys, torch
from accelerate import Accelerator
from dreambooth_kit.training.checkpoints import save_checkpoint
from dreambooth_kit.training.checkpoint_index import CheckpointError, list_checkpoints

acc = Accelerator(cpu=True)
model = torch.nn.Linear(256, 256)  # 263 KB of weights; AdamW's two moments make optimizer.bin ~526 KB
opt = torch.optim.AdamW(model.parameters())
model, opt = acc.prepare(model, opt)
model(torch.ones(1, 256)).sum().backward()
opt.step()
out = sys.argv[1]
save = lambda step: save_checkpoint(acc, out, step, extra_state={}, run_config={}, keep_last=1)
save(2)
# Below optimizer.bin's size, above the model file's: torch.save's writer hits it.
resource.setrlimit(resource.RLIMIT_FSIZE, (400_000, resource.RLIM_INFINITY))
try:
    save(4)
except CheckpointError as e:
    print(e)
    print([s for s, _ in list_checkpoints(out)])
"""


def test_real_ulimit_f_during_a_save(tmp_path):
    """A real `ulimit -f` (RLIMIT_FSIZE): torch.save reports only "enforce fail at
    inline_container.cc ... unexpected pos", which must still read as the file-size limit."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _ULIMIT_SCRIPT, str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=E2E_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    message, steps = proc.stdout.strip().splitlines()
    assert message == (
        "file size limit reached while saving step-000004; files may be at most 0.4 MB here; "
        "step-000002 intact (raise it with `ulimit -f unlimited`, then rerun with train.resume=latest)"
    )
    assert steps == "[2]"
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-000002"]


def test_bad_extra_state_is_refused_before_writing(env):
    with pytest.raises(ValueError, match="step"):
        save_checkpoint(env.acc, env.out, 2, extra_state={"step": 3}, run_config={}, keep_last=None)
    with pytest.raises(TypeError, match="not JSON serializable"):
        save_checkpoint(env.acc, env.out, 2, extra_state={"x": object()}, run_config={}, keep_last=None)
    assert not (env.out / "checkpoints").exists() or _names(env.out) == []


# ------------------------------------------------------------------ pruning and re-saving


def test_keep_last_two_over_eight_steps(env):
    (env.out / "checkpoints" / "checkpoint-best").mkdir(parents=True)  # the user's: never touched
    (env.out / "checkpoints" / "checkpoint-best" / "note.txt").write_text("mine")
    for step in range(1, 9):
        _train(env)
        if step % 2 == 0:
            _save(env, step, keep_last=2)
    assert _names(env.out) == ["checkpoint-best", "step-000006", "step-000008"]
    assert [s for s, _ in list_checkpoints(env.out)] == [6, 8]
    assert (env.out / "checkpoints" / "checkpoint-best" / "note.txt").read_text() == "mine"


def test_prune_never_removes_the_checkpoint_just_written(env):
    _train(env)
    for step in (6, 8):
        _save(env, step, keep_last=2)
    _save(env, 4, keep_last=2)  # a run resumed from an older checkpoint saves an older step
    assert [s for s, _ in list_checkpoints(env.out)] == [4, 6, 8]
    _save(env, 10, keep_last=2)
    assert [s for s, _ in list_checkpoints(env.out)] == [8, 10]


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_resaving_a_step_replaces_it(env, monkeypatch, exchange):
    used = []
    real = atomic.exchange
    monkeypatch.setattr(atomic, "exchange", lambda a, b: used.append(exchange and real(a, b)) or used[-1])
    _train(env)
    _save(env, 2, marker="old")
    _train(env)
    path = _save(env, 2, marker="new")
    lora = _lora(env.unet)
    assert _names(env.out) == ["step-000002"]
    _train(env)
    assert used == [exchange]
    assert load_checkpoint(env.acc, path)["marker"] == "new"
    _assert_same(lora, _lora(env.unet))


def test_failed_replacement_puts_the_earlier_save_back(env, monkeypatch):
    monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    _train(env)
    path = _save(env, 2, marker="old")
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.startswith(".tmp-step-"):  # the finished new save onto its final name
            raise OSError(errno.EIO, "injected")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(CheckpointError, match="step-000002 intact"):
        _save(env, 2, marker="new")
    monkeypatch.undo()
    assert _names(env.out) == ["step-000002"]
    assert load_checkpoint(env.acc, path)["marker"] == "old"


# ------------------------------------------------------------------ finding what to resume


def test_latest_with_no_checkpoint_starts_fresh_and_foreign_folders_are_ignored(env, caplog):
    root = env.out / "checkpoints"
    assert resolve_resume(env.out, None) is None
    with caplog.at_level(logging.INFO, logger=LOG):
        assert resolve_resume(env.out, "latest") is None  # not even a checkpoints folder yet
    assert f"no checkpoint in {root.resolve()}; starting fresh" in caplog.text

    for name in ["checkpoint-best", ".tmp-ckpt-10", "step-000012", "step-000014"]:
        (root / name).mkdir(parents=True)
        (root / name / "optimizer.bin").write_bytes(b"x")
    (root / "step-000014" / "COMPLETE.json").write_text("{not json")
    (root / "notes.txt").write_text("mine")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=LOG):
        assert list_checkpoints(env.out) == []
        assert resolve_resume(env.out, "latest") is None
    for name in ["checkpoint-best", ".tmp-ckpt-10", "step-000012", "step-000014", "notes.txt"]:
        assert any(name in r.getMessage() and r.levelno == logging.INFO for r in caplog.records), name
    assert "starting fresh" in caplog.text

    _train(env)
    real = _save(env, 4, keep_last=1)
    assert resolve_resume(env.out, "latest") == real.resolve()  # not the incomplete step-000012
    assert {"checkpoint-best", ".tmp-ckpt-10", "step-000012", "step-000014"} <= set(_names(env.out))


def test_resume_path_must_exist_and_be_complete(env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as info:
        resolve_resume(env.out, "old-run/checkpoints/step-000100")
    assert str(tmp_path / "old-run" / "checkpoints" / "step-000100") in str(info.value)

    half = tmp_path / "half" / "step-000003"
    half.mkdir(parents=True)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_resume(env.out, str(half))


def test_resume_path_outside_output_dir_is_used_as_given(env, tmp_path, monkeypatch):
    _train(env)
    elsewhere = _save(env, 2, out=tmp_path / "elsewhere", origin="elsewhere")
    _save(env, 2, origin="output_dir")  # same basename inside output_dir: must not be picked
    monkeypatch.chdir(tmp_path)

    got = resolve_resume(env.out, "elsewhere/checkpoints/step-000002")

    assert got == elsewhere.resolve()
    assert load_checkpoint(env.acc, got)["origin"] == "elsewhere"


# ------------------------------------------------------------------ compatibility


def test_check_compatible_lists_each_difference(env, caplog):
    _train(env)
    path = _save(env, 2)
    check_compatible(path, env.run_config, force=False)  # same run: silent

    same_in_effect = copy.deepcopy(env.run_config)
    same_in_effect["train"]["max_steps"] = 9999  # not a compatibility field
    same_in_effect["adapter"]["target_modules"] = ["to_v", "to_q", "to_k", "to_out.0"]  # a set to peft
    check_compatible(path, same_in_effect, force=False)

    now = copy.deepcopy(env.run_config)
    now["adapter"]["rank"] = 8
    now["data"]["resolution"] = 768
    with pytest.raises(CheckpointError) as info:
        check_compatible(path, now, force=False)
    msg = str(info.value)
    assert "adapter.rank: 4 in the checkpoint, 8 now" in msg
    assert "data.resolution: 512 in the checkpoint, 768 now" in msg
    assert "set train.resume_force=true to resume anyway" in msg
    assert "model.pretrained" not in msg
    # The settings that shape the optimisation are checked too: before, another learning rate
    # resumed silently with the checkpoint's (the restored optimizer's) while config.yaml said the new.
    lr = copy.deepcopy(env.run_config)
    lr["train"]["learning_rate"] = 1.0
    lr["model"]["prediction_type"] = (
        "epsilon" if lr["model"]["prediction_type"] != "epsilon" else "v_prediction"
    )
    with pytest.raises(CheckpointError) as info:
        check_compatible(path, lr, force=False)
    assert "train.learning_rate: 0.0001 in the checkpoint, 1.0 now" in str(info.value)
    assert "model.prediction_type:" in str(info.value)

    with caplog.at_level(logging.WARNING, logger=LOG):
        check_compatible(path, now, force=True)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "adapter.rank: 4 in the checkpoint, 8 now" in warnings[0].getMessage()


def test_forced_resume_with_another_rank_fails_naming_the_lora_file(env, tiny_model, tmp_path):
    _train(env)
    path = _save(env, 2)
    other = _setup(tiny_model, tmp_path / "other", rank=8)
    with pytest.raises(CheckpointError, match=r"unet_lora.safetensors does not fit .*size mismatch"):
        load_checkpoint(other.acc, path)


# ------------------------------------------------------------------ damaged checkpoints


@pytest.mark.parametrize("name", ["optimizer.bin", "scheduler.bin", "unet_lora.safetensors"])
def test_corrupt_state_file_is_named(env, name):
    _train(env)
    _save(env, 2)
    path = _save(env, 4)
    file = path / name
    file.write_bytes(os.urandom(file.stat().st_size))  # same size: passes the size check

    with pytest.raises(CheckpointError) as info:
        load_checkpoint(env.acc, path)
    msg = str(info.value)
    assert str(file) in msg and "damaged" in msg
    assert "step-000002" in msg  # points at the earlier checkpoint
    assert "weights_only" not in msg and "invalid load key" not in msg  # not torch's raw text


def test_truncated_state_file_is_named(env):
    _train(env)
    path = _save(env, 2)
    file = path / "optimizer.bin"
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="optimizer.bin is 100 bytes"):
        load_checkpoint(env.acc, path)


def test_missing_rng_file_fails_the_exact_resume_unless_forced(env, caplog):
    """Before, a missing or damaged RNG file was a warning and the resume went on, no longer exact."""
    _train(env)
    path = _save(env, 2)
    lora = _lora(env.unet)
    (path / "random_states_0.pkl").unlink()
    _train(env)

    with pytest.raises(CheckpointError, match=r"random_states_0.pkl is missing: .*train.resume_force=true"):
        load_checkpoint(env.acc, path)
    with caplog.at_level(logging.INFO, logger=LOG):
        state = load_checkpoint(env.acc, path, force=True)

    assert state["step"] == 2
    _assert_same(lora, _lora(env.unet))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "random_states_0.pkl" in warnings[0].getMessage()
    assert "would not be the uninterrupted one" in warnings[0].getMessage()


@pytest.mark.parametrize(
    "state, said",
    [
        ({"step": 2}, "state.json says 2, COMPLETE.json says 4, the folder name says 4"),
        (["step", 4], "state.json says None"),
        ({"epoch": 1}, "state.json says None"),
    ],
)
def test_a_state_json_that_disagrees_with_its_checkpoint_is_refused(env, state, said):
    """Before, state.json's step was trusted: step 2's state inside step-000004 resumed at step 2,
    and a state.json of the wrong shape was a traceback."""
    import json

    _train(env)
    path = _save(env, 4)
    size = (path / "state.json").stat().st_size  # the same size: COMPLETE.json's size check passes
    (path / "state.json").write_text(json.dumps(state).ljust(size))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(env.acc, path)
    assert said in str(info.value) and "edited or copied from another checkpoint" in str(info.value)


def test_resume_with_another_process_count_is_refused_with_the_fix(tmp_path, caplog):
    import json

    from dreambooth_kit.training.checkpoint_index import CheckpointError
    from dreambooth_kit.training.resume_checks import check_process_count

    (tmp_path / "state.json").write_text(json.dumps({"step": 4, "processes": 2}))
    check_process_count(tmp_path, 2, force=False)  # the same count: fine
    with pytest.raises(CheckpointError, match="written by 2 processes, this run has 1.*--nproc_per_node 2"):
        check_process_count(tmp_path, 1, force=False)
    check_process_count(tmp_path, 1, force=True)
    assert "train.resume_force=true: continuing" in caplog.text
    (tmp_path / "state.json").write_text(json.dumps({"step": 4}))  # written before the count was kept
    check_process_count(tmp_path, 1, force=False)


@pytest.mark.parametrize(
    "raised, becomes",
    [
        (ZeroDivisionError("a bug"), ZeroDivisionError),
        (RuntimeError("size mismatch for lora_A"), CheckpointError),
    ],
)
def test_a_failed_restore_is_a_user_error_only_when_the_checkpoint_does_not_fit(
    env, monkeypatch, raised, becomes
):
    """Before, any exception while restoring became a one-line CheckpointError, so a bug lost its
    traceback; a checkpoint of another setup (a shape mismatch) is still one line."""
    _train(env)
    path = _save(env, 2)

    def fail(*a, **k):
        raise raised

    monkeypatch.setattr(env.acc, "load_state", fail)
    with pytest.raises(becomes):
        load_checkpoint(env.acc, path)

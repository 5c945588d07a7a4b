from __future__ import annotations

import os
import signal

import pytest
import torch
from conftest import patch_diffusion_loss, tiny_cfg
from safetensors.torch import load_file

from dreambooth_kit.training.guards import NonFiniteGuard, NonFiniteLossError, StopSignals


def test_guard_counts_and_stops_after_k_in_a_row():
    g = NonFiniteGuard(3)
    g.record(1, True)
    g.record(2, False)
    g.record(3, True)  # an isolated bad step resets on the next good one
    g.record(4, False)
    g.record(5, False)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at steps \[4, 5, 6\]"):
        g.record(6, False)
    assert g.steps == [2, 4, 5, 6]


def test_stop_signals_set_a_flag_and_restore_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as s:
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal; the process must survive it
        assert s.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_second_ctrl_c_is_a_keyboard_interrupt():
    with StopSignals() as s:
        os.kill(os.getpid(), signal.SIGINT)
        assert s.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def _nan_from(step_from: int, monkeypatch, *, only: set[int] | None = None):
    def nan(n, loss):
        bad = n in only if only is not None else n >= step_from
        return loss * float("nan") if bad else loss

    patch_diffusion_loss(monkeypatch, nan)


def test_k_nan_steps_stop_training_keep_last_good_checkpoint_and_write_no_lora(
    tmp_path, tiny_model, photos, monkeypatch
):
    from dreambooth_kit.training.train import train

    _nan_from(3, monkeypatch)
    cfg = tiny_cfg(
        tmp_path,
        tiny_model,
        photos,
        **{"train.max_steps": 8, "train.max_nonfinite_steps": 3, "checkpoint.every_steps": 2},
    )
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at steps \[3, 4, 5\]"):
        train(cfg)
    out = tmp_path / "run"
    assert not (out / "lora").exists()
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert ckpts == ["step-000002"]  # step 4 was skipped (non-finite): no checkpoint from it
    sd = load_file(next((out / "checkpoints" / "step-000002").glob("*unet*.safetensors")))
    assert all(torch.isfinite(v).all() for v in sd.values())


def test_isolated_nan_step_is_skipped_counted_and_training_finishes(
    tmp_path, tiny_model, photos, monkeypatch
):
    from dreambooth_kit.training.train import train

    _nan_from(0, monkeypatch, only={2})
    r = train(tiny_cfg(tmp_path, tiny_model, photos, **{"train.max_steps": 4}))
    assert r.skipped_steps == [2] and r.steps == 4
    assert all(torch.isfinite(v).all() for v in load_file(r.lora_path).values())


def test_cli_exit_code_for_nan_is_1(tmp_path, tiny_model, photos, monkeypatch, capsys):
    from dreambooth_kit.cli import main

    _nan_from(1, monkeypatch)
    rc = main(
        [
            "train", "--config", "tiny.yaml", f"model.pretrained={tiny_model}", f"data.instance_dir={photos}",
            f"prior.class_dir={tmp_path / 'c'}", "prior.num_class_images=2", "prior.sample_steps=1",
            f"train.output_dir={tmp_path / 'run'}", "train.max_steps=5", "train.max_nonfinite_steps=2",
        ]
    )  # fmt: skip
    assert rc == 1
    assert "non-finite loss at steps [1, 2]" in capsys.readouterr().err


def test_a_resumed_run_keeps_the_skipped_steps_of_its_history(tmp_path, tiny_model, photos, monkeypatch):
    """The guard's history is part of the saved state: a run that skipped step 2, stopped at step 3
    and resumed to 4 reports step 2 as skipped, as the uninterrupted run does (before: [])."""
    from dreambooth_kit.training.train import train

    _nan_from(0, monkeypatch, only={2})
    train(tiny_cfg(tmp_path, tiny_model, photos, **{"train.max_steps": 3}))  # the NaN: call 2 only
    r = train(tiny_cfg(tmp_path, tiny_model, photos, **{"train.max_steps": 4, "train.resume": "latest"}))
    assert r.skipped_steps == [2] and r.steps == 4

"""train.stop=auto: the stopping rule over a run's scores, and a toy-model run that stops at its best
step, keeps that step's weights, says why, and resumes to the same stop."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from dreambooth_kit.training.stopping import AutoStop


def _row(fidelity: float, pres: float, **extra) -> dict:
    return {"subject_fidelity": fidelity, "pres": pres, "subject_rate": 1.0, **extra}


def _scores(rule: AutoStop, *rows: tuple[int, float, float]) -> AutoStop:
    for step, fidelity, pres in rows:
        rule.add(step, _row(fidelity, pres))
    return rule


def test_a_rising_fidelity_never_stops():
    rule = _scores(
        AutoStop(0.02, 2), (0, 0.60, 0.60), (100, 0.70, 0.60), (200, 0.78, 0.61), (300, 0.85, 0.61)
    )
    decision = rule.decide()
    assert not decision.stop and decision.best_step == 300


def test_a_plateau_stops_after_patience_scores_past_the_earliest_step_within_tolerance():
    rule = _scores(AutoStop(0.02, 2), (0, 0.60, 0.60), (100, 0.80, 0.60), (200, 0.86, 0.61))
    assert not rule.decide().stop
    rule.add(300, _row(0.87, 0.61))  # within 0.02 of 0.86: step 200 stays the best
    d = rule.decide()
    assert (d.stop, d.best_step) == (False, 200)
    rule.add(400, _row(0.87, 0.62))
    d = rule.decide()
    assert (d.stop, d.best_step) == (True, 200)
    assert "step 200 has been the best through the 2 scores after it (steps 300, 400" in d.why


def test_fidelity_bought_with_class_drift_does_not_move_the_best():
    """A higher fidelity from a step whose PRES rose past the tolerance is not better (evaluate's rule)."""
    rule = _scores(
        AutoStop(0.02, 2), (0, 0.60, 0.60), (100, 0.85, 0.60), (200, 0.86, 0.70), (300, 0.86, 0.75)
    )
    d = rule.decide()
    assert (d.stop, d.best_step) == (True, 100)


def test_scores_that_cannot_rank_name_no_best_and_never_stop():
    rule = AutoStop(0.02, 1)
    for step in (0, 100, 200):
        rule.add(step, _row(0.6, 0.6, subject_rate=0.0))  # the judge found the subject nowhere
    d = rule.decide()
    assert (d.stop, d.best_step) == (False, None) and "found the subject in no image" in d.why


def test_a_step_scored_again_replaces_its_row():
    rule = _scores(AutoStop(0.02, 2), (0, 0.6, 0.6), (100, 0.8, 0.6))
    rule.add(100, _row(0.7, 0.6))
    assert [(r["step"], r["subject_fidelity"]) for r in rule.to_state()] == [(0, 0.6), (100, 0.7)]


# --- a toy-model run -------------------------------------------------------------------------------
# The training is the toy model's, the scores are scripted: 60 steps do not teach the toy model its
# subject (the judge finds it in no image, and the rule then rightly names no best), and the rule
# itself is tested above. Fidelity rises to step 20 and then stays within evaluate.tolerance, so
# step 20 is the best and, with stop_patience 2, the run stops at step 40 of 80.
SCRIPT = {0: 0.60, 10: 0.70, 20: 0.80, 30: 0.805, 40: 0.81, 50: 0.81, 60: 0.81, 70: 0.81, 80: 0.81}
AUTO = {
    "train.stop": "auto", "train.stop_patience": 2, "train.max_steps": 80, "train.batch_size": 2,
    "train.log_every": 10, "validation.every_steps": 10, "validation.num_images": 1, "validation.steps": 2,
    "prior.num_class_images": 4, "prior.sample_steps": 4, "checkpoint.keep_last": 1,
}  # fmt: skip


def _scripted_scorer(cfg, accelerator):
    """Stands in for evaluate's scorer (train._validation_scorer): the scores of SCRIPT by step."""

    def score(pipe, step, acc, out):
        return {"subject_fidelity": SCRIPT[step], "pres": 0.6, "subject_rate": 1.0, "div": 0.2}

    return score if accelerator.is_main_process else None


def _toy_cfg(tmp_path, name: str, **extra):
    from dreambooth_kit.config import load_config
    from dreambooth_kit.toy import world

    photos = tmp_path / "photos"
    if not photos.is_dir():
        world.write_subject_photos(photos)
    over = {"data.instance_dir": str(photos), "prior.class_dir": str(tmp_path / "cls"),
            "train.output_dir": str(tmp_path / name), **AUTO, **extra}  # fmt: skip
    return load_config("toy.yaml", over)


@pytest.mark.slow
def test_auto_stop_keeps_the_best_steps_weights_says_why_and_resumes_to_the_same_stop(
    tmp_path, monkeypatch, caplog
):
    import dreambooth_kit.training.loop as loop_mod
    import dreambooth_kit.training.train as train_mod
    from dreambooth_kit.training.card import model_card
    from dreambooth_kit.training.guards import TrainingInterrupted
    from dreambooth_kit.training.train import train

    monkeypatch.setattr(train_mod, "_validation_scorer", _scripted_scorer)
    with caplog.at_level("INFO", logger="dreambooth_kit"):
        straight = train(_toy_cfg(tmp_path, "straight"))
    assert (straight.stopped_at, straight.best_step, straight.steps) == (40, 20, 40)
    assert "train.stop=auto: stopping at step 40 of 80; step 20 has been the best" in caplog.text
    out = straight.output_dir
    # The best checkpoint survived keep_last=1 and the final LoRA is its weights, bit for bit.
    final = {k.removeprefix("unet."): v for k, v in load_file(straight.lora_path).items()}
    best, last = (
        load_file(out / "checkpoints" / f"step-{n:06d}" / "unet_lora.safetensors") for n in (20, 40)
    )
    assert best.keys() == final.keys() and all(torch.equal(best[k], final[k]) for k in best)
    assert any(not torch.equal(last[k], final[k]) for k in last)  # 20 more steps did change them
    record = json.loads((out / "eval" / "auto_stop.json").read_text())
    assert (record["stopped_at"], record["best_step"]) == (40, 20)
    assert [r["step"] for r in record["scores"]] == [0, 10, 20, 30, 40]
    assert "stopped at step 40 of 80; the weights are step 20's: step 20 has been the best" in model_card(out)

    # Killed during step 31 (SIGTERM, as a preempted Colab): a checkpoint of step 31, then a resume
    # that stops where the uninterrupted run stopped, with the same final LoRA.
    real, calls = loop_mod._step, {"n": 0}

    def step_then_signal(*a, **k):
        calls["n"] += 1
        if calls["n"] == 31:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(loop_mod, "_step", step_then_signal)
    with pytest.raises(TrainingInterrupted):
        train(_toy_cfg(tmp_path, "cut"))
    monkeypatch.setattr(loop_mod, "_step", real)
    resumed = train(_toy_cfg(tmp_path, "cut", **{"train.resume": "latest"}))
    assert (resumed.stopped_at, resumed.best_step) == (40, 20)
    again = {k.removeprefix("unet."): v for k, v in load_file(resumed.lora_path).items()}
    assert again.keys() == final.keys() and all(torch.equal(again[k], final[k]) for k in final)
    scores = json.loads((resumed.output_dir / "eval" / "auto_stop.json").read_text())["scores"]
    assert scores == record["scores"]


def test_auto_stop_needs_validation_steps():
    from dreambooth_kit.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.stop: auto scores the weights every validation.every_steps"):
        load_config("toy.yaml", {"data.instance_dir": "photos", "train.stop": "auto"})

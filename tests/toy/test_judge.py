"""The shipped judge of the toy world reads class, colour and background off fresh renders, tells the
subject from the world's balls, and gives normalised features; its training script runs."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from dreambooth_kit.errors import UserError
from dreambooth_kit.toy import world
from dreambooth_kit.toy.judge import Judge, main, train_judge

SEED = 424_242  # scenes and textures the judge never trained or was evaluated on


@pytest.fixture(scope="module")
def judge() -> Judge:
    return Judge.load()


def _renders(scenes, seed):
    return [world.render(s, seed=seed + i) for i, s in enumerate(scenes)]


@pytest.mark.parametrize("held_out", [False, True], ids=["seen", "held-out"])
def test_shipped_judge_reads_every_head_on_fresh_renders(judge, held_out):
    rng = random.Random(SEED + held_out)
    scenes = [world.random_scene(rng, held_out=held_out) for _ in range(150)]
    p = judge.predict(_renders(scenes, SEED))
    for head, truth in (
        ("class", [s.cls for s in scenes]),
        ("colour", [s.colour for s in scenes]),
        ("background", [s.background for s in scenes]),
    ):
        assert np.mean(p[head] == np.array(truth)) >= 0.97, head
    assert np.mean(p["subject_prob"] > 0.5) <= 0.03


def test_subject_detector_separates_the_subject_from_balls_of_every_colour(judge):
    rng = random.Random(SEED + 7)
    colours = list(world.COLOURS)
    balls = [world.random_scene(rng, cls="ball", colour=colours[i % 8], held_out=None) for i in range(96)]
    subjects = [world.random_scene(rng, subject=True) for _ in range(96)]
    prob = judge.predict(_renders(balls + subjects, SEED))["subject_prob"]
    truth = np.array([False] * 96 + [True] * 96)
    assert np.mean((prob > 0.5) == truth) >= 0.97
    photos = [img for img, _ in world.subject_photos()]
    assert (judge.predict(photos)["subject_prob"] > 0.5).all()
    assert (judge.predict(photos)["class"] == "ball").all()


def test_features_are_unit_vectors_and_an_image_matches_itself(judge):
    img = world.render(world.random_scene(random.Random(SEED)), seed=SEED)
    f = judge.features([img, img, img.resize((64, 64))])
    assert f.shape[0] == 3 and f.ndim == 2
    assert torch.allclose(f.norm(dim=1), torch.ones(3), atol=1e-5)
    assert float(f[0] @ f[1]) == pytest.approx(1.0, abs=1e-5)
    assert float(f[0] @ f[2]) > 0.95  # a 64 px copy is resized to 32 px and lands next to it
    # a uint8 array is the same input as the PIL image
    assert torch.allclose(judge.features(np.asarray(img)[None]), f[:1], atol=1e-6)


def test_shipped_record_matches_the_world_and_the_bar():
    record = Judge.load().record
    assert record["config"]["classes"] == list(world.CLASSES)
    assert all(record["accuracy"][h] >= 0.97 for h in ("class", "colour", "background", "subject"))


def test_train_judge_writes_weights_and_record_that_load(tmp_path):
    out = train_judge(tmp_path / "judge", seed=1, steps=2, batch_size=8, eval_size=16, log=lambda _: None)
    record = json.loads((out / "judge.json").read_text())
    assert record["steps"] == 2 and record["accuracy"]["n"] == 16
    loaded = Judge.load(out / "judge.safetensors")
    assert set(loaded.predict([world.render(world.random_scene(random.Random(0)))])) == {
        "class",
        "colour",
        "background",
        "subject_prob",
    }
    assert not list(out.glob("*.tmp"))
    # Seeded: the same seed gives the same weights, byte for byte.
    again = train_judge(tmp_path / "again", seed=1, steps=2, batch_size=8, eval_size=16, log=lambda _: None)
    assert (again / "judge.safetensors").read_bytes() == (out / "judge.safetensors").read_bytes()


def test_a_missing_judge_is_one_clear_user_error(tmp_path):
    with pytest.raises(
        UserError, match=r"judge\.safetensors is missing.*python -m dreambooth_kit\.toy\.judge"
    ):
        Judge.load(tmp_path)


def test_a_truncated_judge_is_one_clear_user_error(tmp_path):
    shipped = Judge.load().record
    (tmp_path / "judge.json").write_text(json.dumps(shipped))
    (tmp_path / "judge.safetensors").write_bytes(b"\x00" * 100)  # a copy cut short
    with pytest.raises(UserError, match="cannot read the judge.*train it again"):
        Judge.load(tmp_path)


def test_cli_reports_bad_arguments_as_an_error_line(tmp_path, capsys):
    assert main([str(tmp_path), "--steps", "0"]) == 2
    assert capsys.readouterr().out.startswith("error: train_judge: steps=0")

"""`evaluate`: prompt sets, the best-checkpoint rule, encoders (tiny random DINO-like ViT and CLIP
built here, loaded from local folders through transformers like the Hub ones), caching and resume
of a partial evaluation, the best checkpoint's LoRA, validation.metrics, and the command line."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_cfg

from dreambooth_kit.evaluation import evaluate as ev
from dreambooth_kit.evaluation import scoring
from dreambooth_kit.evaluation.prompt_sets import build, is_live

# ------------------------------------------------------------------ tiny encoders built in code


def build_tiny_vit(path: Path) -> Path:
    """A random ViT (DINO's architecture, 2 layers, 32 px) saved like a Hub model."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64,
    )  # fmt: skip
    ViTModel(cfg).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def build_tiny_clip(path: Path, tokenizer_dir: Path) -> Path:
    """A random CLIP (32 px images, 2-layer towers, 16-d projection) with the tiny model's tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(1)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    cfg = CLIPConfig(
        text_config={**small, "vocab_size": len(tok), "max_position_embeddings": 77},
        vision_config={**small, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(path)
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=images, tokenizer=tok).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def encoders_dir(tmp_path_factory, tiny_model) -> dict[str, str]:
    d = tmp_path_factory.mktemp("encoders")
    return {
        "subject": str(build_tiny_vit(d / "vit")),
        "prompt": str(build_tiny_clip(d / "clip", tiny_model / "tokenizer")),
    }


def eval_overrides(encoders_dir, prompts_file: Path) -> list[str]:
    return [
        f"evaluate.subject_encoder={encoders_dir['subject']}",
        f"evaluate.prompt_encoder={encoders_dir['prompt']}",
        f"evaluate.prompts={prompts_file}",
        "evaluate.seeds=2",
        "evaluate.class_images=2",
        "evaluate.steps=2",
    ]


@pytest.fixture(scope="module")
def run_with_checkpoints(tmp_path_factory, tiny_model):
    """A 2-step tiny LoRA run with a checkpoint at each step (kept), and a 2-prompt file. The LoRA
    starts random (adapter.init_lora_weights: false), so its images differ clearly from the base
    model's after 2 steps: a checkpoint scored without its weights would show."""
    from conftest import DEMO_PHOTOS

    from dreambooth_kit.training.train import train

    tmp = tmp_path_factory.mktemp("evalrun")
    shutil.copytree(DEMO_PHOTOS, tmp / "photos")
    cfg = tiny_cfg(
        tmp, tiny_model, tmp / "photos",
        **{"train.max_steps": 2, "train.learning_rate": 1e-2, "checkpoint.every_steps": 1,
           "checkpoint.keep_last": None, "adapter.init_lora_weights": False},
    )  # fmt: skip
    train(cfg)
    prompts = tmp / "prompts.txt"
    prompts.write_text("# two prompts\na photo of {subject}\n\na photo of {subject} on a table\n")
    return tmp / "run", prompts


# ------------------------------------------------------------------ prompt sets


def test_paper_prompts_fill_identifier_and_class_and_differ_for_live_subjects():
    dog = build("paper", identifier="zwx", class_noun="dog")
    can = build("paper", identifier="zwx", class_noun="can")
    assert is_live("dog") and not is_live("can")
    assert len(dog) == len(can) == 15
    assert all("zwx dog" in p.text for p in dog) and all("zwx can" in p.text for p in can)
    assert {p.text for p in dog} != {p.text.replace("can", "dog") for p in can}  # other accessories
    # CLIP-T scores the prompt without the identifier: CLIP does not know the rare word.
    assert all("zwx" not in p.scored and "dog" in p.scored for p in dog)


def test_prompt_file_is_read_and_a_prompt_without_the_subject_is_refused(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# mine\na {class} called {subject}\n\n")
    (p,) = build(str(f), identifier="sks", class_noun="cat")
    assert p.text == "a cat called sks cat" and p.scored == "a cat called cat"
    f.write_text("a photo of a {class}\n")
    with pytest.raises(ValueError, match="no \\{subject\\}"):
        build(str(f), identifier="sks", class_noun="cat")
    with pytest.raises(ValueError, match="no such file"):
        build(str(tmp_path / "missing.txt"), identifier="sks", class_noun="cat")


def test_toy_prompts_name_each_background_and_the_judge_reads_them():
    from dreambooth_kit.toy import world
    from dreambooth_kit.toy.plugin import toy_attributes

    toy = build("toy", identifier="zwx", class_noun="ball")
    assert [p.text for p in toy][0] == "a photo of zwx ball"
    assert [toy_attributes(p.text) for p in toy[1:]] == [{"background": b} for b in world.BACKGROUNDS]
    assert toy_attributes("a photo of a red box on a sand background") == {
        "background": "sand", "class": "box", "colour": "red",
    }  # fmt: skip


# ------------------------------------------------------------------ the best-checkpoint rule


def row(name, step, fid, pres, fid_se=0.0, pres_se=0.0):
    return {"checkpoint": name, "step": step, "subject_fidelity": fid, "pres": pres,
            "subject_fidelity_se": fid_se, "pres_se": pres_se}  # fmt: skip


def test_best_is_the_earliest_checkpoint_within_tolerance_of_both_bests():
    rows = [row("base", 0, 0.9, 0.1), row("s100", 100, 0.70, 0.50), row("s200", 200, 0.79, 0.52),
            row("s300", 300, 0.80, 0.60), row("s400", 400, 0.81, 0.51)]  # fmt: skip
    best, reason = ev.best_checkpoint(rows, tolerance=0.02)
    # s200: fidelity 0.79 >= 0.81 - 0.02 and PRES 0.52 <= 0.50 + 0.02; base is never a candidate.
    assert best["checkpoint"] == "s200" and "earliest" in reason
    assert ev.best_checkpoint(rows, tolerance=0.0)[0]["checkpoint"] not in {"s200", "base"}


def test_noise_widens_the_tolerance_and_without_any_candidate_the_tradeoff_is_named():
    rows = [row("a", 1, 0.80, 0.40, fid_se=0.03), row("b", 2, 0.86, 0.60, fid_se=0.03)]
    # The fidelity gap 0.06 is within 2 x sqrt(0.03^2 + 0.03^2) = 0.085: a is as good and earlier.
    assert ev.best_checkpoint(rows, tolerance=0.02)[0]["checkpoint"] == "a"
    rows = [row("a", 1, 0.70, 0.40), row("b", 2, 0.95, 0.62)]
    best, reason = ev.best_checkpoint(rows, tolerance=0.02)
    assert best["checkpoint"] == "b" and "no checkpoint is within noise" in reason  # 0.33 vs 0.30


def test_pres_below_the_base_models_is_not_better():
    """Class samples that are neither the class nor the subject score a low PRES too (toy world,
    100 steps without prior preservation: 0.20 against the base model's 0.58): not a better prior."""
    rows = [row("base", 0, 0.60, 0.58), row("s100", 100, 0.66, 0.20), row("s200", 200, 0.80, 0.59)]
    best, reason = ev.best_checkpoint(rows, tolerance=0.02)
    assert best["checkpoint"] == "s200" and best["pres"] == 0.59  # the row itself, not the floored one
    assert "never below the base model's" in reason


def test_no_checkpoint_is_best_when_the_scores_see_no_subject():
    """Fidelity <= 0 or not a number in every row (the user's report: negative fidelity under the
    toy judge on their own photos): no best, so nothing is exported. A row at <= 0 never wins."""
    rows = [row("base", 0, -0.05, 0.30), row("s1", 1, -0.12, 0.20), row("s2", 2, 0.0, 0.10)]
    best, reason = ev.best_checkpoint(rows, tolerance=0.02)
    assert best is None and "no checkpoint is better than the others by these scores" in reason
    rows += [row("s3", 3, float("nan"), 0.10), {**row("s4", 4, 0.5, 0.10), "subject_fidelity": None}]
    assert ev.best_checkpoint(rows, tolerance=0.02)[0] is None
    # Before the guard s2 won on fidelity - PRES (-0.1 against s5's -0.6): a subject nobody drew.
    rows = [row("s1", 1, -0.12, 0.20), row("s2", 2, 0.0, 0.10), row("s5", 5, 0.30, 0.90)]
    assert ev.best_checkpoint(rows, tolerance=0.02)[0]["checkpoint"] == "s5"
    # Positive fidelity, but the toy judge found the subject in no image of any checkpoint (the demo
    # photos under the toy judge, tiny model: fidelity 0.60-0.63, subject rate 0 in every row).
    toy = [{**row(n, i, 0.61, 0.62), "subject_rate": 0.0} for i, n in enumerate(["base", "s1", "s2"])]
    best, reason = ev.best_checkpoint(toy, tolerance=0.02)
    assert best is None and "found the subject in no image" in reason
    toy[2]["subject_rate"] = 0.25
    assert ev.best_checkpoint(toy, tolerance=0.02)[0]["checkpoint"] == "s1"  # meaningful: the rule as before


# ------------------------------------------------------------------ photos the encoders cannot judge

TOY_JUDGE = ["evaluate.subject_encoder=toy-judge", "evaluate.prompt_encoder=toy-judge"]
GENERAL = "evaluate.subject_encoder=facebook/dino-vits16 evaluate.prompt_encoder=openai/clip-vit-base-patch32"


def test_toy_judge_on_photos_not_of_the_toy_world_is_refused_before_anything_is_written(
    run_with_checkpoints, encoders_dir, tmp_path, capsys
):
    """The user's report: the toy judge on their own photos gave meaningless numbers and exported a
    "best". The run's photos are the demo subject's (not the toy world; the judge calls 0 of the 5
    its subject): evaluate stops, naming the folder, the encoders and the fix, and writes nothing
    (0.2 s; without the check the same call drew 18 images and scored them, fidelity 0.60-0.63,
    subject rate 0)."""
    from dreambooth_kit.cli import main

    run, prompts = run_with_checkpoints
    mine = tmp_path / "run"
    shutil.copytree(run, mine, ignore=shutil.ignore_patterns("eval"))
    over = [*eval_overrides(encoders_dir, prompts), *TOY_JUDGE]  # the later value of a key wins
    with pytest.raises(scoring.UnjudgeablePhotos) as e:
        ev.evaluate(mine, overrides=over)
    for needed in (f"{run.parent / 'photos'}: the toy judge", "evaluate.subject_encoder=toy-judge",
                   "0 of these 5 photos", GENERAL, "--photos"):  # fmt: skip
        assert needed in str(e.value)
    assert main(["evaluate", "--run", str(mine), *over]) == 2
    assert GENERAL in capsys.readouterr().err
    assert not (mine / "eval").exists()  # no images, no metrics.csv, no best-lora/


def test_the_toy_subjects_photos_pass_the_judge_check_and_general_encoders_have_none(tmp_path):
    from conftest import DEMO_PHOTOS

    from dreambooth_kit.toy import world

    world.write_subject_photos(tmp_path)
    toy = scoring.load_photos(tmp_path)
    both = {"subject_encoder": "toy-judge", "prompt_encoder": "toy-judge"}
    assert scoring.check_encoders_know_photos(toy, tmp_path, **both) == [1.0]  # 5 of 5
    demo = scoring.load_photos(DEMO_PHOTOS)
    dino, clip = "facebook/dino-vits16", "openai/clip-vit-base-patch32"
    with pytest.raises(scoring.UnjudgeablePhotos, match=f"0 of these 5 photos.*prompt_encoder={clip}") as e:
        scoring.check_encoders_know_photos(
            demo, DEMO_PHOTOS, subject_encoder=dino, prompt_encoder="toy-judge"
        )
    assert "subject_encoder" not in str(e.value)  # only the key that is the toy judge is named
    # DINO and CLIP are general encoders: no detector, no check (and nothing is loaded for it).
    assert (
        scoring.check_encoders_know_photos(demo, DEMO_PHOTOS, subject_encoder=dino, prompt_encoder=clip) == []
    )


# ------------------------------------------------------------------ encoders


def test_tiny_encoders_load_from_folders_and_give_features_and_clip_t(encoders_dir):
    from PIL import Image

    from dreambooth_kit.evaluation.encoders import load_encoders

    enc = load_encoders(encoders_dir["subject"], encoders_dir["prompt"])
    imgs = [Image.new("RGB", (64, 64), c) for c in ("red", "blue", "green")]
    assert enc.subject.image_features(imgs).shape == (3, 32)  # ViT CLS token, hidden size 32
    assert enc.prompt.image_features(imgs).shape == (3, 16)  # CLIP projection
    t = enc.prompt.prompt_fidelity(imgs, ["a photo of toy"] * 3)
    assert -1.0 <= t <= 1.0
    assert not torch.allclose(enc.subject.image_features(imgs[:1]), enc.subject.image_features(imgs[1:2]))


def test_missing_hub_encoder_offline_says_which_and_how_to_get_it(encoders_dir):
    from dreambooth_kit.evaluation.encoders import EncoderError, load_encoders

    with pytest.raises(EncoderError) as e:
        load_encoders("facebook/dino-vits16", "openai/clip-vit-base-patch32")
    msg = str(e.value)
    for needed in ("evaluate.subject_encoder='facebook/dino-vits16'", "evaluate.prompt_encoder",
                   "hf download facebook/dino-vits16", "hf download openai/clip-vit-base-patch32",
                   "local folder"):  # fmt: skip
        assert needed in msg


# ------------------------------------------------------------------ a whole evaluation


def test_evaluate_writes_table_report_plot_and_best_lora(run_with_checkpoints, encoders_dir):
    run, prompts = run_with_checkpoints
    r = ev.evaluate(run, overrides=eval_overrides(encoders_dir, prompts))
    assert [x["checkpoint"] for x in r.rows] == ["base", "step-000001", "step-000002"]
    per_target = 2 * 2 + 2  # 2 prompts x 2 seeds + 2 class images
    assert r.made == 3 * per_target and all(x["images"] == per_target for x in r.rows)
    for x in r.rows:
        for m in ("subject_fidelity", "clip_i", "prompt_fidelity", "pres", "div"):
            assert -1 <= x[m] <= 2
        assert x["subject_rate"] is None  # only the toy judge detects the subject
    # The checkpoints' images are drawn with their LoRA: unlike the base model's, pixel for pixel.
    base, step1 = (next((run / "eval" / "images").glob(f"{n}-*")) for n in ("base", "step-000001"))
    for png in base.glob("*.png"):
        assert png.read_bytes() != (step1 / png.name).read_bytes()
    assert (run / "eval" / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (run / "eval" / "report.md").read_text()
    assert f"**Best: {r.best['checkpoint']}**" in report and "| step-000002 | 2 |" in report
    assert len(list((run / "eval" / "images").glob("*/*.png"))) == 3 * per_target


def test_best_lora_loads_in_plain_diffusers_and_draws_the_checkpoints_images(
    run_with_checkpoints, encoders_dir, tiny_model
):
    """The best checkpoint's LoRA, written in the final LoRA's format, loads with diffusers'
    load_lora_weights and reproduces the image evaluate drew from the checkpoint itself."""
    import numpy as np
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from dreambooth_kit.inference.generate import generate
    from dreambooth_kit.inference.pipeline import set_scheduler

    run, prompts = run_with_checkpoints
    r = ev.evaluate(run, checkpoints="step-000001", overrides=eval_overrides(encoders_dir, prompts))
    assert r.best["checkpoint"] == "step-000001" and r.made == 0  # rows from the first evaluation
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_model), safety_checker=None)
    pipe.load_lora_weights(str(r.files["best_lora"]))
    set_scheduler(pipe, scoring.SAMPLER)
    plan = scoring.plan_for(_spec(run, encoders_dir, prompts))
    text = plan.prompts[0].text
    (img, _), *_ = generate(pipe, text, seed=plan.seeds[0], steps=plan.steps, guidance_scale=plan.guidance_scale,
                            height=plan.resolution, width=plan.resolution)  # fmt: skip
    folder = next((run / "eval" / "images").glob("step-000001-*"))
    cached = np.asarray(Image.open(folder / f"{plan.image_key(text, plan.seeds[0])}.png"), dtype=np.int16)
    assert np.abs(np.asarray(img, dtype=np.int16) - cached).max() <= 2


def _spec(run: Path, encoders_dir, prompts):
    from dreambooth_kit.config import load_config
    from dreambooth_kit.training.plan import eval_spec

    return eval_spec(load_config(run / "config.yaml", eval_overrides(encoders_dir, prompts)))


def test_an_interrupted_evaluation_resumes_with_only_the_missing_images(
    run_with_checkpoints, encoders_dir, tmp_path, monkeypatch
):
    """Killed in the middle of a checkpoint's images, a rerun keeps the finished rows and images and
    generates only the rest; its table equals an uninterrupted evaluation's. A changed setting makes
    new images; the old rows stay."""
    import dreambooth_kit.inference.generate as inference

    run, prompts = run_with_checkpoints
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    for d in (whole, resumed):
        shutil.copytree(run, d, ignore=shutil.ignore_patterns("eval"))
    overrides = eval_overrides(encoders_dir, prompts)
    ev.evaluate(whole, overrides=overrides)
    real, calls = inference.generate, {"n": 0}

    def dies_on_the_5th(*a, **k):  # one call per prompt: base has 3, step-000001's 2nd is the 5th
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(inference, "generate", dies_on_the_5th)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(resumed, overrides=overrides)
    monkeypatch.setattr(inference, "generate", real)
    images = resumed / "eval" / "images"
    assert not list(images.glob("*/.*"))  # no partial file
    assert len(list(images.glob("*/*.png"))) == 6 + 2  # base's 6, and 2 of step-000001's
    assert [r["checkpoint"] for r in ev.read_rows(resumed / "eval" / "metrics.csv")] == ["base"]
    r = ev.evaluate(resumed, overrides=overrides)
    assert (r.made, r.reused) == (4 + 6, 2)  # base's row came from metrics.csv, its images unread
    assert (resumed / "eval" / "metrics.csv").read_text() == (whole / "eval" / "metrics.csv").read_text()
    again = ev.evaluate(resumed, overrides=overrides)
    assert (again.made, again.reused, again.cached_rows) == (0, 0, 3)  # every row from metrics.csv
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    for p in sorted((run.parent / "photos").glob("*.jpg"))[:2]:
        shutil.copy(p, fewer)
    other = ev.evaluate(resumed, photos=fewer, overrides=overrides)
    assert (other.made, other.cached_rows) == (0, 0)  # other photos: scored again, on the same images
    changed = ev.evaluate(resumed, overrides=[*overrides, "evaluate.steps=3"])
    assert changed.made == 3 * 6
    assert len(ev.read_rows(resumed / "eval" / "metrics.csv")) == 9  # rows of all three settings kept


def test_evaluate_refuses_what_it_cannot_score(run_with_checkpoints, encoders_dir, tmp_path):
    run, prompts = run_with_checkpoints
    with pytest.raises(scoring.EvaluateError, match="not a training run"):
        ev.evaluate(tmp_path)
    with pytest.raises(scoring.EvaluateError, match="step-000009.*it has step-000001, step-000002"):
        ev.evaluate(run, checkpoints="step-000009", overrides=eval_overrides(encoders_dir, prompts))
    with pytest.raises(scoring.EvaluateError, match="--photos"):
        ev.evaluate(run, photos=tmp_path / "gone", overrides=eval_overrides(encoders_dir, prompts))


def test_cli_prints_the_table_and_the_best(run_with_checkpoints, encoders_dir, capsys, tmp_path):
    from dreambooth_kit.cli import main

    run, prompts = run_with_checkpoints
    # A copy without eval/: other tests' scores there would be reused, with no images to make.
    run = shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("eval"))
    assert main(["evaluate", "--run", str(run), *eval_overrides(encoders_dir, prompts)]) == 0
    printed = capsys.readouterr()
    out = printed.out
    assert "step-000002" in out and "best: " in out and "metrics.csv" in out
    assert "evaluate step-000002: 100%" in printed.err  # a progress bar per checkpoint
    code = main(["evaluate", "--run", str(run), "evaluate.subject_encoder=facebook/dino-vits16"])
    assert code == 2 and "hf download facebook/dino-vits16" in capsys.readouterr().err


# ------------------------------------------------------------------ validation.metrics


def test_validation_metrics_are_evaluates_numbers_logged_during_training(
    tmp_path, tiny_model, photos, encoders_dir
):
    """Each validation step logs eval/<metric> scalars to TensorBoard and a csv row; the numbers
    equal what evaluate computes afterwards for the checkpoint of that step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dreambooth_kit.training.train import train

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of {subject}\n")
    over = dict(o.split("=", 1) for o in eval_overrides(encoders_dir, prompts))
    over |= {
        "train.max_steps": 2, "train.learning_rate": 1e-2, "validation.every_steps": 2,
        "validation.metrics": True, "validation.num_images": 1, "validation.steps": 2,
        "train.report_to": "tensorboard", "checkpoint.every_steps": 2, "adapter.init_lora_weights": False,
    }  # fmt: skip
    cfg = tiny_cfg(tmp_path, tiny_model, photos, **over)
    result = train(cfg)
    run = tmp_path / "run"
    lines = (run / "eval" / "validation_metrics.csv").read_text().splitlines()
    assert lines[0].startswith("step,subject_fidelity") and len(lines) == 2
    events = [EventAccumulator(str(p.parent)).Reload() for p in run.glob("logs/**/events.out.tfevents.*")]
    tags = {t for e in events for t in e.Tags()["scalars"]}
    assert {"eval/subject_fidelity", "eval/pres", "eval/div", "eval/clip_i", "eval/prompt_fidelity"} <= tags
    during = dict(zip(lines[0].split(","), lines[1].split(","), strict=True))
    base, after = ev.evaluate(run, checkpoints="step-000002").rows
    metrics = ("subject_fidelity", "clip_i", "prompt_fidelity", "pres", "div")
    for m in metrics:  # measured: equal in all 4 decimals
        assert float(during[m]) == pytest.approx(after[m], abs=1e-4)
    # ...and they are the LoRA's numbers, not the base model's (measured: DIV 0.013 vs 0.022).
    assert max(abs(base[m] - after[m]) for m in metrics) > 5e-3
    # Scoring leaves training as it found it: the same losses as a run without validation.
    plain = {k: v for k, v in over.items() if not k.startswith("validation.")}
    plain["train.output_dir"] = str(tmp_path / "plain")
    assert train(tiny_cfg(tmp_path, tiny_model, photos, **plain)).losses == result.losses


def test_full_fine_tune_checkpoints_are_scored_with_their_weights(tmp_path, tiny_model, photos, encoders_dir):
    """A full fine-tune's checkpoints hold accelerate's model file (the whole UNet): evaluate loads it
    into the base pipeline, so a checkpoint's images differ from the base model's; the final
    pipeline is scored too when no checkpoint has its step."""
    from dreambooth_kit.training.train import train

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of {subject}\n")
    over = {"adapter.type": "full", "train.max_steps": 2, "train.learning_rate": 1e-3,
            "checkpoint.every_steps": 1, "checkpoint.keep_last": 1}  # fmt: skip
    train(tiny_cfg(tmp_path, tiny_model, photos, **over))
    run = tmp_path / "run"
    r = ev.evaluate(run, overrides=eval_overrides(encoders_dir, prompts))
    assert [x["checkpoint"] for x in r.rows] == ["base", "step-000002"]
    base, step2 = (next((run / "eval" / "images").glob(f"{n}-*")) for n in ("base", "step-000002"))
    assert all(p.read_bytes() != (step2 / p.name).read_bytes() for p in base.glob("*.png"))
    assert "best_lora" not in r.files  # a full fine-tune's result is its pipeline folder
    # A checkpoint without its weights file is refused, never scored as the base model.
    (run / "checkpoints" / "step-000002" / "model.safetensors").rename(tmp_path / "moved.safetensors")
    with pytest.raises(scoring.EvaluateError, match="step-000002 holds no model.safetensors"):
        ev.evaluate(run, overrides=eval_overrides(encoders_dir, prompts))
    shutil.rmtree(run / "checkpoints")
    (final,) = [
        x for x in ev.evaluate(run, overrides=eval_overrides(encoders_dir, prompts)).rows if x["step"]
    ]
    assert final["checkpoint"] == "final" and final["step"] == 2
    # The final pipeline is the step-2 weights (saved fp32): the same images, the same numbers.
    assert final["subject_fidelity"] == pytest.approx(r.rows[1]["subject_fidelity"], abs=2e-4)


def test_training_with_toy_judge_metrics_on_other_photos_refuses_before_writing(tmp_path, tiny_model, photos):
    """validation.metrics uses evaluate's scorer: the same refusal, before the run writes anything."""
    from dreambooth_kit.training.train import train

    cfg = tiny_cfg(
        tmp_path, tiny_model, photos,
        **{"validation.metrics": True, "validation.every_steps": 1,
           "evaluate.subject_encoder": "toy-judge", "evaluate.prompt_encoder": "toy-judge"},
    )  # fmt: skip
    with pytest.raises(scoring.UnjudgeablePhotos, match=str(photos)):
        train(cfg)
    assert not (tmp_path / "run" / "config.yaml").exists()
    assert not (tmp_path / "class_images").exists()

"""DreamBooth's claims, asserted in the toy world with margins (a shortened run of configs/toy.yaml).

The pretrained toy model has a real prior: it draws "a ball" as a plain ball of a world colour. After
LoRA training on the five photos of the two-tone "zwx ball": the subject is learned (the detector's
subject rate far above the base model's), it is bound to the identifier ("a photo of a
ball" mostly stays a plain ball with prior preservation), prior preservation lowers class-prompt
drift compared to training without it, and the subject follows the prompt into new backgrounds.
Each assertion states a direction and a margin measured below the observed numbers; a flipped loss
target, a prior loss on the instance half or a missing latent scaling factor make them fail.
"""

from __future__ import annotations

import pytest

from dreambooth_kit.toy import world

# Shortened from configs/toy.yaml (800 steps at 1e-3): 400 steps at 3e-3 learn the subject about as
# well in half the time (measured: subject rate 1.0, on a new background 1.0, like 800 steps at 1e-3).
STEPS = 400
LEARNING_RATE = 3e-3
PER_PROMPT = 8
CHECKPOINT_EVERY = 200  # for `evaluate --checkpoints all`: the base model, step 200 and step 400

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def scores(tmp_path_factory):
    from dreambooth_kit.config import TOY_MODEL, load_config
    from dreambooth_kit.toy.evaluate import score
    from dreambooth_kit.toy.judge import Judge
    from dreambooth_kit.training.train import train

    out = tmp_path_factory.mktemp("toy-dreambooth")
    world.write_subject_photos(out / "photos")
    judge = Judge.load()
    common = {
        "data.instance_dir": str(out / "photos"),
        "prior.class_dir": str(out / "class_images"),
        "prior.num_class_images": 25,
        "train.max_steps": STEPS,
        "train.learning_rate": LEARNING_RATE,
    }
    runs = {}
    for name, prior in (("prior", True), ("no_prior", False)):
        cfg = load_config(
            "toy.yaml",
            {**common, "train.output_dir": str(out / name), "prior.with_prior_preservation": prior,
             "checkpoint.every_steps": CHECKPOINT_EVERY, "checkpoint.keep_last": None},
        )  # fmt: skip
        runs[name] = train(cfg).lora_dir
    result = {"base": score(TOY_MODEL, judge=judge, per_prompt=PER_PROMPT)}
    for name, lora in runs.items():
        result[name] = score(TOY_MODEL, lora=lora, judge=judge, per_prompt=PER_PROMPT)
    print({k: v.__dict__ for k, v in result.items()})  # shown with -s: the numbers behind the margins
    result["runs"] = {name: lora.parent for name, lora in runs.items()}
    return result


def test_the_subject_is_learned(scores):
    """The detector finds the subject in the tuned model's "zwx ball" samples, never in the base
    model's. (The judge-feature cosine does not separate them: see the README's "Does it learn?")"""
    base, tuned = scores["base"], scores["prior"]
    assert base.subject_rate <= 0.1
    assert tuned.subject_rate >= base.subject_rate + 0.4  # measured: 1.0 vs 0.0


def test_the_identifier_binds_the_subject_and_the_class_stays_itself(scores):
    """With prior preservation, "a photo of a ball" stays a plain ball while "zwx ball" is the subject."""
    tuned = scores["prior"]
    assert tuned.subject_rate >= tuned.class_subject_rate + 0.4
    assert tuned.class_correct >= 0.8


def test_prior_preservation_lowers_class_prompt_drift(scores):
    """Without prior preservation "a photo of a ball" turns into the subject (measured: 8 of 8
    samples); with it, none does. Read by the detector; PRES (the judge-feature cosine to the photos)
    shows it too, with a smaller gap (measured: 0.82 vs 0.59)."""
    assert scores["no_prior"].class_subject_rate >= scores["prior"].class_subject_rate + 0.4


def test_the_subject_follows_the_prompt_into_new_backgrounds(scores):
    """For "a photo of zwx ball on a X background": background X, and the subject on it."""
    tuned = scores["prior"]
    assert tuned.context_background >= 0.5  # chance is 0.25 (four backgrounds); base: 1.0
    assert tuned.context_subject_rate >= scores["base"].context_subject_rate + 0.4  # measured: 1.0 vs 0.0


def test_evaluate_names_a_best_checkpoint_within_tolerance_and_its_numbers_mean_something(scores):
    """`evaluate --checkpoints all` on the prior run (checkpoints at 200 and 400 steps), scored by
    the toy judge (configs/toy.yaml's evaluate section): the table, report and plot are written,
    the trained checkpoints draw the subject where the base model never does, and the best
    checkpoint's subject fidelity and PRES are both within the documented tolerance (0.02, or twice
    the standard error of the gap) of the best seen."""
    from dreambooth_kit.evaluation.evaluate import best_checkpoint, evaluate

    run = scores["runs"]["prior"]
    r = evaluate(run, checkpoints="all", seeds=2, overrides=["evaluate.class_images=8"])
    print(r.rows, r.best["checkpoint"], r.reason)
    assert [x["checkpoint"] for x in r.rows] == ["base", "step-000200", "step-000400"]
    base, trained = r.rows[0], r.rows[1:]
    for x in trained:
        assert x["subject_rate"] >= base["subject_rate"] + 0.4  # measured: 1.0 vs 0.0
        assert x["subject_fidelity"] >= base["subject_fidelity"] + 0.05  # measured: ~0.78 vs 0.60
        assert x["prompt_fidelity"] >= 0.5  # the prompted background; chance is 0.25
    best = r.best
    assert best["checkpoint"] != "base" and "within noise of both" in r.reason
    top = max(trained, key=lambda x: x["subject_fidelity"])
    low = min(trained, key=lambda x: x["pres"])

    def value(row: dict, metric: str) -> float:  # the rule: PRES below the base model's counts as the base's
        return max(row["pres"], base["pres"]) if metric == "pres" else row[metric]

    for metric, ref in (("subject_fidelity", top), ("pres", low)):
        noise = 2 * (best[metric + "_se"] ** 2 + ref[metric + "_se"] ** 2) ** 0.5
        assert abs(value(best, metric) - value(ref, metric)) <= max(0.02, noise) + 1e-9
    assert best_checkpoint(r.rows, 0.02)[0] is best
    for name in ("metrics.csv", "report.md", "metrics.png", "best-lora/pytorch_lora_weights.safetensors"):
        assert (run / "eval" / name).is_file()


# ------------------------------------------------------------------ measures that cannot flatter


def test_the_whole_subject_is_learned_by_the_worlds_own_rules(scores):
    """The strict detector (cyan, white band, magenta, in order: toy/rules.py, no learned judge) finds
    the subject in the tuned model's samples, never in the base model's."""
    base, tuned = scores["base"], scores["prior"]
    assert base.subject_rate_strict == 0.0
    assert tuned.subject_rate_strict >= 0.5  # see the README's quality table for the measured rates


def test_prior_preservation_keeps_plain_balls_of_the_class(scores):
    """'a ball' samples that are plain balls (a ball, and the subject by neither detector): what class
    preservation means. 'a ball is a ball' alone counts the subject too."""
    assert scores["prior"].class_plain >= 0.8
    assert scores["prior"].class_plain >= scores["no_prior"].class_plain + 0.4


def test_the_subject_goes_to_a_background_none_of_its_photos_shows(scores):
    """None of the five photos shows the gray background: a prompt for it is a new context. This run
    (one training seed) measured 0.875 and 0.875; over 3 training seeds of the full recipe the table in
    the README reads 0.42 +- 0.41 and 0.42 +- 0.42 for LoRA + prior. So this guards this
    training seed's result, not the general claim."""
    tuned, base = scores["prior"], scores["base"]
    assert tuned.new_context_background >= 0.5  # chance 0.25
    assert tuned.new_context_subject_rate >= base.new_context_subject_rate + 0.4


def test_guidance_reaches_the_sampler():
    """Classifier-free guidance must change the samples: without it the toy model still follows
    the prompt (background 1.0 at guidance 1 and 4), so the quality numbers alone passed with guidance
    ignored. Measured on the base model, 'a photo of a ball', 16 samples: DIV 0.37 at guidance 1,
    0.20 at guidance 4 (guidance pulls samples to the prompt's mode); with guidance ignored in
    generate(), 0.37 at both."""
    from dreambooth_kit.config import TOY_MODEL
    from dreambooth_kit.evaluation.metrics import diversity
    from dreambooth_kit.toy.evaluate import CLASS_PROMPT
    from dreambooth_kit.toy.judge import Judge
    from dreambooth_kit.toy.model import sample

    judge = Judge.load()
    div = {
        g: diversity(judge.features, sample(TOY_MODEL, [CLASS_PROMPT], per_combo=16, seed=500, guidance=g))
        for g in (1.0, 4.0)
    }
    assert div[1.0] >= div[4.0] + 0.08, div


def test_class_images_are_the_base_models_samples_of_the_class_prompt(scores):
    """Prior preservation's images must be drawn from the class prompt. The quality numbers cannot
    tell: the base model draws a plain ball for 'a photo of zwx ball' too (it never saw the
    identifier), so with the instance prompt in its place every quality test above still passed.
    Here each class image is compared with the base model's sample of the class prompt at the
    image's own seed (within 2/255: batched UNet calls round differently from single ones) and must
    differ from the instance prompt's sample at that seed (measured: mean difference 10-68/255; with
    the instance prompt in class_image_spec the first image was 147/255 off the class prompt's)."""
    import numpy as np
    from PIL import Image

    from dreambooth_kit.config import TOY_MODEL, load_config
    from dreambooth_kit.data.prior import read_manifest
    from dreambooth_kit.inference.generate import generate
    from dreambooth_kit.inference.pipeline import load_pipeline

    cfg = load_config("toy.yaml")
    folder = scores["runs"]["prior"].parent / "class_images"
    seeds = dict(list(sorted(read_manifest(folder)["images"].items()))[:4])
    pipe = load_pipeline(TOY_MODEL, device="cpu", dtype="float32")
    size = cfg.data.resolution
    kw = {
        "steps": cfg.prior.sample_steps,
        "guidance_scale": cfg.prior.guidance_scale,
        "height": size,
        "width": size,
    }

    def pixels(img) -> np.ndarray:
        return np.asarray(img.convert("RGB"), dtype=int)

    made = {
        p: generate(pipe, p, seeds=list(seeds.values()), **kw)
        for p in (cfg.prior.class_prompt, cfg.data.instance_prompt)
    }
    for i, name in enumerate(seeds):
        with Image.open(folder / name) as im:
            have = pixels(im)
        same = np.abs(have - pixels(made[cfg.prior.class_prompt][i].image)).max()
        other = np.abs(have - pixels(made[cfg.data.instance_prompt][i].image)).mean()
        print(name, same, other)
        assert same <= 2, name
        assert other > 5, name

"""train.ema: the moving average of the trained weights, in the run's result, its checkpoints,
resume and evaluate."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_cfg
from safetensors.torch import load_file

from dreambooth_kit.training.ema import TrainedEMA
from dreambooth_kit.training.train import train


def _decay(n: int, cap: float) -> float:
    """diffusers' EMAModel at optimizer step n: step 1 copies, then min(cap, n / (n + 9))."""
    return 0.0 if n == 1 else min(cap, n / (n + 9))


def test_the_average_after_each_step_is_the_decay_weighted_mean():
    layer = torch.nn.Linear(3, 2)
    params = list(layer.parameters())
    ema = TrainedEMA(params, decay=0.1)  # the cap binds from step 2 on (2/11 > 0.1)
    seen = []
    for value in (1.0, 3.0, -2.0):
        with torch.no_grad():
            for p in params:
                p.fill_(value)
        ema.update()
        seen.append(value)
    expect = seen[0]
    for n, w in enumerate(seen[1:], start=2):
        expect = _decay(n, 0.1) * expect + (1 - _decay(n, 0.1)) * w
    raw = [p.detach().clone() for p in params]
    with ema.swapped_in():
        assert all(torch.allclose(p, torch.full_like(p, expect)) for p in params)
    assert all(torch.equal(p, r) for p, r in zip(params, raw, strict=True))  # the raw weights, bit for bit
    assert ema.steps == 3


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory, tiny_model):
    from conftest import train_tiny

    tmp = tmp_path_factory.mktemp("ema")
    overrides = {"train.ema": True, "train.ema_decay": 0.2, "train.max_steps": 4, "train.learning_rate": 1e-2,
                 "checkpoint.every_steps": 1, "checkpoint.keep_last": None}  # fmt: skip
    result = train_tiny(tmp, tiny_model, **overrides)
    return tmp, tmp / "photos", tiny_cfg(tmp, tiny_model, tmp / "photos", **overrides), result


def test_the_runs_average_is_saved_beside_the_lora_and_is_the_average_of_its_steps(ema_run):
    """Each step's raw LoRA is in its checkpoint: the average of those, by the rule above, is what
    lora_ema/ and the last checkpoint's ema/ hold; it differs from the raw LoRA."""
    from dreambooth_kit.training.checkpoint_index import LORA_SUFFIX

    tmp, _, cfg, result = ema_run
    steps = [
        load_file(result.output_dir / f"checkpoints/step-{n:06d}/unet{LORA_SUFFIX}") for n in (1, 2, 3, 4)
    ]
    expect = dict(steps[0])
    for n, raw in enumerate(steps[1:], start=2):
        d = _decay(n, 0.2)
        expect = {k: d * expect[k] + (1 - d) * raw[k] for k in expect}
    in_checkpoint = load_file(result.output_dir / f"checkpoints/step-000004/ema/unet{LORA_SUFFIX}")
    assert in_checkpoint.keys() == expect.keys()
    for k in expect:
        torch.testing.assert_close(in_checkpoint[k], expect[k], rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(in_checkpoint[k], steps[-1][k]) for k in expect)
    lora, averaged = (
        load_file(result.output_dir / d / "pytorch_lora_weights.safetensors") for d in ("lora", "lora_ema")
    )
    assert lora.keys() == averaged.keys()
    assert any(not torch.equal(lora[k], averaged[k]) for k in lora)


def test_plain_diffusers_loads_the_average_and_it_draws_other_pixels(ema_run, tiny_model):
    import numpy as np
    from diffusers import StableDiffusionPipeline

    _, _, _, result = ema_run
    images = {}
    for name in ("lora", "lora_ema"):
        pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
        pipe.load_lora_weights(result.output_dir / name)
        g = torch.Generator().manual_seed(0)
        images[name] = pipe(
            "a photo of zwx toy", num_inference_steps=2, generator=g, output_type="np"
        ).images[0]
    assert np.abs(images["lora"] - images["lora_ema"]).max() > 1e-4


def test_a_resumed_run_has_the_same_average(ema_run):
    """Resumed from step 2's checkpoint (into another folder), the average after step 4 is the
    uninterrupted run's, bit for bit."""
    tmp, photos, cfg, result = ema_run
    again = tiny_cfg(
        tmp, cfg.model.pretrained, photos,
        **{"train.ema": True, "train.ema_decay": 0.2, "train.max_steps": 4, "train.learning_rate": 1e-2,
           "train.output_dir": str(tmp / "resumed"), "train.resume": str(result.output_dir / "checkpoints/step-000002")},
    )  # fmt: skip
    resumed = train(again)
    for name in ("lora", "lora_ema"):
        a, b = (
            load_file(r.output_dir / name / "pytorch_lora_weights.safetensors") for r in (result, resumed)
        )
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_turning_ema_off_on_resume_is_refused_naming_the_field(ema_run, tiny_model):
    from dreambooth_kit.training.checkpoint_index import CheckpointError

    tmp, photos, cfg, result = ema_run
    again = tiny_cfg(
        tmp, tiny_model, photos,
        **{"train.ema": False, "train.max_steps": 4, "train.learning_rate": 1e-2,
           "train.output_dir": str(tmp / "refused"), "train.resume": str(result.output_dir / "checkpoints/step-000002")},
    )  # fmt: skip
    with pytest.raises(CheckpointError, match="train.ema: True in the checkpoint, False now"):
        train(again)


def test_evaluate_scores_the_average_as_targets_of_their_own(ema_run):
    from dreambooth_kit.evaluation.evaluate import list_targets

    _, _, cfg, result = ema_run
    targets = list_targets(result.output_dir, "all", adapter_type="lora", max_steps=4, base=False)
    names = [t.name for t in targets]
    assert names == [f"step-00000{n}{s}" for n in (1, 2, 3, 4) for s in ("", "-ema")]
    assert targets[-1].path == result.output_dir / "checkpoints/step-000004/ema"


def test_a_decay_out_of_range_is_refused_naming_the_field(tmp_path):
    from dreambooth_kit.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"train.ema_decay: 1.0 must be in \(0, 1\)"):
        load_config("tiny.yaml", {"train.ema": True, "train.ema_decay": 1.0})


def test_a_full_fine_tune_saves_its_average_as_a_pipeline_beside_its_own(tmp_path, tiny_model, photos):
    from diffusers import StableDiffusionPipeline

    cfg = tiny_cfg(
        tmp_path, tiny_model, photos,
        **{"adapter.type": "full", "train.ema": True, "train.ema_decay": 0.5, "train.max_steps": 3,
           "train.learning_rate": 1e-3, "checkpoint.every_steps": 3},
    )  # fmt: skip
    result = train(cfg)
    raw, averaged = (
        StableDiffusionPipeline.from_pretrained(
            result.output_dir / name, safety_checker=None
        ).unet.state_dict()
        for name in ("pipeline", "pipeline_ema")
    )
    assert raw.keys() == averaged.keys() and any(not torch.equal(raw[k], averaged[k]) for k in raw)
    assert (result.output_dir / "checkpoints/step-000003/ema/model.safetensors").is_file()


def test_the_plot_draws_the_average_as_a_line_of_its_own(tmp_path, monkeypatch):
    """Rows of step-N and step-N-ema: two lines (raw and EMA), each from the base model at step 0."""
    import matplotlib.pyplot as plt

    from dreambooth_kit.evaluation.evaluate import plot
    from dreambooth_kit.evaluation.scoring import METRICS

    rows = [
        {"checkpoint": name, "step": step, **dict.fromkeys(METRICS), "subject_fidelity": v}
        for name, step, v in (("base", 0, 0.1), ("step-000002", 2, 0.5), ("step-000002-ema", 2, 0.4))
    ]
    lines = []
    real = plt.Axes.plot

    def spy(self, xs, ys, **kw):
        lines.append((list(xs), list(ys), kw.get("label")))
        return real(self, xs, ys, **kw)

    monkeypatch.setattr(plt.Axes, "plot", spy)
    plot(rows, tmp_path / "m.png")
    assert lines == [([0, 2], [0.1, 0.5], "raw"), ([0, 2], [0.1, 0.4], "EMA")]

"""The training loop on the tiny model: which optimizer steps are applied or skipped, and what the
warnings say about a skipped one."""

from __future__ import annotations

import logging
import math

from conftest import patch_diffusion_loss, tiny_cfg

# Two micro-batches per optimizer step: step k is diffusion_loss calls 2k-1 and 2k for k = 1, 2.
# Batch size 1 and five photos: the epoch's fifth batch is step 3 alone (accelerate ends an
# accumulation window at the end of the dataloader).
ACCUMULATE = {"train.gradient_accumulation_steps": 2, "train.max_steps": 3}


def _nan_at_call(monkeypatch, call: int) -> None:
    patch_diffusion_loss(monkeypatch, lambda n, loss: loss * float("nan") if n == call else loss)


def test_nan_loss_in_an_earlier_micro_batch_is_reported_as_a_non_finite_loss(
    tmp_path, tiny_model, photos, monkeypatch, caplog
):
    """A NaN loss in the first micro-batch of step 2 skips step 2 and is named as a non-finite loss
    in that micro-batch. (It was reported as a non-finite gradient: the step was skipped at the
    second micro-batch, whose own loss was finite.)"""
    from dreambooth_kit.training.train import train

    _nan_at_call(monkeypatch, 3)
    with caplog.at_level(logging.WARNING, logger="dreambooth_kit"):
        r = train(tiny_cfg(tmp_path, tiny_model, photos, **ACCUMULATE))
    assert r.skipped_steps == [2] and r.steps == 3
    assert "non-finite loss in micro-batch 1 of 2 at step 2: step skipped (1 in a row)" in caplog.text
    assert "non-finite gradient" not in caplog.text
    # The step's loss is not finite, whichever micro-batch it was in.
    assert math.isnan(r.losses[1]) and math.isfinite(r.losses[0]) and math.isfinite(r.losses[2])


def test_each_micro_batch_returns_its_outcome(tmp_path, tiny_model, photos, monkeypatch, caplog):
    """A NaN loss in the window's last micro-batch: the step reports NONFINITE_LOSS (micro-batch 2
    of 2), the other optimizer steps APPLIED (step 3 is the epoch's last, one-batch window), the
    micro-batches before them ACCUMULATING."""
    import dreambooth_kit.training.loop as loop_mod
    from dreambooth_kit.training.loop import StepOutcome
    from dreambooth_kit.training.train import train

    outcomes = []
    real_step = loop_mod._step

    def spy(*a, **k):
        result = real_step(*a, **k)
        outcomes.append(result.outcome)
        return result

    monkeypatch.setattr(loop_mod, "_step", spy)
    _nan_at_call(monkeypatch, 4)
    with caplog.at_level(logging.WARNING, logger="dreambooth_kit"):
        r = train(tiny_cfg(tmp_path, tiny_model, photos, **ACCUMULATE))
    A, OK, NAN = StepOutcome.ACCUMULATING, StepOutcome.APPLIED, StepOutcome.NONFINITE_LOSS
    assert outcomes == [A, OK, A, NAN, OK]
    assert r.skipped_steps == [2]
    assert "non-finite loss in micro-batch 2 of 2 at step 2" in caplog.text
    assert not any(o.skipped for o in (A, OK)) and all(
        o.skipped for o in (NAN, StepOutcome.NONFINITE_GRADIENT, StepOutcome.SCALER_SKIP)
    )


def test_batch_rows_place_each_process_in_the_one_process_batch():
    """Process r of n at batch b holds instance rows r*b.. and class rows n*b + r*b.. of the batch one
    process at n*b would hold; its draws are those rows of one draw for all (and, alone, torch's own)."""
    import torch

    from dreambooth_kit.training.loop import BatchRows

    assert BatchRows.of(4, 2, 1, 2).rows.tolist() == [2, 3, 6, 7]  # 2 instances + 2 class rows each
    assert BatchRows.of(4, 2, 0, 2).rows.tolist() == [0, 1, 4, 5]
    torch.manual_seed(0)
    whole = torch.randn(8, 3)
    parts = []
    for rank in (0, 1):
        torch.manual_seed(0)  # every process holds the same RNG state
        parts.append(BatchRows.of(4, 2, rank, 2).randn((4, 3), "cpu"))
    assert torch.equal(torch.cat([parts[0][:2], parts[1][:2], parts[0][2:], parts[1][2:]]), whole)
    torch.manual_seed(1)
    alone = BatchRows.of(3, 3, 0, 1).randint(1000, "cpu")
    torch.manual_seed(1)
    assert torch.equal(alone, torch.randint(0, 1000, (3,)))


def test_every_step_is_one_line_of_progress_jsonl(trained_run):
    """A live view (the web UI) reads the run's progress from <run>/progress.jsonl, not from log text:
    one line per optimizer step with its loss, the step's seconds and the run's timeline id."""
    import json

    from dreambooth_kit.training.lineage import read_lineage
    from dreambooth_kit.training.loop import PROGRESS_FILE

    r = trained_run["result"]
    lines = [json.loads(x) for x in (r.output_dir / PROGRESS_FILE).read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3] and {x["max_steps"] for x in lines} == {3}
    assert [x["loss"] for x in lines] == r.losses
    assert all(x["seconds"] > 0 and x["time"] > 0 for x in lines)
    assert {x["lineage"] for x in lines} == {read_lineage(r.output_dir).id}

"""``train.stop: auto`` in the recipe: the stopper built from the config (resumed from a checkpoint's scores),
and at the end of a stopped run the best step's weights read back from its checkpoint and the decision
recorded in ``eval/auto_stop.json`` (the rule itself is stopping.py's)."""

from __future__ import annotations

import logging

from dreambooth_kit.config import DreamBoothConfig
from dreambooth_kit.training.build import restore_beside

log = logging.getLogger("dreambooth_kit")


def build_auto_stop(cfg: DreamBoothConfig, position: dict):
    """train.stop=auto: the rule, with the scores a resumed checkpoint carries."""
    if cfg.train.stop != "auto":
        return None
    from dreambooth_kit.training.stopping import AutoStop

    rows = [dict(r) for r in position.get("auto_stop", [])]
    return AutoStop(cfg.evaluate.tolerance, cfg.train.stop_patience, rows)


def keep_best(cfg: DreamBoothConfig, run, unet, text_encoder, ema, pivots) -> int | None:
    """train.stop=auto: the final output takes the best scored step's weights, read back from its
    checkpoint (after the last step's own checkpoint is written, so the run stays resumable where
    it ended); the decision is recorded in eval/auto_stop.json. Returns the best step."""
    if run.auto_stop is None:
        return None
    from dreambooth_kit.training.checkpoint_index import list_checkpoints
    from dreambooth_kit.training.checkpoints import load_checkpoint, save_step_checkpoint
    from dreambooth_kit.training.collective import agreed_decision

    decision = agreed_decision(run.accelerator, run.auto_stop)
    best = decision.best_step if decision is not None else None
    done = dict(list_checkpoints(run.out))
    if best is not None and best != run.step and best in done:
        if run.step not in done:
            save_step_checkpoint(run)
        # The resume's own loader: it knows where a LoRA, a full UNet or DeepSpeed's shards live. It
        # also restores the optimizer and RNG, unused now; force: a damaged RNG file is no reason
        # here to refuse the weights.
        state = load_checkpoint(run.accelerator, done[best], force=True)
        restore_beside(cfg, run.accelerator, unet, text_encoder, done[best], state, ema, pivots)
        log.info("train.stop=auto: the final weights are step %d's (%s)", best, done[best])
    elif best is not None and best != run.step:
        log.warning(
            "train.stop=auto: step %d scored best but its checkpoint was removed; keeping step %d's "
            "(checkpoint.keep_last=null keeps every scored step)",
            best, run.step,
        )  # fmt: skip
        best = run.step
    if run.accelerator.is_main_process:
        write_stop_record(cfg, run, decision, best)
    return best


def write_stop_record(cfg: DreamBoothConfig, run, decision, best: int | None) -> None:
    from dreambooth_kit.evaluation.scoring import EVAL
    from dreambooth_kit.training.stopping import STOP_FILE
    from dreambooth_kit.util.atomic import write_json

    record = {
        "max_steps": cfg.train.max_steps,
        "stopped_at": run.step if run.stopped is not None else None,
        "best_step": best,
        "why": decision.why if decision is not None else "",
        "scores": run.auto_stop.to_state(),
    }
    (run.out / EVAL).mkdir(parents=True, exist_ok=True)
    write_json(run.out / EVAL / STOP_FILE, record, indent=2)

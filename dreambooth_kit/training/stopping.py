"""``train.stop: auto``: training that stops at its best step.

Every ``validation.every_steps`` steps the run scores its current weights with evaluate's numbers
(``validation.metrics``' scorer: the toy judge, or DINO and CLIP) and applies evaluate's
best-checkpoint rule (:func:`~dreambooth_kit.evaluation.ranking.best_checkpoint`) to all the scores so far,
the base model's (step 0) included. When the best step has stayed the best through
``train.stop_patience`` scores after it, the run stops: later scores came no closer than
``evaluate.tolerance`` (or twice their noise) to the highest subject fidelity, or only with more
class drift (PRES) than the best. The final LoRA (or pipeline) holds the best step's weights, read
back from its checkpoint (every scored step is checkpointed, and the best is never pruned).

The scores travel in every checkpoint's ``state.json``, so a resumed run decides exactly as the
uninterrupted one: the training up to a step is the same bit for bit, and so are its scores (the
images are drawn at fixed seeds).

Measured on the toy world (README, "Stopping at the best step"; 3 seeds): it saved no time there
(one evaluation of 36 images costs about 40 toy training steps) and, with prior preservation, kept
step 100's weights in 2 of 3 seeds (36 images give fidelity a standard error of 0.02-0.09, which the
rule allows for). So the default is "never".
"""

from __future__ import annotations

from dataclasses import dataclass, field

STOP_FILE = "auto_stop.json"  # in <run>/eval/: what the rule saw and decided


@dataclass(frozen=True)
class Decision:
    stop: bool
    best_step: int | None  # None: no step can be named best yet (see best_checkpoint)
    why: str


@dataclass
class AutoStop:
    """The scores of one run and the stopping rule over them."""

    tolerance: float  # evaluate.tolerance: the rule evaluate applies after the fact
    patience: int  # train.stop_patience: scores after the best before stopping
    rows: list[dict] = field(default_factory=list)  # one per scored step, step 0 = the base model

    def add(self, step: int, scores: dict) -> None:
        """The scores of the weights at ``step`` (0: the base model, before any training)."""
        name = "base" if step == 0 else f"step-{step:06d}"
        self.rows = [r for r in self.rows if r["step"] != step]  # a resumed run scores a step again
        self.rows.append({"checkpoint": name, "step": step, **scores})
        self.rows.sort(key=lambda r: r["step"])

    def decide(self) -> Decision:
        """Whether to stop now, and the best step by evaluate's rule."""
        from dreambooth_kit.evaluation.ranking import best_checkpoint

        best, why = best_checkpoint(self.rows, self.tolerance)
        if best is None:
            return Decision(False, None, why)
        after = [r["step"] for r in self.rows if r["step"] > best["step"]]
        if len(after) < self.patience:
            return Decision(False, best["step"], why)
        steps = ", ".join(str(s) for s in after)
        return Decision(
            True,
            best["step"],
            f"step {best['step']} has been the best through the {len(after)} scores after it "
            f"(steps {steps}; train.stop_patience={self.patience}): {why}",
        )

    def to_state(self) -> list[dict]:
        """What a checkpoint keeps (its ``state.json``), for an exact resume."""
        return [dict(r) for r in self.rows]

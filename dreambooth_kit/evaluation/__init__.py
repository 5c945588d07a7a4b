"""Which checkpoint is best: DreamBooth's metrics (subject fidelity, PRES, DIV, ...) for any image
encoder, the prompts drawn per checkpoint, and the best-checkpoint rule that ``evaluate`` and
``train.stop: auto`` share."""

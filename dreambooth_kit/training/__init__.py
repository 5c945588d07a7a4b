"""The training recipe and its parts. ``train.train`` reads the whole config and is the run's table of
contents; the parts it calls (loop, losses, adapters, checkpoints, outputs, validation, stopping, the
run folder's timeline) take explicit, typed arguments."""

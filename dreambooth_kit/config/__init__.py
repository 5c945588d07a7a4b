"""The typed, strict configuration of a run: the schema (``DreamBoothConfig`` and its sections), how
YAML files and ``section.key=value`` overrides become one (loading), and what is checked about the
values before anything runs (checks). The packaged configs (``tiny.yaml``, ``toy.yaml``, the SD 2.1
recipes) sit in ``presets/``.

Only the training recipe (``dreambooth_kit.training``) and the command line read a whole
``DreamBoothConfig``; every other component takes explicit, typed arguments."""

"""The typed, strict configuration of a run: the schema (``DreamBoothConfig`` and its sections), how
YAML files and ``section.key=value`` overrides become one (loading), and what is checked about the
values before anything runs (checks). The packaged configs (``tiny.yaml``, ``toy.yaml``, the SD 2.1
recipes) sit in ``presets/``.

Only the training recipe (``dreambooth_kit.training``) and the command line read a whole
``DreamBoothConfig``; every other component takes explicit, typed arguments."""

from dreambooth_kit.config.checks import mentions_identifier, validate
from dreambooth_kit.config.loading import (
    absolute_paths,
    load_config,
    packaged_configs,
    save_config,
    save_config_dict,
)
from dreambooth_kit.config.schema import (
    CONFIG_VERSION,
    DEMO_PHOTOS,
    MAX_SEED,
    TINY_MODEL,
    TOY_MODEL,
    AdapterConfig,
    CheckpointConfig,
    ConceptConfig,
    ConfigError,
    DataConfig,
    DreamBoothConfig,
    EvaluateConfig,
    ExportConfig,
    ModelConfig,
    PriorConfig,
    TrainConfig,
    ValidationConfig,
    concept_fields,
    concepts_of,
    validation_prompts,
)

__all__ = [
    "CONFIG_VERSION",
    "DEMO_PHOTOS",
    "MAX_SEED",
    "TINY_MODEL",
    "TOY_MODEL",
    "AdapterConfig",
    "CheckpointConfig",
    "ConceptConfig",
    "ConfigError",
    "DataConfig",
    "DreamBoothConfig",
    "EvaluateConfig",
    "ExportConfig",
    "ModelConfig",
    "PriorConfig",
    "TrainConfig",
    "ValidationConfig",
    "absolute_paths",
    "concept_fields",
    "concepts_of",
    "load_config",
    "mentions_identifier",
    "packaged_configs",
    "save_config",
    "save_config_dict",
    "validate",
    "validation_prompts",
]

"""The recipe's arguments for each component, read from the config once: the photo check's
(``PreflightSpec``), each subject's class images (``ClassImageSpec``) and what ``evaluate`` scores
(``EvalSpec``). The components own those types; only the recipe and the command line, which hold the
whole ``DreamBoothConfig``, build them."""

from __future__ import annotations

from pathlib import Path

from dreambooth_kit.config import ConceptConfig, ConfigError, DreamBoothConfig, concept_fields
from dreambooth_kit.data.class_store import ClassImageSpec
from dreambooth_kit.data.preflight import PreflightSpec
from dreambooth_kit.evaluation.spec import EvalSpec


def preflight_spec(cfg: DreamBoothConfig) -> PreflightSpec:
    return PreflightSpec(
        data=cfg.data,
        prior=cfg.prior,
        subjects=tuple((key or "data", c) for key, c in concept_fields(cfg)),
        output_dir=cfg.train.output_dir,
        native_resolution=cfg.model.native_resolution,
    )


def class_image_spec(cfg: DreamBoothConfig, concept: ConceptConfig, n_instance: int) -> ClassImageSpec:
    """:class:`ClassImageSpec` of one concept (``n_instance``: its photo count, for per-instance counts)."""
    from dreambooth_kit.data.class_store import store_root

    p = cfg.prior
    return ClassImageSpec(
        folder=Path(concept.class_dir),
        prompt=concept.class_prompt,
        count=concept.num_class_images or num_class_images(cfg, n_instance),
        negative_prompt=p.negative_prompt,
        steps=p.sample_steps,
        guidance_scale=p.guidance_scale,
        batch_size=p.sample_batch_size,
        size=cfg.data.resolution,
        seed=p.seed if p.seed is not None else cfg.train.seed,
        regenerate=p.regenerate,
        sampler=p.sampler,
        store=store_root(p.store),
    )


def num_class_images(cfg: DreamBoothConfig, n_instance: int) -> int:
    """The effective class-image count: ``class_images_per_instance`` x instances, else the fixed count."""
    if cfg.prior.class_images_per_instance is not None:
        return cfg.prior.class_images_per_instance * max(n_instance, 1)
    return cfg.prior.num_class_images


def eval_spec(cfg: DreamBoothConfig, concept: int = 0) -> EvalSpec:
    """The :class:`EvalSpec` of subject ``concept`` (0: the only one, or ``concepts[0]``). The class
    noun is ``evaluate.class_noun``, else the words after the identifier in the instance prompt
    ("a photo of zwx dog" -> "dog")."""
    fields = concept_fields(cfg)
    if not 0 <= concept < len(fields):
        raise ConfigError([f"evaluate: subject {concept} does not exist; this run has {len(fields)}"])
    where, c = fields[concept]
    key = where or "data"
    if not c.identifier:
        raise ConfigError(
            [
                f"{key}.identifier is not set: evaluate needs the rare word that names the subject "
                f"(e.g. 'zwx' in {c.instance_prompt!r}); set it in the config or with {key}.identifier=..."
            ]
        )
    noun = cfg.evaluate.class_noun
    if not noun:
        words = c.instance_prompt.split()
        lowered = [w.lower().strip(",.") for w in words]
        after = words[lowered.index(c.identifier.lower()) + 1 :] if c.identifier.lower() in lowered else []
        noun = " ".join(after).strip(" ,.")
    if not noun:
        raise ConfigError(
            [
                f"evaluate: no class word follows {c.identifier!r} in {key}.instance_prompt "
                f"{c.instance_prompt!r}; set evaluate.class_noun (e.g. evaluate.class_noun=dog)"
            ]
        )
    return EvalSpec(
        settings=cfg.evaluate,
        identifier=c.identifier,
        class_noun=noun,
        class_prompt=c.class_prompt or f"a photo of a {noun}",
        photos=Path(c.instance_dir),
        resolution=cfg.data.resolution,
    )

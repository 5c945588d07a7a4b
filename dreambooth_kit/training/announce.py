"""What a run tells its user before and after the long work: the plan (model, photos, class images,
steps, device, buckets) and the summary (where everything went), as log lines."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from dreambooth_kit.config import DreamBoothConfig, absolute_paths

log = logging.getLogger("dreambooth_kit")


def announce_plan(
    cfg: DreamBoothConfig, out: Path, report, source, accelerator, resume_from: Path | None
) -> None:
    """The run's plan, before the long work (class images, training): what a user checks first."""
    if not accelerator.is_main_process:
        return
    from dreambooth_kit.config import concepts_of
    from dreambooth_kit.training.plan import class_image_spec
    from dreambooth_kit.training.runreport import Plan, plan_text

    concepts = list(zip(concepts_of(cfg), report.reports, strict=True))
    photos = sum(len(r.images) for _, r in concepts)
    a, t, pr = cfg.adapter, cfg.train, cfg.prior
    prior = "class images" if pr.with_prior_preservation else "off"
    if prior == "class images" and pr.mode == "teacher":
        prior = "teacher (the frozen base model's predictions; no class images)"
    parts = "UNet + text encoder" if a.train_text_encoder else "UNet"
    plan = Plan(
        model=_model_line(cfg.model.pretrained, str(source.location), source.prediction_type),
        photos=photos,
        photo_dir=", ".join(str(Path(c.instance_dir).resolve()) for c, _ in concepts),
        instance_prompt=concepts[0][0].instance_prompt,
        resolution=cfg.data.resolution,
        class_images=sum(class_image_spec(cfg, c, len(r.images)).count for c, r in concepts),
        class_prompt=concepts[0][0].class_prompt,
        class_dir=", ".join(sorted({str(Path(c.class_dir).resolve()) for c, _ in concepts})),
        prior=prior,
        adapter=f"{_ADAPTER_NAMES[a.type]} rank {a.rank} ({parts})"
        if a.is_adapter
        else f"full fine-tune ({parts})",
        steps=t.max_steps,
        resume_from=resume_from.name if resume_from else None,
        batch_size=t.batch_size,
        accumulation=t.gradient_accumulation_steps,
        processes=accelerator.num_processes,
        device=_device_name(accelerator.device),
        precision=t.mixed_precision if t.mixed_precision != "no" else "fp32",
        checkpoint_every=cfg.checkpoint.every_steps,
        validation_every=cfg.validation.every_steps,
        output_dir=str(out),
        buckets=_bucket_line([b for _, r in concepts for b in r.buckets.values()]),
    )
    log.info("%s", plan_text(plan))


def _bucket_line(buckets: list[tuple[int, int]]) -> str | None:
    """data.buckets: "3 at 512x512, 2 at 640x384" (None without buckets)."""
    if not buckets:
        return None
    counts = {b: buckets.count(b) for b in sorted(set(buckets))}
    return "buckets: " + ", ".join(f"{n} at {w}x{h}" for (w, h), n in counts.items())


def _model_line(asked: str, location: str, prediction_type: str | None) -> str:
    where = "" if asked == location else f" at {location}"
    return f"{asked}{where} ({prediction_type or 'prediction type from its scheduler'})"


def _device_name(device) -> str:
    if getattr(device, "type", "") == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def announce_summary(cfg: DreamBoothConfig, out: Path, final_dir: Path, run, seconds: float, exports) -> None:
    """Where everything went and what to run next (absolute paths: they work from any folder)."""
    from dreambooth_kit.config import concepts_of
    from dreambooth_kit.training.runreport import Outcome, summary_text

    outcome = Outcome(
        output_dir=out.resolve(),
        final_dir=final_dir.resolve(),
        kind=cfg.adapter.type,
        model=absolute_paths(cfg).model.pretrained,
        prompt=concepts_of(cfg)[0].instance_prompt,
        seed=cfg.validation.seed,
        steps=run.step,
        seconds=seconds,
        losses=run.losses,
        exports=[Path(p).resolve() for p in exports],
    )
    log.info("%s", summary_text(outcome))


_ADAPTER_NAMES = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}

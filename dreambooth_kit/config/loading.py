"""Loading a config: YAML files (duplicate keys refused), dotted ``section.key=value`` overrides, coercion of
YAML strings to the schema's types, every problem reported at once, and path settings read one way.

Stdlib dataclasses + PyYAML instead of pydantic/omegaconf: the schema is small, and we need two
behaviours those libraries do not give together out of the box: the closest valid name suggested for
an unknown key, and coercion of YAML strings such as ``1e-4`` (PyYAML 1.1 reads it as a *string*).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from dreambooth_kit.config.checks import validate
from dreambooth_kit.config.schema import DEMO_PHOTOS, ConfigError, DreamBoothConfig


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Coerce ``value`` to the annotated type ``tp``; raise ValueError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, typing.get_args(tp), where)
    if origin is Literal:
        return _coerce_literal(value, typing.get_args(tp), where)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    scalar = {bool: _coerce_bool, int: _coerce_int, float: _coerce_float, str: _coerce_str}.get(tp)
    if scalar is None:
        raise TypeError(f"unsupported config type {tp!r} at {where}")  # a bug in the schema, not user input
    return scalar(value, where)


def _coerce_union(value: Any, args: tuple, where: str) -> Any:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("null", "none", "~")):
        if type(None) in args:
            return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, where)
        except ValueError as e:
            errors.append(str(e))
    if not errors:
        raise ValueError(f"{where}: cannot be null")
    # every alternative's own rule, e.g. "expected an integer, got 'Auto'; or 'Auto' is not one of ['auto']"
    raise ValueError("; or ".join([errors[0]] + [e.removeprefix(f"{where}: ") for e in errors[1:]]))


def _coerce_literal(value: Any, args: tuple, where: str) -> Any:
    if isinstance(value, bool):
        # YAML 1.1 reads `no`/`off`/`yes`/`on` as booleans: `mixed_precision: no` (the value the
        # diffusers scripts use) arrives as False. Map it back to the word the choices contain.
        words = ("true", "yes", "on") if value else ("false", "no", "off")
        value = next((w for w in words if w in args), value)
    if value in args:
        return value
    close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"{where}: {value!r} is not one of {list(args)}{hint}")


def _coerce_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "no", "off", "0"):
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{where}: expected true/false, got {value!r}")


def _coerce_int(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            f = float(value)
        except ValueError:
            pass
        else:
            if f.is_integer():
                return int(f)
    raise ValueError(f"{where}: expected an integer, got {value!r}")


def _coerce_float(value: Any, where: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    number = None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)  # "1e-4": PyYAML 1.1 leaves it a string
        except ValueError:
            pass
    if number is None:
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if not math.isfinite(number):
        # float() accepts "nan" and "inf"; no setting means anything with them (a NaN learning
        # rate trains NaN weights for max_steps before anything notices).
        raise ValueError(f"{where}: {value!r} is not a finite number; give a real value")
    return number


def _coerce_str(value: Any, where: str) -> str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{where}: expected a string, got {value!r}")


def _build(cls: type, data: Any, where: str, problems: list[str]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(f"{where or 'config'}: expected a mapping of keys, got {type(data).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean '{(where + '.') if where else ''}{close[0]}'?" if close else ""
            problems.append(f"{dotted}: unknown key{hint} (valid: {', '.join(names)})")
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, dotted, problems)
            continue
        args = typing.get_args(tp)
        if typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
            if not isinstance(value, list):
                problems.append(f"{dotted}: expected a list of mappings")
                continue
            kwargs[key] = [_build(args[0], v, f"{dotted}[{i}]", problems) for i, v in enumerate(value)]
            continue
        try:
            kwargs[key] = _coerce(value, tp, dotted)
        except ValueError as e:
            problems.append(str(e))
    return cls(**kwargs)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in ``tree``. A mapping value is merged into the mapping already there
    (``{"train": {"max_steps": 2}}`` changes one key, it does not reset the rest of ``train``)."""
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.get(p)
        if not isinstance(nxt, dict):
            nxt = node[p] = {}
        node = nxt
    last = parts[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        for key, sub in value.items():
            _set_dotted(node[last], str(key), sub)
    else:
        node[last] = value


def _parse_raw(raw: str) -> Any:
    """YAML-parse a CLI value so `key=[a, b]` and `key=null` work; anything unparsable stays a string."""
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def packaged_configs() -> list[str]:
    return sorted(
        p.name for p in resources.files("dreambooth_kit.config.presets").iterdir() if p.name.endswith(".yaml")
    )


class _DuplicateKey(yaml.MarkedYAMLError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key written twice in one mapping is an error. PyYAML
    keeps the last one silently: a second ``train:`` section would drop every key of the first."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may repeat keys on purpose
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    earlier = first_line.get(key)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if earlier is not None:
                    raise _DuplicateKey(
                        problem=f"{key!r} is written twice (line {earlier} and line {line}); "
                        "keep one and merge their contents",
                        problem_mark=key_node.start_mark,
                    )
                first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_text(p: Path, shown: str) -> str:
    if p.is_dir():
        inside = p / "config.yaml"
        hint = f" (a run folder: use {inside})" if inside.is_file() else ""
        raise ConfigError([f"{shown}: is a folder, not a config file; pass a .yaml file{hint}"])
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(
            [f"{shown}: cannot be read ({e.strerror or e}); check the path and its permissions"]
        ) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            [
                f"{shown}: not UTF-8 text (byte 0x{data[e.start]:02x} at position {e.start}); "
                "save it as UTF-8 (or check that it is the YAML file you meant)"
            ]
        ) from None


def _read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists() and not p.is_absolute() and str(path) in packaged_configs():
        text = resources.files("dreambooth_kit.config.presets").joinpath(str(path)).read_text()
    elif not p.exists():
        raise ConfigError(
            [f"config file not found: {p.resolve()} (packaged configs: {', '.join(packaged_configs())})"]
        )
    else:
        text = _read_text(p, str(path))
    try:
        data = yaml.load(text, Loader=_StrictLoader) or {}
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{path}, line {mark.line + 1}" if mark is not None else str(path)
        what = "duplicate key" if isinstance(e, _DuplicateKey) else "not valid YAML"
        context = e.context
        if context and e.context_mark is not None and e.context_mark is not mark:
            context = f"{context} (line {e.context_mark.line + 1})"
        problem = " ".join(str(x) for x in (context, e.problem) if x)
        raise ConfigError([f"{where}: {what}: {problem}"]) from None
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML: {e}"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections"])
    return data


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    *,
    validate_paths: bool = False,
) -> DreamBoothConfig:
    """Load a YAML (a path, or the name of a packaged config) plus overrides, strictly.

    ``overrides`` are dotted ``section.key=value`` strings (the CLI form) or a dict whose keys are
    dotted (``{"train.max_steps": 2}``) or sections (``{"train": {"max_steps": 2}}``); a mapping is
    merged into the section, never replacing it. Raises :class:`ConfigError` listing every problem at once.
    """
    tree = _read_yaml(path) if path is not None else {}
    problems: list[str] = []
    if isinstance(overrides, dict):
        for key, value in overrides.items():
            _set_dotted(tree, key, value)
    else:
        for item in overrides or []:
            if "=" not in item:
                problems.append(f"override {item!r}: expected section.key=value, e.g. train.max_steps=400")
                continue
            key, raw = item.split("=", 1)
            _set_dotted(tree, key.strip(), _parse_raw(raw.strip()))
    cfg = _expand_paths(_build(DreamBoothConfig, tree, "", problems))
    problems += validate(cfg, check_paths=validate_paths)
    if problems:
        raise ConfigError(problems)
    return cfg


def _path(value, *, keep: tuple = ()):
    """One path setting: ``~`` expanded (a folder literally named ``~`` is never what was meant) and
    :data:`DEMO_PHOTOS` the package's photo folder; ``keep`` values (``latest``, ``auto``) as they are."""
    if not isinstance(value, str) or not value or value in keep:
        return value
    if value == DEMO_PHOTOS:
        return str(resources.files("dreambooth_kit") / "demo_subject")
    return str(Path(value).expanduser()) if value.startswith("~") else value


def _expand_paths(cfg: DreamBoothConfig) -> DreamBoothConfig:
    """Every setting that names a file or folder, read the same way (see :func:`_path`): before,
    ``~`` was expanded in model.pretrained and prior.store and taken literally elsewhere."""
    # Class images belong to the run by default: <train.output_dir>/class_images (the store shares
    # them between runs). A fixed folder in every packaged config made a second subject of another
    # class stop on "made with a different recipe".
    out = cfg.train.output_dir
    class_dir = cfg.prior.class_dir or (str(Path(out) / "class_images") if out else "")
    cfg = dataclasses.replace(cfg, prior=dataclasses.replace(cfg.prior, class_dir=class_dir))
    return _map_paths(cfg, lambda value, keep, maybe_id: _path(value, keep=keep))


def absolute_paths(cfg: DreamBoothConfig) -> DreamBoothConfig:
    """``cfg`` with every folder and file setting made absolute (a hub id or ``builtin:`` name stays as
    it is): what a run saves as its config.yaml, so the resume command it prints works from any
    folder, not only the one the run started in."""

    def absolute(value, keep: tuple, maybe_id: bool):
        if not isinstance(value, str) or not value or value in keep or value.startswith("builtin:"):
            return value
        if maybe_id and not Path(value).exists():  # a hub id: a local folder of that name would win
            return value
        return os.path.abspath(value)

    return _map_paths(cfg, absolute)


def _map_paths(cfg: DreamBoothConfig, fn) -> DreamBoothConfig:
    """``fn(value, keep, maybe_id)`` applied to each path setting: ``keep`` are its words that are not
    paths (``latest``, ``auto``), ``maybe_id`` is true where a hub id is allowed too."""
    r = dataclasses.replace
    return r(
        cfg,
        model=r(
            cfg.model,
            pretrained=fn(cfg.model.pretrained, (), True),
            single_file_config=fn(cfg.model.single_file_config, (), True),
        ),
        data=r(cfg.data, instance_dir=fn(cfg.data.instance_dir, (), False)),
        prior=r(
            cfg.prior,
            class_dir=fn(cfg.prior.class_dir, (), False),
            store=fn(cfg.prior.store, ("auto", "off", "false"), False),
        ),
        train=r(
            cfg.train,
            output_dir=fn(cfg.train.output_dir, (), False),
            resume=fn(cfg.train.resume, ("latest",), False),
        ),
        concepts=[
            r(c, instance_dir=fn(c.instance_dir, (), False), class_dir=fn(c.class_dir, (), False))
            for c in cfg.concepts
        ],
    )


def save_config(cfg: DreamBoothConfig, path: str | Path) -> Path:
    return save_config_dict(cfg.to_dict(), path)


def save_config_dict(config: dict[str, Any], path: str | Path) -> Path:
    """Write ``config`` (a ``DreamBoothConfig.to_dict()``) as the YAML :func:`load_config` reads,
    atomically: what the run's folder and its LoRA/pipeline folder hold."""
    from dreambooth_kit.util.atomic import write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, yaml.safe_dump(config, sort_keys=False))

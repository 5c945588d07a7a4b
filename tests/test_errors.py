"""One error hierarchy: every exception the package raises for users derives from UserError."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import dreambooth_kit
from dreambooth_kit.errors import UserError

# Exceptions in the package that are not UserErrors, each on purpose:
NOT_USER_ERRORS = {
    # Ctrl-C while class images are written: stays a KeyboardInterrupt (a BaseException), so an
    # `except Exception` on the way up cannot swallow the user's stop; the CLI prints it and exits 130.
    "dreambooth_kit.data.prior.ClassImagesInterrupted",
    # Raised and caught inside the YAML loader to report a duplicate key; it becomes a ConfigError.
    "dreambooth_kit.config.loading._DuplicateKey",
    # A checkpoint save that failed for a reason that is not the disk's: a bug, whose traceback (its
    # cause's) the CLI must show; it still says which earlier checkpoint is intact.
    "dreambooth_kit.training.checkpoint_index.CheckpointSaveFailed",
}


def _exception_classes() -> dict[str, type]:
    found = {}
    for info in pkgutil.walk_packages(dreambooth_kit.__path__, "dreambooth_kit."):
        if info.name.endswith("__main__"):  # importing it runs the CLI
            continue
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == info.name:
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def test_every_exception_class_in_the_package_is_a_user_error():
    classes = _exception_classes()
    assert len(classes) > 15  # the walk found the modules (today: 25 classes)
    stray = sorted(name for name, cls in classes.items() if not issubclass(cls, UserError))
    assert stray == sorted(NOT_USER_ERRORS)


def test_user_errors_that_callers_catch_as_builtins_still_are_those_builtins():
    from dreambooth_kit.config import ConfigError
    from dreambooth_kit.errors import InvalidInput, MissingExtra, NonFiniteError
    from dreambooth_kit.training.adapters import LoraMismatchError, LoraNotFoundError
    from dreambooth_kit.training.guards import NonFiniteLossError, TrainingInterrupted

    assert issubclass(ConfigError, ValueError) and issubclass(InvalidInput, ValueError)
    assert issubclass(LoraMismatchError, ValueError) and issubclass(LoraNotFoundError, FileNotFoundError)
    assert issubclass(MissingExtra, ImportError) and issubclass(NonFiniteError, FloatingPointError)
    assert issubclass(NonFiniteLossError, FloatingPointError) and issubclass(
        TrainingInterrupted, RuntimeError
    )


def test_exit_codes_are_class_attributes_users_already_know():
    from dreambooth_kit.config import ConfigError
    from dreambooth_kit.training.guards import NonFiniteLossError, TrainingInterrupted

    assert UserError.exit_code == ConfigError.exit_code == 2
    assert NonFiniteLossError.exit_code == 1  # a valid config whose run diverged
    assert TrainingInterrupted(3, 2, None, "x").exit_code == 130  # 128 + SIGINT


def test_a_printed_error_is_bounded_in_length_and_keeps_its_head_and_tail(capsys):
    """Before, an error quoting a huge value (a 100k-character prompt) printed all of it."""
    from dreambooth_kit.config import load_config
    from dreambooth_kit.errors import MAX_MESSAGE, user_errors_to_exit_code

    prompt = "zwx " * 25_000
    code = user_errors_to_exit_code(
        load_config, "tiny.yaml", {"data.instance_prompt": prompt, "data.identifier": "qqq"}
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err) <= MAX_MESSAGE + 60
    assert err.startswith("error: ") and "characters left out" in err

"""A real browser drives the UI against the toy model: headless Chromium (Debian's `chromium` and
`chromium-driver`; `make browser` installs them) through selenium, with the app served in this
process on a free port.

It uploads the toy subject's five photos and sees their checks, trains a few steps and sees the
progress and a validation grid, scores the run, generates with a seed and gets the pixels
`dreambooth-kit generate` gets with that seed, and downloads the kohya export. A screenshot of each
tab is written under the test's tmp folder (with `UPDATE_UI_SCREENSHOT=1`, the Train tab's also to
docs/ui.png, the README's picture). Every wait is for something to appear in the page or on disk,
never for a length of time: the machines are shared and slow.

Without chromium or its driver the test is skipped, except in CI (`CI` set), where it fails.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import REPO
from PIL import Image

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
HANG_GUARD = 1800  # seconds: WebDriverWait needs a bound; pytest's end-to-end timeout is the real one
STEPS = 4  # training steps: one validation grid, at the last step
SEED = 7


@pytest.fixture
def browser(tmp_path):
    if not (CHROMIUM and DRIVER):
        reason = "the browser test needs Debian's chromium and chromium-driver: run `make browser`"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI must run it)")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1500"):
        options.add_argument(arg)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.downloads = downloads
    yield driver
    driver.quit()


@pytest.fixture
def served(tmp_path):
    """The app on a free port of 127.0.0.1, serving ``tmp_path/work``; launch() returns once it answers."""
    from dreambooth_kit.ui.app import build_app, launch_options
    from dreambooth_kit.ui.paths import Roots

    work = tmp_path / "work"
    work.mkdir()
    roots = Roots.of([work])
    blocks = build_app(roots, "toy.yaml").queue()
    _, url, _ = blocks.launch(
        server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, **launch_options(roots)
    )
    yield url, work
    blocks.close()


def _wait(driver, condition):
    """Until ``condition(driver)`` holds; an error message in the page fails at once, with its text."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def holds(d):
        shown = [t.text for t in d.find_elements(By.CSS_SELECTOR, "[data-testid='toast-body']")]
        errors = [t.replace("\n", " ") for t in shown if t.startswith("Error")]
        assert not errors, f"the page shows an error: {errors[0]}"
        return condition(d)

    ignored = (NoSuchElementException, StaleElementReferenceException)
    return WebDriverWait(driver, HANG_GUARD, poll_frequency=0.2, ignored_exceptions=ignored).until(holds)


def _css(driver, selector):
    from selenium.webdriver.common.by import By

    return _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, selector))


def _text_in(driver, elem_id, text):
    from selenium.webdriver.common.by import By

    return _wait(driver, lambda d: text in d.find_element(By.ID, elem_id).text)


def _type(driver, selector, value):
    from selenium.webdriver.common.keys import Keys

    field = _css(driver, selector)
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys(str(value))


def _tab(driver, label):
    from selenium.webdriver.common.by import By

    xpath = f"//button[@role='tab' and normalize-space()='{label}']"
    _wait(driver, lambda d: d.find_element(By.XPATH, xpath)).click()


def _pixels(png: bytes | Path) -> bytes:
    import io

    with Image.open(io.BytesIO(png) if isinstance(png, bytes) else png) as im:
        return im.convert("RGB").tobytes()


def test_the_whole_workflow_in_a_browser(browser, served, tmp_path):
    from dreambooth_kit.toy.world import write_subject_photos
    from dreambooth_kit.ui.app import ELEM

    url, work = served
    shots, timings, t0 = tmp_path / "screenshots", {}, time.perf_counter()
    shots.mkdir()

    def done(name):
        timings[name] = round(time.perf_counter() - t0 - sum(timings.values()), 1)
        browser.save_screenshot(str(shots / f"{name}.png"))

    browser.get(url)
    write_subject_photos(tmp_path / "upload")  # five photos, three with a caption file
    files = sorted((tmp_path / "upload").iterdir())
    upload = _css(browser, f"#{ELEM['upload']} input[type=file]")
    upload.send_keys("\n".join(str(p) for p in files))
    _text_in(browser, ELEM["summary"], "5 usable photos, 0 warnings, 0 errors")
    _css(browser, f"#{ELEM['table']} table")
    _text_in(browser, ELEM["table"], "caption of 01.png")
    assert sorted(p.name for p in (work / "photos").iterdir()) == [p.name for p in files]
    done("photos")

    _tab(browser, "Train")
    _type(browser, f"#{ELEM['steps']} input", STEPS)
    _type(browser, f"#{ELEM['every_v']} input", STEPS)
    _type(browser, f"#{ELEM['every_c']} input", 0)
    _css(browser, f"#{ELEM['more']} button").click()
    _type(
        browser,
        f"#{ELEM['extra']} textarea",
        "prior.num_class_images=4\nprior.sample_steps=2\nvalidation.steps=4",
    )
    _css(browser, f"#{ELEM['start']}").click()
    _text_in(browser, ELEM["state"], "finished")
    _text_in(browser, ELEM["progress"], f"step {STEPS} of {STEPS}")
    _css(browser, f"#{ELEM['grids']} img")
    _css(browser, f"#{ELEM['loss']} img")
    run = work / "runs" / "my_subject"
    assert (run / "samples" / f"step-{STEPS:06d}" / "grid.png").is_file() and (run / "lora").is_dir()
    done("train")

    _tab(browser, "Evaluate")
    _type(browser, f"#{ELEM['eval_seeds']} input", 2)  # the fewest DIV can compare
    _type(browser, f"#{ELEM['eval_extra']} textarea", "evaluate.class_images=2\nevaluate.steps=4")
    _css(browser, f"#{ELEM['evaluate']}").click()
    _text_in(browser, ELEM["metrics"], f"step-{STEPS:06d}")  # base and the run's checkpoint, scored
    _css(browser, f"#{ELEM['eval_plot']} img")
    done("evaluate")

    _tab(browser, "Generate")
    _type(browser, f"#{ELEM['prompt']} textarea", "a photo of zwx ball")
    _type(browser, f"#{ELEM['seed']} input", SEED)
    _type(browser, f"#{ELEM['gen_steps']} input", 10)
    _type(browser, f"#{ELEM['guidance']} input", 4)
    _css(browser, f"#{ELEM['generate']}").click()
    image = _css(browser, f"#{ELEM['image']} img")
    infotext = _css(browser, f"#{ELEM['infotext']} textarea")
    _wait(browser, lambda d: f"Seed: {SEED}" in infotext.get_attribute("value"))
    shown = urllib.request.urlopen(image.get_attribute("src"), timeout=HANG_GUARD).read()
    done("generate")
    _generate_with_the_cli(tmp_path / "cli", run)
    assert _pixels(shown) == _pixels(tmp_path / "cli" / f"{SEED}.png")

    _tab(browser, "Export")
    _css(browser, f"#{ELEM['export']}").click()
    link = _css(browser, f"#{ELEM['files']} a[download]")
    done("export")
    link.click()
    name = "my_subject_kohya.safetensors"
    got = browser.downloads / name
    _wait(browser, lambda d: got.is_file() and not any(browser.downloads.glob("*.crdownload")))
    assert got.read_bytes() == (run / "export" / name).read_bytes()

    timings["total"] = round(time.perf_counter() - t0, 1)
    (tmp_path / "timings.json").write_text(json.dumps(timings))
    print(f"screenshots: {sorted(str(p) for p in shots.iterdir())}\ntimings (s): {timings}")
    if os.environ.get("UPDATE_UI_SCREENSHOT"):
        shutil.copyfile(shots / "train.png", REPO / "docs" / "ui.png")


def _generate_with_the_cli(out: Path, run: Path) -> None:
    from dreambooth_kit.cli import main

    args = ["generate", "--base", "builtin:toy-sd2", "--lora", str(run / "lora"), "--prompt", "a photo of zwx ball",
            "--seed", str(SEED), "--n", "1", "--steps", "10", "--guidance-scale", "4", "--out", str(out)]  # fmt: skip
    assert main(args) == 0

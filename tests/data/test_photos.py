"""dreambooth_kit.data.photos: photos users really have (missing, junk, broken, rotated, transparent, huge, odd
formats, duplicates), preprocess, dataset, collate."""

from __future__ import annotations

import io
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from dreambooth_kit.data import dataset
from dreambooth_kit.data.dataset import DreamBoothDataset, collate, pair_examples, preprocess
from dreambooth_kit.data.photo_checks import check_images
from dreambooth_kit.data.photos import IMAGE_EXTENSIONS, DataError, ImageIssue, find_images, load_image

DEMO = Path(__file__).resolve().parents[2] / "dreambooth_kit" / "demo_subject"
RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)


def _noise(size: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _solid(folder: Path, name: str, color: tuple[int, int, int], size: int = 64) -> Path:
    path = folder / name
    Image.new("RGB", (size, size), color).save(path)
    return path


def _by_name(issues: list[ImageIssue], name: str, severity: str) -> list[str]:
    return [i.message for i in issues if i.path.name == name and i.severity == severity]


# --- nonexistent folder ---------------------------------------------------------------------------
def test_missing_folder_names_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for call in (find_images, check_images):
        with pytest.raises(DataError) as exc:
            call("photos")  # relative on purpose: the message must still be absolute
        assert str(exc.value) == f"image folder not found: {tmp_path.resolve() / 'photos'}"


def test_file_instead_of_folder(tmp_path):
    path = _solid(tmp_path, "a.png", RED)
    with pytest.raises(DataError, match="is a file, not a folder"):
        check_images(path)


# --- empty folder -----------------------------------------------------------------------------------
def test_empty_folder_error_text(tmp_path):
    report = check_images(tmp_path)
    expected = f"0 usable images in {tmp_path.resolve()} (accepted: {' '.join(IMAGE_EXTENSIONS)})"
    assert [e.message for e in report.errors] == [expected]
    assert report.images == []
    with pytest.raises(DataError) as exc:
        report.raise_if_errors()
    assert str(exc.value).splitlines()[0].startswith(f"1 problem in {tmp_path.resolve()}")
    assert expected in str(exc.value)


# --- junk is skipped and listed at INFO ------------------------------------------------------------
def test_junk_skipped_and_listed(tmp_path):
    for name in (".DS_Store", "Thumbs.db", "desktop.ini", "img.txt", "._a.jpg"):
        (tmp_path / name).write_bytes(b"junk")
    (tmp_path / ".ipynb_checkpoints").mkdir()
    _solid(tmp_path / ".ipynb_checkpoints", "a-checkpoint.png", RED)
    real = [_solid(tmp_path, f"{c}.png", color) for c, color in (("a", RED), ("b", GREEN), ("c", BLUE))]
    report = check_images(tmp_path, resolution=64)
    assert report.images == [p.resolve() for p in real]
    assert {p.name for p in report.skipped} == {
        ".DS_Store", "Thumbs.db", "desktop.ini", "img.txt", "._a.jpg", ".ipynb_checkpoints",
    }  # fmt: skip
    assert report.errors == [] and report.warnings == []
    assert {i.path.name for i in report.infos} == {p.name for p in report.skipped}
    assert all("skipped" in i.message for i in report.infos)
    report.raise_if_errors()  # no error: training would start
    assert len(DreamBoothDataset(report.images, "a sks toy", 32)) == 3


# --- text bytes named .jpg --------------------------------------------------------------------------
def test_text_file_named_jpg(tmp_path):
    (tmp_path / "notimage.jpg").write_text("this is not an image\n")
    report = check_images(tmp_path)
    [msg] = _by_name(report.issues, "notimage.jpg", "error")
    assert msg.startswith("notimage.jpg: cannot identify image file")
    with pytest.raises(DataError) as exc:
        report.raise_if_errors()
    text = str(exc.value)
    assert f"ERROR {tmp_path.resolve() / 'notimage.jpg'}: cannot identify image file" in text
    assert text.splitlines()[0] == f"2 problems in {tmp_path.resolve()}: notimage.jpg, {tmp_path.name}"
    with pytest.raises(DataError, match="notimage.jpg: cannot identify image file"):
        load_image(tmp_path / "notimage.jpg")


# --- truncated JPEG passes verify() but not a full decode ----------------------------------------
def test_truncated_jpeg(tmp_path, monkeypatch):
    buf = io.BytesIO()
    _noise(64).save(buf, "JPEG", quality=95)
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with Image.open(path) as img:
        img.verify()  # the premise of the case: the cheap check passes
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", False)
    report = check_images(tmp_path)
    [msg] = _by_name(report.issues, "cut.jpg", "error")
    assert "could not be fully decoded" in msg and "truncated" in msg
    assert report.images == []
    with pytest.raises(DataError, match=r"cut\.jpg: could not be fully decoded"):
        load_image(path)


# --- EXIF orientation 6 and 8 -------------------------------------------------------------------
def _quadrants(width: int = 60, height: int = 40) -> np.ndarray:
    arr = np.zeros((height, width, 3), np.uint8)
    arr[: height // 2, : width // 2] = RED
    arr[: height // 2, width // 2 :] = GREEN
    arr[height // 2 :, : width // 2] = BLUE
    arr[height // 2 :, width // 2 :] = YELLOW
    return arr


# orientation -> (np.rot90 k, colour displayed top-left). 6 = rotate 90 clockwise, 8 = 90 counter-clockwise.
@pytest.mark.parametrize(("orientation", "k", "top_left"), [(6, -1, BLUE), (8, 1, GREEN)])
def test_exif_orientation(tmp_path, orientation, k, top_left):
    img = Image.fromarray(_quadrants())
    exif = img.getexif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    img.save(path, "JPEG", quality=95, exif=exif)
    with Image.open(path) as raw:
        stored = np.array(raw.convert("RGB"))  # the decoded pixels, not yet rotated
    expected = np.rot90(stored, k)

    loaded = load_image(path)
    assert loaded.size == (40, 60)  # portrait: width 40, height 60
    assert np.array_equal(np.array(loaded), expected)
    assert np.abs(np.array(loaded)[5, 5].astype(int) - top_left).max() < 30

    # The training tensor: centre crop of the upright 40x60 image keeps rows 10..50.
    tensor = DreamBoothDataset([path], "a sks toy", 40)[0]["instance_pixels"]
    assert tensor.shape == (3, 40, 40)
    want = preprocess(Image.fromarray(np.ascontiguousarray(expected)), 40)
    assert torch.equal(tensor, want)
    pixel = ((tensor[:, 5, 5] + 1) * 127.5).round()
    assert (pixel - torch.tensor(top_left)).abs().max() < 30


# --- RGBA with transparent background over hidden red -------------------------------------------
def test_rgba_composited_on_white(tmp_path):
    arr = np.zeros((64, 64, 4), np.uint8)
    arr[..., :3] = RED  # hidden under alpha 0
    arr[16:48, 16:48] = (*GREEN, 255)  # the opaque subject
    Image.fromarray(arr, "RGBA").save(tmp_path / "cut.png")
    loaded = np.array(load_image(tmp_path / "cut.png"))
    assert loaded.shape == (64, 64, 3) and loaded.dtype == np.uint8
    assert (loaded[:16] == 255).all()  # transparent area is white ...
    red = (loaded[..., 0] > 200) & (loaded[..., 1] < 100) & (loaded[..., 2] < 100)
    assert not red.any()  # ... and no red anywhere
    assert tuple(loaded[32, 32]) == GREEN
    report = check_images(tmp_path, resolution=64, min_count=1)
    [msg] = _by_name(report.issues, "cut.png", "warning")
    assert "transparent areas composited on white" in msg


def test_opaque_rgba_no_warning(tmp_path):
    Image.new("RGBA", (64, 64), (*BLUE, 255)).save(tmp_path / "opaque.png")
    report = check_images(tmp_path, resolution=64, min_count=1)
    assert report.issues == []
    assert tuple(np.array(load_image(tmp_path / "opaque.png"))[0, 0]) == BLUE


# --- palette+transparency, CMYK, L, 1 -> RGB uint8 ----------------------------------------------------
def test_modes_become_rgb(tmp_path):
    pal = Image.new("P", (48, 48), 0)
    pal.putpalette([*RED, *GREEN] + [0] * 762)
    pal.paste(1, (0, 0, 24, 48))
    pal.save(tmp_path / "pal.png", transparency=0)  # index 0 (red) is transparent
    Image.new("CMYK", (48, 48), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    Image.new("L", (48, 48), 77).save(tmp_path / "grey.png")
    Image.new("1", (48, 48), 1).save(tmp_path / "bw.png")
    for name in ("pal.png", "cmyk.jpg", "grey.png", "bw.png"):
        arr = np.array(load_image(tmp_path / name))
        assert (load_image(tmp_path / name).mode, arr.shape, arr.dtype) == ("RGB", (48, 48, 3), np.uint8)
    pal_rgb = np.array(load_image(tmp_path / "pal.png"))
    assert tuple(pal_rgb[0, 0]) == GREEN and tuple(pal_rgb[0, 40]) == (255, 255, 255)
    cmyk = np.array(load_image(tmp_path / "cmyk.jpg"))[24, 24].astype(int)
    assert cmyk[0] > 200 and cmyk[1] < 60 and cmyk[2] < 60  # C=0 M=Y=max is red
    assert tuple(np.array(load_image(tmp_path / "grey.png"))[0, 0]) == (77, 77, 77)
    assert tuple(np.array(load_image(tmp_path / "bw.png"))[0, 0]) == (255, 255, 255)
    report = check_images(tmp_path, resolution=48)
    assert ["CMYK" in m for m in _by_name(report.issues, "cmyk.jpg", "warning")] == [True]
    assert _by_name(report.issues, "pal.png", "warning") == [
        "pal.png: transparent areas composited on white; export it with the background you want"
    ]
    assert report.errors == []


# --- 16-bit greyscale gradient -----------------------------------------------------------------------
def test_16bit_gradient_not_saturated(tmp_path):
    gradient = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
    Image.fromarray(gradient).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as img:
        assert img.mode.startswith("I")  # really stored as 16-bit
    arr = np.array(load_image(tmp_path / "deep.png")).astype(float)
    assert abs(arr.mean() - 127.5) < 12.75  # within 10% of the true mean
    assert (arr >= 254).mean() < 0.05  # convert("RGB") would give ~99% white here
    assert arr[0, 0, 0] == 0 and arr[0, -1, 0] == 255 and np.all(np.diff(arr[0, :, 0]) >= 0)
    report = check_images(tmp_path, resolution=64, min_count=1)
    assert report.errors == [] and report.warnings == []


# --- small images -----------------------------------------------------------------------------------
def test_small_image_warning_and_floor(tmp_path):
    _solid(tmp_path, "small.png", RED, size=64)
    _solid(tmp_path, "tiny.png", GREEN, size=20)
    report = check_images(tmp_path, resolution=512, min_count=1)
    [warn] = _by_name(report.issues, "small.png", "warning")
    assert "will be upscaled 8x" in warn
    [err] = _by_name(report.issues, "tiny.png", "error")
    assert err == "tiny.png: 20x20 is below the 32 px minimum side; use a larger photo"
    assert [p.name for p in report.images] == ["small.png"]
    uneven = check_images(tmp_path, resolution=100, min_count=1)
    assert "upscaled 1.6x" in _by_name(uneven.issues, "small.png", "warning")[0]


# --- pixel limit ------------------------------------------------------------------------------------
def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that claims width x height but holds one row: decoding it would allocate width*height*3."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" + b"\x00" * 3 * width)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_pixel_limit(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)
    _solid(tmp_path, "ok.png", RED, size=40)  # 1600 px: fine
    _solid(tmp_path, "big.png", GREEN, size=50)  # 2500 px: over half the limit -> warning
    _solid(tmp_path, "over.png", BLUE, size=70)  # 4900 px: over the limit (PIL itself only warns)
    _solid(tmp_path, "bomb.png", YELLOW, size=96)  # 9216 px: over 2x, PIL refuses to open
    report = check_images(tmp_path, resolution=32, min_count=1)
    assert [p.name for p in report.images] == ["big.png", "ok.png"]
    assert _by_name(report.issues, "ok.png", "warning") == []
    assert "over half the 0.0 MP limit" in _by_name(report.issues, "big.png", "warning")[0]
    [over] = _by_name(report.issues, "over.png", "error")
    assert over.startswith("over.png: 70x70 = 0.0 MP is over the limit") and "not decoded" in over
    [bomb] = _by_name(report.issues, "bomb.png", "error")
    assert bomb.startswith("bomb.png: ") and "9216" in bomb


def test_pixel_limit_checked_before_decoding(tmp_path, monkeypatch):
    _png_header_only(tmp_path / "huge.png", 20000, 20000)  # 1.2 GB if decoded
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # PIL's own guard off: ours must hold
    loaded: list[str] = []
    real_load = ImageFile.ImageFile.load

    def spy(self):
        loaded.append(getattr(self, "filename", ""))
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    report = check_images(tmp_path, max_pixels=10_000_000)
    [err] = _by_name(report.issues, "huge.png", "error")
    assert "20000x20000 = 400.0 MP is over the limit of 10.0 MP" in err
    assert loaded == []


# --- formats outside the allow-list -----------------------------------------------------------------
def test_heic_refused_without_decoding(tmp_path, monkeypatch):
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
    (tmp_path / "photo.heic").write_bytes(heic)
    (tmp_path / "IMG_2.HEIC").write_bytes(heic)
    (tmp_path / "scan.tiff").write_bytes(b"II*\x00" + b"\x00" * 64)
    (tmp_path / "renamed.jpg").write_bytes(heic)
    opened: list[str] = []
    real_open = Image.open
    monkeypatch.setattr(
        Image, "open", lambda fp, *a, **k: opened.append(Path(fp).name) or real_open(fp, *a, **k)
    )
    report = check_images(tmp_path)
    # Before, HEIC (every iPhone's default) was refused without saying how to convert it.
    (msg,) = _by_name(report.issues, "photo.heic", "error")
    assert msg.startswith("photo.heic: format .heic (the iPhone's) is not supported; convert it to .jpg")
    assert "sips -s format jpeg" in msg and "heif-convert" in msg and "Most Compatible" in msg
    assert "sips -s format jpeg" in _by_name(report.issues, "IMG_2.HEIC", "error")[0]
    assert "format .tiff is not supported" in _by_name(report.issues, "scan.tiff", "error")[0]
    assert opened == ["renamed.jpg"]  # only the allow-listed name is opened ...
    renamed = _by_name(report.issues, "renamed.jpg", "error")[0]
    assert "contains HEIC/HEIF data" in renamed and "heif-convert" in renamed


def test_avif_is_accepted_where_pillow_reads_it(tmp_path):
    """Before, .avif was refused by its extension although the locked Pillow decodes it."""
    from PIL import features

    from dreambooth_kit.data.photos import IMAGE_EXTENSIONS

    if not features.check("avif"):
        assert ".avif" not in IMAGE_EXTENSIONS  # refused, with advice, where Pillow cannot read it
        pytest.skip("this Pillow has no AVIF codec")
    Image.new("RGB", (96, 80), (200, 30, 30)).save(tmp_path / "photo.avif", quality=90)
    report = check_images(tmp_path, resolution=64)
    assert [p.name for p in report.images] == ["photo.avif"] and not report.errors
    tensor = DreamBoothDataset(report.images, "a sks toy", 64)[0]["instance_pixels"]
    assert tensor.shape == (3, 64, 64) and tensor[0].mean() > 0.3  # red, decoded


def test_renamed_gif_not_decoded_by_other_plugins(tmp_path):
    frames = [Image.new("RGB", (48, 48), c) for c in (RED, BLUE)]
    frames[0].save(tmp_path / "anim.png.tmp", "GIF", save_all=True, append_images=frames[1:])
    (tmp_path / "anim.png.tmp").rename(tmp_path / "anim.png")
    with pytest.raises(DataError, match="anim.png: contains GIF data despite its name"):
        load_image(tmp_path / "anim.png")


# --- animation. Policy: .gif refused; animated WebP/PNG -> frame 0 + warning ------------------------
def test_animated_gif_refused(tmp_path):
    frames = [Image.new("RGB", (48, 48), c) for c in (RED, BLUE)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    report = check_images(tmp_path, resolution=48)
    [msg] = _by_name(report.issues, "anim.gif", "error")
    assert "format .gif is not supported" in msg and ".png" in msg


@pytest.mark.parametrize("fmt", ["WEBP", "PNG"])
def test_animated_webp_png_frame0(tmp_path, fmt):
    frames = [Image.new("RGB", (48, 48), c) for c in (RED, BLUE, GREEN)]
    path = tmp_path / f"anim.{fmt.lower()}"
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:], lossless=True)
    assert tuple(np.array(load_image(path))[10, 10]) == RED
    report = check_images(tmp_path, resolution=48, min_count=1)
    assert _by_name(report.issues, path.name, "warning") == [
        f"{path.name}: animated (3 frames): only frame 0 is used"
    ]
    assert report.images == [path.resolve()]


def test_mpo_jpeg_is_not_animated(tmp_path):
    # iPhone JPEGs are often MPO (photo + depth/gain map): the extra image must not trigger "animated".
    frames = [Image.new("RGB", (48, 48), c) for c in (RED, BLUE)]
    frames[0].save(tmp_path / "IMG_1.jpg", "MPO", save_all=True, append_images=frames[1:])
    report = check_images(tmp_path, resolution=48, min_count=1)
    assert report.issues == [] and report.images == [(tmp_path / "IMG_1.jpg").resolve()]
    assert np.abs(np.array(load_image(tmp_path / "IMG_1.jpg"))[10, 10].astype(int) - RED).max() < 5


# --- duplicates, too few, too many ------------------------------------------------------------------
def test_duplicates_warn_naming_both(tmp_path):
    _noise(48, seed=1).save(tmp_path / "a.png")
    _noise(48, seed=1).save(tmp_path / "b.bmp")  # same pixels, other format
    _noise(48, seed=2).save(tmp_path / "c.png")
    report = check_images(tmp_path, resolution=48)
    assert [str(w) for w in report.warnings] == [
        f"WARNING {tmp_path.resolve() / 'b.bmp'}: same pixels as a.png; duplicates count double"
    ]
    assert len(report.images) == 3 and report.errors == []


def _near_copy_warning(folder: Path, name: str, original: str, resolution: int = 64) -> int:
    """Checks that the one warning is ``name``'s near-duplicate warning; returns its bit count."""
    report = check_images(folder, resolution=resolution, min_count=1)
    [warn] = report.warnings
    bits = warn.message.split("perceptual hash ")[1].split(" bits")[0]
    expected = (
        f"{name}: looks like a resized or re-encoded copy of {original} (perceptual hash {bits} bits "
        "apart of 64); near-duplicates count double in training: remove one"
    )
    assert warn.path == (folder / name).resolve() and warn.message == expected
    assert report.errors == [] and len(report.images) == len(list(folder.iterdir()))
    return int(bits)


@pytest.mark.parametrize("copy", ["half size", "JPEG quality 70", "PNG to JPEG"])
def test_resized_or_reencoded_copy_warns_naming_both(tmp_path, copy):
    load_image(DEMO / "01.jpg").save(tmp_path / "a.png")
    photo = Image.open(tmp_path / "a.png")
    if copy == "PNG to JPEG":
        photo.save(tmp_path / "b.jpg")  # Pillow's default quality, 75
    else:
        half = photo.resize((64, 64), Image.Resampling.LANCZOS)
        (half if copy == "half size" else photo).save(tmp_path / "b.jpg", quality=70)
    load_image(DEMO / "02.jpg").save(tmp_path / "c.png")  # a different shot: not warned about
    # Measured 0-2 bits for these copies; the limit is 12.
    assert _near_copy_warning(tmp_path, "b.jpg", "a.png") <= 3


def test_demo_subject_photos_are_not_near_duplicates(tmp_path):
    # Five deliberately different shots of one subject (>= 26 bits apart): only the real copy warns.
    for src in sorted(DEMO.glob("*.jpg")):
        (tmp_path / src.name).write_bytes(src.read_bytes())
    load_image(DEMO / "03.jpg").resize((64, 64), Image.Resampling.LANCZOS).save(tmp_path / "06.jpg")
    _near_copy_warning(tmp_path, "06.jpg", "03.jpg")


def test_toy_subject_photos_are_not_near_duplicates(tmp_path):
    from dreambooth_kit.toy.world import write_subject_photos

    write_subject_photos(tmp_path, captions=False)  # 01.png..05.png, 32 px
    Image.open(tmp_path / "01.png").save(tmp_path / "06.jpg")  # PNG to JPEG: the copy
    report = check_images(tmp_path, resolution=32, min_count=1)
    assert [w.message.split(" (")[0] for w in report.warnings] == [
        "06.jpg: looks like a resized or re-encoded copy of 01.png"
    ]


def test_distinct_photos_are_not_near_duplicates(tmp_path):
    # Flat photos all hash alike (no neighbour differs) and must not count as copies of each other.
    for i, color in enumerate((RED, GREEN, BLUE, YELLOW)):
        _solid(tmp_path, f"flat{i}.png", color)
    for seed in range(4):
        _noise(64, seed).save(tmp_path / f"noise{seed}.png")
    _noise(64, 0).resize((48, 48), Image.Resampling.LANCZOS).save(tmp_path / "z.png")  # the copy
    _near_copy_warning(tmp_path, "z.png", "noise0.png", resolution=48)


def test_one_image_warns_too_few(tmp_path):
    _solid(tmp_path, "only.png", RED)
    report = check_images(tmp_path, resolution=64)
    [warn] = report.warnings
    assert warn.path == tmp_path.resolve() and warn.message.startswith("only 1 usable image(s) in ")
    assert report.errors == [] and len(DreamBoothDataset(report.images, "a sks toy", 32)) == 1


def test_200_images_warn_too_many(tmp_path):
    for i in range(200):  # distinct colours so nothing is a duplicate
        Image.new("RGB", (32, 32), (i, 255 - i, (7 * i) % 256)).save(tmp_path / f"{i:03d}.png")
    report = check_images(tmp_path, resolution=32)
    assert [w.message.split(",")[0] for w in report.warnings] == [
        f"200 usable images in {tmp_path.resolve()}"
    ]
    assert len(report.images) == 200 and report.errors == []
    assert [p.name for p in report.images] == sorted(p.name for p in report.images)


# --- reporting ------------------------------------------------------------------------------------------------
def test_raise_if_errors_lists_every_error(tmp_path):
    (tmp_path / "x.jpg").write_text("nope")
    (tmp_path / "y.heic").write_bytes(b"")
    _solid(tmp_path, "z.png", RED, size=10)
    for c, color in (("a", GREEN), ("b", BLUE), ("c", YELLOW)):
        _solid(tmp_path, f"{c}.png", color)
    report = check_images(tmp_path, resolution=64)
    with pytest.raises(DataError) as exc:
        report.raise_if_errors()
    lines = str(exc.value).splitlines()
    assert lines[0] == f"3 problems in {tmp_path.resolve()}: x.jpg, y.heic, z.png"
    assert [line.split(":")[0] for line in lines[1:]] == [
        f"  ERROR {tmp_path.resolve() / n}" for n in ("x.jpg", "y.heic", "z.png")
    ]
    assert [i.path.name for i in exc.value.issues] == ["x.jpg", "y.heic", "z.png"]
    with pytest.raises(
        ValueError, match=r"severity must be one of \('error', 'warning', 'info'\), got 'fatal'"
    ):
        ImageIssue(tmp_path, "fatal", "x")


# --- preprocess ---------------------------------------------------------------------------------------------
def test_preprocess_range_shape_flip():
    img = _noise(64, seed=3)
    t = preprocess(img, 64)
    assert t.shape == (3, 64, 64) and t.dtype == torch.float32
    assert t.min() == -1.0 and t.max() == 1.0  # 0 -> -1, 255 -> 1 (noise has both)
    assert torch.equal(t, torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 127.5 - 1)  # no resample
    flipped = preprocess(img, 64, flip=True)
    assert torch.equal(flipped, t.flip(-1)) and not torch.equal(flipped, t)
    small = preprocess(img, 32)
    assert small.shape == (3, 32, 32) and small.min() >= -1 and small.max() <= 1


def test_preprocess_crop_offset_picks_the_side():
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, :40] = RED
    arr[:, 40:] = BLUE
    img = Image.fromarray(arr)
    left = preprocess(img, 40, crop_offset=(0, 0.5))  # ints accepted too
    right = preprocess(img, 40, crop_offset=(1.0, 0.5))
    assert torch.equal(left[:, 20, 20], torch.tensor([1.0, -1.0, -1.0]))
    assert torch.equal(right[:, 20, 20], torch.tensor([-1.0, -1.0, 1.0]))
    centre = preprocess(img, 20)  # centre crop: half red, half blue
    assert centre[0, 10, 2] > 0.9 and centre[2, 10, 17] > 0.9
    with pytest.raises(ValueError, match="crop_offset"):
        preprocess(img, 40, crop_offset=(1.5, 0.0))


def test_preprocess_composites_alpha():
    img = Image.new("RGBA", (32, 32), (*RED, 0))
    assert torch.equal(preprocess(img, 32), torch.ones(3, 32, 32))  # white, not the hidden red


# --- dataset and collate ------------------------------------------------------------------------------------
def _three_and_five(tmp_path: Path) -> tuple[list[Path], list[Path]]:
    inst = [_solid(tmp_path, f"i{k}.png", (k * 60, 0, 0), size=48) for k in range(3)]
    cls = [_solid(tmp_path, f"c{k}.png", (0, 0, k * 50), size=48) for k in range(5)]
    return inst, cls


def test_dataset_prior_pairing_and_collate(tmp_path):
    inst, cls = _three_and_five(tmp_path)
    ds = DreamBoothDataset(inst, "a sks dog", 32, class_images=cls, class_prompt="a dog")
    assert len(ds) == 5 and len(DreamBoothDataset(inst, "a sks dog", 32)) == 3
    item = ds[4]  # instance index wraps (4 % 3 = 1), class does not
    assert item["instance_prompt"] == "a sks dog" and item["class_prompt"] == "a dog"
    assert torch.allclose(item["instance_pixels"][:, 0, 0], torch.tensor([60 / 127.5 - 1, -1, -1]))
    assert torch.allclose(item["class_pixels"][:, 0, 0], torch.tensor([-1, -1, 200 / 127.5 - 1]))
    with pytest.raises(IndexError):
        ds[5]

    batch = collate([ds[0], ds[1]], with_prior=True)
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["num_instance"] == 2
    assert batch["prompts"] == ["a sks dog", "a sks dog", "a dog", "a dog"]
    assert torch.equal(batch["pixel_values"][1], ds[1]["instance_pixels"])
    assert torch.equal(batch["pixel_values"][3], ds[1]["class_pixels"])
    plain = collate([ds[0], ds[1]], with_prior=False)
    assert plain["pixel_values"].shape == (2, 3, 32, 32) and plain["prompts"] == ["a sks dog"] * 2
    with pytest.raises(DataError, match="no class images"):
        collate([DreamBoothDataset(inst, "a sks dog", 32)[0]], with_prior=True)


def test_dataset_argument_errors(tmp_path):
    inst, cls = _three_and_five(tmp_path)
    with pytest.raises(DataError, match="no instance images"):
        DreamBoothDataset([], "p", 32)
    with pytest.raises(DataError, match="class_images is empty"):
        DreamBoothDataset(inst, "p", 32, class_images=[], class_prompt="c")
    with pytest.raises(DataError, match="without a class_prompt"):
        DreamBoothDataset(inst, "p", 32, class_images=cls)


def test_dataset_augmentation_is_a_pure_function_of_seed_epoch_and_index(tmp_path):
    """Crops and flips no longer come from torch's global RNG: accelerate's loader fetches a batch
    ahead, so the RNG state a checkpoint saved already held the next batch's draws and a resume with
    random flips or crops was not exact. Now the same (seed, epoch, index) gives the same pixels
    whatever the global RNG did, and epochs differ."""
    arr = np.zeros((40, 80, 3), np.uint8)
    arr[:, :, 0] = np.arange(80, dtype=np.uint8)[None, :] * 3  # horizontal ramp: crops and flips differ
    Image.fromarray(arr).save(tmp_path / "ramp.png")
    ds = DreamBoothDataset([tmp_path / "ramp.png"], "p", 32, center_crop=False, random_flip=True, seed=7)

    def draw(global_seed: int) -> list[torch.Tensor]:
        torch.manual_seed(global_seed)
        return [ds[(epoch, 0)]["instance_pixels"] for epoch in range(8)]

    first, second = draw(1), draw(2)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert len({tuple(t[0, 0].tolist()) for t in first}) > 1  # the crops/flips really vary by epoch
    other_seed = DreamBoothDataset(
        [tmp_path / "ramp.png"], "p", 32, center_crop=False, random_flip=True, seed=8
    )
    assert any(not torch.equal(other_seed[(e, 0)]["instance_pixels"], first[e]) for e in range(8))


def test_dataset_decodes_lazily(tmp_path, monkeypatch):
    inst, _ = _three_and_five(tmp_path)
    calls: list[Path] = []
    monkeypatch.setattr(dataset, "load_image", lambda p: calls.append(Path(p)) or Image.new("RGB", (48, 48)))
    ds = DreamBoothDataset(inst, "p", 32)
    assert calls == []
    ds[2]
    assert calls == [inst[2]]


# --- the shipped demo subject --------------------------------------------------------------------------------
def test_demo_subject_is_clean():
    report = check_images(DEMO, resolution=64)
    assert [p.name for p in report.images] == ["01.jpg", "02.jpg", "03.jpg", "04.jpg", "05.jpg"]
    assert report.issues == []
    assert all(p.stat().st_size < 10_000 for p in report.images)
    assert all(load_image(p).size == (128, 128) for p in report.images)


def test_pair_examples_uses_captions_beside_images(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for p in (a, b):
        Image.new("RGB", (40, 40)).save(p)
    (tmp_path / "a.txt").write_text("  a photo of sks toy on the moon \n")
    rows = pair_examples([a, b], "a photo of sks toy", use_captions=True)
    assert [r.instance_prompt for r in rows] == ["a photo of sks toy on the moon", "a photo of sks toy"]
    assert [r.instance_prompt for r in pair_examples([a], "p")] == ["p"]  # captions off by default


def test_with_use_captions_a_txt_beside_an_image_is_reported_as_its_caption(tmp_path):
    """Before: every .txt was skipped as "caption/metadata file; every image is trained with the
    instance prompt", even when data.use_captions trains each image with its .txt."""
    a, b, c = (_solid(tmp_path, f"{n}.png", color) for n, color in (("a", RED), ("b", GREEN), ("c", BLUE)))
    (tmp_path / "a.txt").write_text("  a photo of sks toy on the moon \n")
    (tmp_path / "b.txt").write_text("\n")  # empty: b trains with the instance prompt
    (tmp_path / "photo 4.txt").write_text("a photo of sks toy")  # no image of that name
    (tmp_path / "c.caption").write_text("not read: captions are name.txt")
    report = check_images(tmp_path, resolution=64, use_captions=True)
    a, b, c = (p.resolve() for p in (a, b, c))
    assert report.images == [a, b, c] and report.errors == []
    assert report.captions == {a: "a photo of sks toy on the moon"}
    assert {p.name for p in report.skipped} == {"photo 4.txt", "c.caption"}
    assert _by_name(report.issues, "a.txt", "info") == [
        "a.txt: caption of a.png: 'a photo of sks toy on the moon'"
    ]
    assert _by_name(report.issues, "b.txt", "warning") == [
        "b.txt is empty, so b.png trains with the instance prompt; write its caption in it or delete it"
    ]
    (orphan,) = _by_name(report.issues, "photo 4.txt", "warning")
    assert "no image of the same name (photo 4.jpg, photo 4.png, ...)" in orphan
    assert _by_name(report.issues, "c.caption", "info") == [
        "c.caption: skipped (caption/metadata file; captions are read from name.txt only)"
    ]
    assert not any("trained with the instance prompt" in i.message for i in report.issues)
    # What is reported is what training uses.
    rows = pair_examples(report.images, "a photo of sks toy", use_captions=True)
    assert {r.instance: r.instance_prompt for r in rows if r.instance in report.captions} == report.captions
    # Captions off: every .txt is an unused sidecar, as before.
    off = check_images(tmp_path, resolution=64)
    assert off.captions == {} and {"a.txt", "b.txt", "photo 4.txt"} <= {p.name for p in off.skipped}


def test_epoch_sampler_is_a_pure_function_of_seed_epoch_and_position():
    from dreambooth_kit.data.dataset import EpochSampler

    s = EpochSampler(7, seed=3)
    e0 = list(s)
    s.set_position(1, 0)
    e1 = list(s)
    assert {e for e, _ in e0} == {0} and {e for e, _ in e1} == {1}  # each row says its epoch
    assert sorted(i for _, i in e0) == list(range(7)) and [i for _, i in e0] != [i for _, i in e1]
    s.set_position(0, 4)
    assert list(s) == e0[4:] and len(s) == 3
    assert list(EpochSampler(7, seed=3)) == e0


# --- links and unreadable folders ---------------------------------------------------------------------------
def test_folder_that_is_a_symlink_loop_is_one_clear_error(tmp_path):
    loop = tmp_path / "photos"
    loop.symlink_to(loop)
    with pytest.raises(DataError) as exc:
        check_images(loop)
    assert str(exc.value) == (
        f"{loop}: a symbolic link on this path loops back on itself; point the setting at the real folder "
        "(`ls -l` shows where each link goes)"
    )


def test_links_inside_the_folder_say_what_is_wrong(tmp_path):
    for c, color in (("a", RED), ("b", GREEN), ("c", BLUE)):
        _solid(tmp_path, f"{c}.png", color)
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    (tmp_path / "good.png").symlink_to(tmp_path / "a.png")  # a working link is an image like any other
    (tmp_path / "again").symlink_to(tmp_path)  # a link back to the folder: never walked into
    report = check_images(tmp_path, resolution=64)
    errors = {i.path.name: i.message for i in report.errors}
    assert errors == {
        "gone.jpg": f"gone.jpg: a broken symbolic link (to {tmp_path / 'deleted.jpg'}, which is missing); "
        "replace it with the photo",
        "loop.jpg": "loop.jpg: a symbolic link that loops back on itself; replace it with the photo or delete it",
    }
    assert [p.name for p in report.images] == ["a.png", "b.png", "c.png", "good.png"]
    assert tmp_path / "again" in report.skipped


def test_issue_text_has_the_full_path_and_no_severity(tmp_path):
    issue = ImageIssue(tmp_path / "x.jpg", "warning", "x.jpg: too small")
    assert issue.text == f"{tmp_path / 'x.jpg'}: too small"
    assert str(issue) == f"WARNING {tmp_path / 'x.jpg'}: too small"
    assert ImageIssue(tmp_path, "error", "0 usable images").text == "0 usable images"


def test_epoch_sampler_fills_epochs_to_whole_batches_of_every_process_and_resumes_the_same():
    from dreambooth_kit.data.dataset import EpochSampler

    alone = EpochSampler(5, seed=3)
    assert len(alone) == 5 and sorted(i for _, i in alone) == [0, 1, 2, 3, 4]  # one process: nothing repeated
    two = EpochSampler(5, seed=3, multiple=2)
    order = list(two)
    assert len(order) == 6 and order[:5] == list(alone) and order[5] == order[0]
    two.set_position(0, 2)
    assert list(two) == order[2:]  # a resumed epoch ends with the same filling


def test_caption_dropout_trains_a_share_of_captioned_rows_with_the_bare_prompt(tmp_path):
    """data.caption_dropout: a captioned row trains with the instance prompt instead in about that
    share of (epoch, row) draws; an uncaptioned row is never changed; the draw is a pure function of
    (seed, epoch, row), so a resumed run drops the same rows, and crops and flips do not move."""
    from dreambooth_kit.data.dataset import DreamBoothDataset

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for p in (a, b):
        Image.new("RGB", (40, 40)).save(p)
    (tmp_path / "a.txt").write_text("a photo of sks toy on the moon")
    rows = pair_examples([a, b], "a photo of sks toy", use_captions=True)

    def prompts(p: float, seed: int = 5) -> list[tuple[str, str]]:
        ds = DreamBoothDataset.from_examples(
            rows, 32, latents=True, random_flip=True, seed=seed, caption_dropout=p
        )
        return [
            (ds[(e, i)]["instance_prompt"], ds[(e, i)]["instance_key"]) for e in range(200) for i in (0, 1)
        ]

    off, half = prompts(0.0), prompts(0.5)
    assert [k for _, k in off] == [k for _, k in half]  # the same flips
    captioned = [p for p, _ in half[0::2]]
    assert set(captioned) == {"a photo of sks toy on the moon", "a photo of sks toy"}
    assert 0.4 <= captioned.count("a photo of sks toy") / len(captioned) <= 0.6
    assert {p for p, _ in half[1::2]} == {"a photo of sks toy"}  # no caption: nothing to drop
    assert {p for p, _ in off[0::2]} == {"a photo of sks toy on the moon"}
    assert prompts(0.5) == half and prompts(0.5, seed=6) != half


@pytest.mark.parametrize(
    "overrides, expect",
    [
        (
            {"data.caption_dropout": 0.3},
            "data.caption_dropout: 0.3 drops captions, but data.use_captions is false",
        ),
        (
            {"data.use_captions": True, "data.caption_dropout": 1.0},
            "data.caption_dropout: 1.0 must be in [0, 1)",
        ),
        (
            {"data.use_captions": True, "data.caption_dropout": -0.1},
            "data.caption_dropout: -0.1 must be in [0, 1)",
        ),
    ],
)
def test_a_caption_dropout_that_cannot_work_is_refused_naming_the_field(tmp_path, overrides, expect):
    from dreambooth_kit.config import ConfigError, load_config

    base = {"data.instance_dir": str(tmp_path), "data.instance_prompt": "a photo of sks toy"}
    with pytest.raises(ConfigError, match=re.escape(expect)):
        load_config("tiny.yaml", {**base, **overrides})

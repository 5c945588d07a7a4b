"""Instance/class images: find them and load them one way (decoding, EXIF rotation, colour modes, captions);

No torch here: `dreambooth-kit check-data` runs this alone, in a fraction of a second (turning
images into training batches is dataset.py).

Every image that reaches training goes through `load_image`, and `check_images` runs that same decoder,
so what preflight accepts is exactly what the trainer will see: no image passes the check and then
fails (or decodes differently) at training step N.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dreambooth_kit.errors import UserError


def _avif_readable() -> bool:
    """Pillow reads AVIF where its build has the codec (the locked Pillow does; older ones need the
    pillow-avif-plugin): accepted exactly where it decodes."""
    from PIL import features

    try:
        return bool(features.check("avif"))
    except (ValueError, ImportError):  # a Pillow that does not know the feature's name at all
        return False


_AVIF = _avif_readable()
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp") + ((".avif",) if _AVIF else ())
CAPTION_EXTENSION = ".txt"  # kohya-style: photo.txt is photo.jpg's prompt (data.use_captions)
# Decoders PIL may use for our files. Without this list a renamed .tif/.gif/.avif would still be decoded
# by one of the ~40 other plugins; MPO (iPhone JPEGs) comes through the JPEG plugin.
_PIL_FORMATS = ("JPEG", "PNG", "WEBP", "BMP") + (("AVIF",) if _AVIF else ())
ACCEPTED = " ".join(IMAGE_EXTENSIONS)
_SEVERITIES = ("error", "warning", "info")

# OS/tool droppings: never images, never worth a warning.
_JUNK_NAMES = {".ds_store", "thumbs.db", "desktop.ini", "ehthumbs.db"}
# Sidecar files photo tools and captioning scripts put next to images (.aae = iPhone edit list).
_SIDECAR_EXTENSIONS = {".txt", ".caption", ".json", ".xmp", ".aae", ".yaml", ".csv"}
# Image formats we refuse with advice rather than decode: HEIC is the iPhone default and the
# most common surprise; GIF is refused by policy (animated, 256 colours).
_RAW_EXTENSIONS = {".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf", ".rw2", ".raf", ".raw"}
_UNSUPPORTED_EXTENSIONS = {
    ".heic", ".heif", ".avif", ".tif", ".tiff", ".gif", ".jxl", ".jp2", ".j2k", ".psd", ".svg", ".ico",
} - set(IMAGE_EXTENSIONS) | _RAW_EXTENSIONS  # fmt: skip
# How to get a .jpg from an iPhone's HEIC, which Pillow cannot read without a plugin.
HEIC_ADVICE = (
    "convert it to .jpg (macOS: sips -s format jpeg IMG.heic --out IMG.jpg; Linux: heif-convert IMG.heic "
    "IMG.jpg, from libheif-examples), or set the iPhone's Settings > Camera > Formats to Most Compatible"
)
SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


class DataError(UserError, ValueError):
    """A problem with the user's images; `issues` holds every error found, not just the first."""

    def __init__(self, message: str, issues: list[ImageIssue] | None = None) -> None:
        super().__init__(message)
        self.issues = list(issues or [])


@dataclass
class ImageIssue:
    path: Path
    severity: str  # "error" | "warning" | "info"
    message: str  # starts with the file name and says how to fix it

    def __post_init__(self) -> None:
        if self.severity not in _SEVERITIES:
            raise ValueError(f"severity must be one of {_SEVERITIES}, got {self.severity!r}")

    @property
    def text(self) -> str:
        """The message with the file's full path and without the severity (a log record has its own
        level; adding ours printed "WARNING WARNING ...")."""
        # Messages start with the bare name (readable in a list); the one-liner swaps in the absolute path.
        prefix = f"{self.path.name}: "
        if self.path.name and self.message.startswith(prefix):
            return f"{self.path}: {self.message[len(prefix) :]}"
        return self.message

    def __str__(self) -> str:
        return f"{self.severity.upper()} {self.text}"


@dataclass
class ImageReport:
    folder: Path
    images: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    issues: list[ImageIssue] = field(default_factory=list)
    # With use_captions: usable image -> the caption it trains with (its name.txt); others use the
    # instance prompt.
    captions: dict[Path, str] = field(default_factory=dict)
    # With buckets: each usable image's bucket (data.buckets), the size it trains at.
    buckets: dict[Path, tuple[int, int]] = field(default_factory=dict)

    @property
    def errors(self) -> list[ImageIssue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[ImageIssue]:
        return [i for i in self.issues if i.severity == "warning"]

    @property
    def infos(self) -> list[ImageIssue]:
        return [i for i in self.issues if i.severity == "info"]

    def raise_if_errors(self) -> None:
        errors = self.errors
        if not errors:
            return
        names = ", ".join(e.path.name for e in errors[:5]) + (", ..." if len(errors) > 5 else "")
        word = "problem" if len(errors) == 1 else "problems"
        summary = f"{len(errors)} {word} in {self.folder}: {names}"
        raise DataError("\n".join([summary, *(f"  {e}" for e in errors)]), issues=errors)


def resolve_folder(folder: str | Path) -> Path:
    # Absolute so every message names the real place, whatever the working directory was.
    given = Path(folder).expanduser()
    try:
        root = given.resolve()
    except (RuntimeError, OSError):  # a link loop: Python 3.11-3.12 raise RuntimeError, 3.13 OSError
        raise DataError(
            f"{given.absolute()}: a symbolic link on this path loops back on itself; point the setting "
            "at the real folder (`ls -l` shows where each link goes)"
        ) from None
    if not root.exists():
        raise DataError(f"image folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"{root} is a file, not a folder; pass the folder that holds the images")
    return root


def find_images(
    folder: str | Path, *, use_captions: bool = False
) -> tuple[list[Path], list[Path], list[ImageIssue]]:
    """(candidate images sorted by name, skipped paths, issues). Looks at the folder's top level only.

    With ``use_captions``, a ``name.txt`` beside an image is its caption: neither skipped nor listed
    here (check_images reports it with its image); one with no image of its name is a warning."""
    root = resolve_folder(folder)
    images: list[Path] = []
    skipped: list[Path] = []
    issues: list[ImageIssue] = []
    captions: list[Path] = []

    def skip(path: Path, why: str) -> None:
        skipped.append(path)
        issues.append(ImageIssue(path, "info", f"{path.name}: skipped ({why})"))

    try:
        entries = list(root.iterdir())
    except OSError as e:
        raise DataError(
            f"{root}: cannot list the folder ({e.strerror or e}); check its permissions"
        ) from None
    # Sorted by name: directory order differs between filesystems, and class-image selection
    # must pick the same files everywhere.
    for path in sorted(entries, key=lambda p: p.name):
        name, ext = path.name, path.suffix.lower()
        if name.lower() in _JUNK_NAMES or name.startswith("."):
            # Dotfiles include macOS "._IMG_1.jpg" AppleDouble files: .jpg names, but no pixels.
            skip(path, "hidden or system file")
        elif path.is_dir():
            skip(path, "folder; subfolders are not searched, move images up if they belong to the subject")
        elif ext in IMAGE_EXTENSIONS:
            if path.is_file():
                images.append(path)
            else:
                issues.append(ImageIssue(path, "error", f"{name}: {_not_a_file(path)}"))
        elif ext in _UNSUPPORTED_EXTENSIONS:
            issues.append(ImageIssue(path, "error", f"{name}: {_unsupported_advice(ext)}"))
        elif use_captions and path.suffix == CAPTION_EXTENSION:  # "a.TXT": read_caption would miss it
            captions.append(path)
        elif ext in _SIDECAR_EXTENSIONS:
            why = (
                "captions are read from name.txt only"
                if use_captions
                else "every image is trained with the instance prompt"
            )
            skip(path, f"caption/metadata file; {why}")
        else:
            skip(path, f"not an image; accepted: {ACCEPTED}")
    stems = {p.stem for p in images}
    for txt in captions:  # after the loop: "a.txt" sorts before "a.webp"
        if txt.stem not in stems:
            skipped.append(txt)
            issues.append(ImageIssue(txt, "warning", f"{txt.name}: {_orphan_caption(txt)}"))
    return images, skipped, issues


def _orphan_caption(txt: Path) -> str:
    return (
        f"caption file, but no image of the same name ({txt.stem}.jpg, {txt.stem}.png, ...) is beside it, "
        "so no image trains with it; name it after its image (photo.jpg -> photo.txt) or delete it"
    )


def _not_a_file(path: Path) -> str:
    """Why a name with an image extension is not a readable file (is_file() only says False)."""
    if path.is_symlink():
        try:
            os.stat(path)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return "a symbolic link that loops back on itself; replace it with the photo or delete it"
            return f"a broken symbolic link (to {os.readlink(path)}, which is missing); replace it with the photo"
    return "not a regular file (a device or pipe?); replace it with the photo"


def _unsupported_advice(ext: str) -> str:
    if ext == ".gif":
        return "format .gif is not supported (often animated, 256 colours); export the frame you want as .png"
    if ext in _RAW_EXTENSIONS:
        return f"camera RAW format {ext} is not supported; export it as .jpg or .png from your photo editor"
    if ext in (".heic", ".heif"):
        return f"format {ext} (the iPhone's) is not supported; {HEIC_ADVICE}"
    return f"format {ext} is not supported; convert it to .jpg or .png"


def _sniff(path: Path) -> str:
    """Name the real format of a file PIL refused, for the common 'renamed HEIC' case."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(12)
    except OSError:
        return ""
    if head[4:8] == b"ftyp":
        return "AVIF" if head[8:12] in (b"avif", b"avis") else "HEIC/HEIF"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return ""


@dataclass
class DecodeNotes:
    """What the decoder had to do, for check_images to report."""

    width: int
    height: int
    mode: str
    frames: int = 1
    transparent: bool = False
    exif_error: str = ""


def to_rgb(img: Image.Image) -> tuple[Image.Image, bool]:
    """Any PIL mode -> RGB uint8; returns (image, had transparent pixels)."""
    mode = img.mode
    if mode in SIXTEEN_BIT_MODES:
        # convert("RGB") clips 16-bit values at 255: a 0..65535 gradient becomes ~99% white.
        # Rescale instead: 65535 / 257 = 255 exactly.
        arr = np.asarray(img).astype(np.float32)
        img = Image.fromarray(np.clip(np.rint(arr / 257.0), 0, 255).astype(np.uint8), mode="L")
        mode = "L"
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        if rgba.getextrema()[3][0] < 255:
            # Stripping alpha would reveal whatever RGB the editor left under it (often the original
            # background); composite on white, the usual "no background" a viewer shows.
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB"), True
        return rgba.convert("RGB"), False  # alpha channel present but fully opaque: nothing to composite
    # CMYK, L, 1, P, YCbCr, ...: PIL's conversions are exact apart from CMYK (no colour profile).
    return (img if mode == "RGB" else img.convert("RGB")), False


def decode(path: Path, max_pixels: int | None = None) -> tuple[Image.Image, DecodeNotes]:
    """Open, check the header size, fully decode frame 0, EXIF-transpose, convert to RGB.

    Raises DataError with a reason (without the file name; callers add it)."""
    try:
        img = Image.open(path, formats=_PIL_FORMATS)
    except Image.DecompressionBombError as e:  # PIL refuses > 2x MAX_IMAGE_PIXELS before decoding
        raise DataError(f"too many pixels ({e}); downscale it, e.g. to 2048 px on the long side") from e
    except UnidentifiedImageError as e:
        real = _sniff(path)
        if real:
            advice = HEIC_ADVICE if real == "HEIC/HEIF" else "convert it to .jpg or .png"
            raise DataError(f"contains {real} data despite its name; {advice}") from e
        if path.stat().st_size == 0:
            raise DataError("cannot identify image file: it is empty (0 bytes); copy it again") from e
        raise DataError(
            "cannot identify image file: not JPEG/PNG/WebP/BMP data (a text or web page saved under an "
            "image name, or a failed download?); replace it or delete it"
        ) from e
    except OSError as e:
        raise DataError(f"cannot open: {e}") from e
    with img:
        width, height = img.size
        # Check the header size before decoding: a 20000x20000 PNG would allocate 1.2 GB.
        if max_pixels is not None and width * height > max_pixels:
            raise DataError(
                f"{width}x{height} = {width * height / 1e6:.1f} MP is over the limit of "
                f"{max_pixels / 1e6:.1f} MP (PIL.Image.MAX_IMAGE_PIXELS); not decoded. "
                "Downscale it, e.g. to 2048 px on the long side"
            )
        # MPO = a JPEG with extra images (iPhone depth or HDR gain maps, stereo pairs): frame 0 is the photo.
        frames = 1 if img.format == "MPO" else getattr(img, "n_frames", 1)
        notes = DecodeNotes(width, height, img.mode, frames=frames)
        try:
            # load(), not verify(): verify() only walks the chunk structure and passes a truncated JPEG,
            # which would then crash at training step N. PIL raises many types on bad data.
            img.load()
        except Exception as e:
            raise DataError(
                f"could not be fully decoded ({e}): the file is truncated or corrupt (an interrupted "
                "copy or download?); copy or export it again"
            ) from e
        try:
            # Phones store portrait shots landscape plus an orientation tag (6 or 8).
            oriented = ImageOps.exif_transpose(img)
        except Exception as e:  # broken EXIF should not cost the user a good photo
            oriented, notes.exif_error = img.copy(), str(e)
    rgb, notes.transparent = to_rgb(oriented)
    return rgb, notes


def load_image(path: str | Path) -> Image.Image:
    """The one loader for training and class images: always an RGB uint8 image, upright, frame 0."""
    path = Path(path)
    try:
        return decode(path)[0]
    except DataError as e:
        raise DataError(f"{path.resolve()}: {e}") from e


def caption_file(image: Path) -> Path:
    """Where ``image``'s caption lives: ``name.txt`` beside ``name.jpg`` (kohya-style)."""
    return Path(image).with_suffix(CAPTION_EXTENSION)


def read_caption(image: Path) -> str | None:
    """``name.txt`` beside ``name.jpg`` (kohya-style), stripped; None if absent or empty."""
    txt = caption_file(image)
    if not txt.is_file():
        return None
    return txt.read_text(encoding="utf-8", errors="replace").strip() or None

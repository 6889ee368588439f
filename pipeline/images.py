"""Image decode, validation and resizing as pure functions of bytes.

Every source image is fully decoded once (``Image.load``) so truncated and corrupt files are
found at conversion time, not in the middle of a training epoch. A bad image raises
:class:`ImageRejected` with a reason code from :data:`REJECT_REASONS`; callers record it and
go on with the next image.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from mltr.errors import ConfigError
from mltr.images import IMAGE_FORMATS, as_stored, special_file_kind

# Reason codes written to the rejects file (``_rejects-<run>.jsonl``) and counted in the manifest.
REJECT_REASONS = {
    "missing": "the file listed by the annotations does not exist",
    "unreadable": "the file is empty or not in a known image format",
    "truncated": "the image data ends early",
    "corrupt": "the image data cannot be decoded",
    "too_large": "the image has more pixels than the decompression-bomb limit",
    "bad_annotation": "the image's annotation file is missing, malformed or names an unknown class",
    "outside_root": "the annotations place the image outside the dataset root",
    "duplicate": "the annotations list the image id again (the first listing is kept)",
    "not_a_file": "the path is not a regular file (a folder, a FIFO, a device)",
}
# The most bytes read of one source image (the largest COCO image is a few MB): reads are capped, so
# a huge or endless file cannot exhaust memory; the decompression-bomb limit then caps the pixels.
MAX_FILE_BYTES = 256 * 2**20


class ImageRejected(Exception):
    """An input that cannot become a dataset row; ``reason`` is a key of :data:`REJECT_REASONS`."""

    def __init__(self, reason: str, detail: str):
        assert reason in REJECT_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


MIN_SIDE = 16  # the smallest longer side a stored image may be given (--max-side)


@dataclass(frozen=True)
class ImageSettings:
    max_side: int = 512  # longer side of stored images; larger images are downscaled
    quality: int = 90  # JPEG quality of re-encoded images
    max_pixels: int = Image.MAX_IMAGE_PIXELS or 89_478_485  # decompression-bomb limit (Pillow's default)

    def __post_init__(self):
        if self.max_side < MIN_SIDE:
            raise ConfigError(f"max_side must be at least {MIN_SIDE}, got {self.max_side}")
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"quality must be in 1..100, got {self.quality}")


def read_file(path: str, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """Read a source image; a missing, special or oversized file is a reject, not an exception that stops the run.

    The file is checked before it is opened: opening a FIFO would block the task forever. Any
    error of the file system (a name too long, a loop of links, an I/O error) or of the path
    itself (a NUL byte an annotation put in it) is this image's reject, not the batch's failure.
    """
    if "\0" in path:
        raise ImageRejected("unreadable", f"the path holds a NUL byte: {path!r}")
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ImageRejected("missing", f"no such file: {path}") from None
    except OSError as exc:
        raise ImageRejected("unreadable", f"{exc.strerror or exc}: {path}") from None
    kind = special_file_kind(info.st_mode)
    if kind:
        raise ImageRejected("not_a_file", f"a {kind}, not a regular file: {path}")
    if info.st_size > max_bytes:
        raise ImageRejected("too_large", f"{info.st_size} bytes, over the limit of {max_bytes}: {path}")
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except OSError as exc:
        raise ImageRejected("unreadable", f"{exc.strerror or exc}: {path}") from None
    if len(data) > max_bytes:  # grew after the check
        raise ImageRejected("too_large", f"over the limit of {max_bytes} bytes: {path}")
    return data


def process_image(data: bytes, settings: ImageSettings) -> tuple[bytes, int, int]:
    """Validate and normalise one encoded image: returns ``(jpeg_bytes, width, height)``.

    The original bytes are kept when the source is already an RGB JPEG within ``max_side``;
    anything else (grayscale, CMYK, PNG, too large) is converted to RGB, downscaled and
    re-encoded as JPEG. EXIF orientation is not applied: the stored pixels are the file's.
    """
    if not data:
        raise ImageRejected("unreadable", "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageRejected("too_large", str(exc)) from None
    except UnidentifiedImageError:
        raise ImageRejected("unreadable", "not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected("corrupt", f"bad image header: {exc}") from None

    width, height = img.size
    if width < 1 or height < 1:
        raise ImageRejected("corrupt", f"invalid size {width}x{height}")
    if width * height > settings.max_pixels:
        raise ImageRejected(
            "too_large",
            f"{width}x{height} = {width * height} pixels exceeds the limit of {settings.max_pixels}",
        )
    try:
        img.load()
    except OSError as exc:
        reason = "truncated" if "truncated" in str(exc) else "corrupt"
        raise ImageRejected(reason, str(exc)) from None
    except (SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise ImageRejected("corrupt", str(exc) or type(exc).__name__) from None

    return as_stored(img, data, settings.max_side, settings.quality)

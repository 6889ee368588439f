"""Images as the converter stores them: 8-bit RGB, the longer side at most ``max_side``, JPEG.
Pillow and numpy only (no torch), for the data pipeline's processes and the served model alike:
a served image is made what the converter would have stored before it is resized as validation
resizes, so the network sees what it was validated on."""

from __future__ import annotations

import stat
from typing import Any

import numpy as np

# The formats an image is read in, by the converter and the served model alike: raster formats
# Pillow decodes itself. Not EPS (Pillow hands it to Ghostscript) nor any other it would pass to
# an outside program: a served model decodes what any client posts.
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")  # JPEG includes MPO (its plugin)


def special_file_kind(mode: int) -> str | None:
    """``None`` for a regular file's ``st_mode``; else what it is ("folder", "FIFO", "special
    file"): an image path is checked before it is opened, as opening a FIFO blocks."""
    if stat.S_ISREG(mode):
        return None
    return "folder" if stat.S_ISDIR(mode) else "FIFO" if stat.S_ISFIFO(mode) else "special file"


def to_rgb(img: Any) -> Any:
    """A PIL image as 8-bit RGB, as the converter stores every image: what is transparent is put
    over white, 16-bit samples are scaled to 8 bits (not clipped), the first frame of an animation
    is the image."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if img.mode.startswith("I"):  # 16-bit grayscale ("I;16", or "I" holding 16-bit samples)
        samples = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
        return Image.fromarray((samples >> 8).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def scaled_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The size after downscaling so the longer side is at most ``max_side`` (never upscales)."""
    longest = max(width, height)
    if longest <= max_side:
        return width, height
    # Integer arithmetic: the longer side becomes exactly max_side.
    if width >= height:
        return max_side, max(1, (height * max_side + width // 2) // width)
    return max(1, (width * max_side + height // 2) // height), max_side


def kept_as_is(img: Any, max_side: int) -> bool:
    """Whether the converter stores an image's own bytes: an RGB JPEG within ``max_side``."""
    return img.format == "JPEG" and img.mode == "RGB" and scaled_size(*img.size, max_side) == img.size


def as_stored(img: Any, data: bytes, max_side: int, quality: int) -> tuple[bytes, int, int]:
    """``(jpeg_bytes, width, height)`` the converter stores of the PIL image ``img`` (``data``, its
    encoded bytes): ``data`` itself when :func:`kept_as_is`, else the image as 8-bit RGB
    (:func:`to_rgb`), downscaled (bicubic) so its longer side is ``max_side``, re-encoded as a
    JPEG of ``quality``. Pillow's errors of decoding ``img`` propagate."""
    import io

    from PIL import Image

    if kept_as_is(img, max_side):
        return data, img.width, img.height
    target = scaled_size(img.width, img.height, max_side)
    rgb = to_rgb(img)
    if target != rgb.size:
        rgb = rgb.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality)
    return out.getvalue(), rgb.width, rgb.height

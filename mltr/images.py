"""Decoded images as the converter stores them: 8-bit RGB. Pillow and numpy only (no torch), for
the data pipeline's processes and the served model alike."""

from __future__ import annotations

import stat
from typing import Any

import numpy as np


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

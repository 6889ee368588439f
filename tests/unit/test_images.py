import io

import numpy as np
import pytest
from PIL import Image

from mltr.images import scaled_size
from pipeline.images import ImageRejected, ImageSettings, process_image, read_file

pytestmark = pytest.mark.unit


def encoded(mode="RGB", size=(120, 80), fmt="JPEG") -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, size=(size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(pixels, "RGB").convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt, quality=90) if fmt == "JPEG" else img.save(buf, fmt)
    return buf.getvalue()


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_rgb_jpeg_within_size_keeps_original_bytes():
    data = encoded()
    out, w, h = process_image(data, ImageSettings(max_side=512))
    assert out == data and (w, h) == (120, 80)


def test_large_image_is_downscaled_to_max_side_keeping_aspect():
    out, w, h = process_image(encoded(size=(400, 300)), ImageSettings(max_side=100))
    img = decode(out)
    assert (w, h) == img.size == (100, 75)
    assert img.format == "JPEG" and img.mode == "RGB"


def test_portrait_image_downscales_on_height():
    _, w, h = process_image(encoded(size=(90, 301)), ImageSettings(max_side=150))
    assert (w, h) == (45, 150)


@pytest.mark.parametrize(
    ("mode", "fmt"), [("L", "JPEG"), ("CMYK", "JPEG"), ("RGB", "PNG"), ("RGBA", "PNG"), ("P", "PNG")]
)
def test_non_rgb_or_non_jpeg_becomes_rgb_jpeg(mode, fmt):
    data = encoded(mode=mode, fmt=fmt)
    out, w, h = process_image(data, ImageSettings())
    img = decode(out)
    assert out != data
    assert img.format == "JPEG" and img.mode == "RGB" and img.size == (w, h) == (120, 80)


def test_grayscale_pixels_survive_conversion():
    out, _, _ = process_image(encoded(mode="L"), ImageSettings())
    pixels = np.asarray(decode(out)).astype(int)
    source = np.asarray(decode(encoded(mode="L"))).astype(int)
    # Each of the three channels is the source's gray, up to JPEG error (the noise source's pixels
    # are ~41 levels from their mean: a flat or lost image is far off).
    assert pixels.shape == (*source.shape, 3)
    assert np.abs(pixels - source[..., None]).mean() < 3


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "unreadable"),
        (b"<html>not found</html>", "unreadable"),
        (encoded()[:-600], "truncated"),
    ],
)
def test_bad_bytes_are_rejected_with_reason(data, reason):
    with pytest.raises(ImageRejected) as info:
        process_image(data, ImageSettings())
    assert info.value.reason == reason


def test_broken_huffman_table_is_corrupt():
    data = bytearray(encoded())
    dht = data.find(b"\xff\xc4")
    data[dht + 4 : dht + 30] = b"\xff" * 26
    with pytest.raises(ImageRejected) as info:
        process_image(bytes(data), ImageSettings())
    assert info.value.reason == "corrupt"


def test_decompression_bomb_is_a_reject_not_a_crash():
    with pytest.raises(ImageRejected) as info:
        process_image(encoded(size=(120, 80)), ImageSettings(max_pixels=120 * 80 - 1))
    assert info.value.reason == "too_large"
    assert "9600 pixels" in info.value.detail


def test_pillow_bomb_error_is_a_reject(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageRejected) as info:
        process_image(encoded(size=(120, 80)), ImageSettings())
    assert info.value.reason == "too_large"


def test_read_file_missing_and_directory(tmp_path):
    with pytest.raises(ImageRejected) as info:
        read_file(str(tmp_path / "nope.jpg"))
    assert info.value.reason == "missing" and "nope.jpg" in info.value.detail
    with pytest.raises(ImageRejected) as info:
        read_file(str(tmp_path))
    assert info.value.reason == "not_a_file" and "a folder" in info.value.detail


@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [
        ((640, 480), 512, (512, 384)),
        ((480, 640), 448, (336, 448)),
        ((100, 50), 512, (100, 50)),
        ((1000, 1), 10, (10, 1)),
    ],
)
def test_scaled_size(size, max_side, expected):
    assert scaled_size(*size, max_side) == expected


def test_settings_are_validated():
    with pytest.raises(ValueError, match="max_side"):
        ImageSettings(max_side=4)
    with pytest.raises(ValueError, match="quality"):
        ImageSettings(quality=0)

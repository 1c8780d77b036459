"""Decoding, the part every task shares: formats, modes, EXIF, limits, JPEG draft."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.images import ImageError, ImageTooLarge, decode, decode_with_size
from tests.support import encode, exif_rotated_jpeg, photo


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("RGB", "JPEG"), ("RGB", "PNG"), ("RGB", "WEBP"), ("L", "PNG"), ("LA", "PNG"), ("RGBA", "PNG"),
     ("CMYK", "JPEG"), ("P", "PNG"), ("I;16", "PNG"), ("1", "PNG")],
)  # fmt: skip
def test_every_mode_becomes_rgb(mode: str, fmt: str) -> None:
    image = decode(encode(photo().convert(mode), fmt), max_pixels=10**7)
    assert image.mode == "RGB"
    assert image.size == (320, 240)


def test_transparency_is_composited_on_white() -> None:
    clear = Image.new("RGBA", (40, 30), (255, 0, 0, 0))
    assert decode(encode(clear, "PNG"), 10**7).getpixel((5, 5)) == (255, 255, 255)


def test_exif_orientation_is_applied() -> None:
    upright = photo((320, 240))
    decoded = decode(exif_rotated_jpeg(upright), 10**7)
    assert decoded.size == (320, 240)
    difference = np.abs(np.asarray(decoded, np.int16) - np.asarray(upright, np.int16)).mean()
    flipped = np.abs(np.asarray(decoded, np.int16) - np.asarray(upright.rotate(180), np.int16)).mean()
    assert difference < 30 < 60 < flipped  # JPEG loss only (the photo is noisy), not a turned image


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    ramp = np.tile(np.linspace(0, 65535, 64, dtype=np.uint16), (8, 1))
    decoded = np.asarray(decode(encode(Image.fromarray(ramp), "PNG"), 10**7))
    assert decoded[0, 0, 0] == 0
    assert decoded[0, -1, 0] == 255
    assert 100 < decoded[0, 32, 0] < 160


def test_pixel_limit_is_checked_before_decoding() -> None:
    big = encode(Image.new("L", (3000, 3000)), "PNG")
    with pytest.raises(ImageTooLarge, match="3000x3000"):
        decode(big, max_pixels=1_000_000)


@pytest.mark.parametrize("data", [b"", b"\x00" * 100, b"not an image at all", encode(photo(), "JPEG")[:300]])
def test_undecodable_bytes(data: bytes) -> None:
    with pytest.raises(ImageError):
        decode(data, 10**7)


def test_png_bomb_header_is_refused_cheaply() -> None:
    """A 30,000 x 30,000 PNG of one colour is small on the wire but 900 MP decoded."""
    buffer = io.BytesIO()
    Image.new("1", (30000, 30000)).save(buffer, format="PNG")
    with pytest.raises(ImageTooLarge):
        decode(buffer.getvalue(), max_pixels=40_000_000)


def test_drafted_jpeg_reports_its_full_upright_size() -> None:
    image = photo((1400, 700))
    for data in (encode(image, "JPEG"), exif_rotated_jpeg(image)):
        decoded, full = decode_with_size(data, 10**8, draft_short_side=320)
        assert decoded.size == (700, 350)  # decoded at 1/2 scale
        assert full == (1400, 700)
    # Nearly square: 1002x1001 upright decodes to 501x501 (rounded up), the full size still turns.
    decoded, full = decode_with_size(exif_rotated_jpeg(photo((1002, 1001))), 10**8, draft_short_side=320)
    assert decoded.size == (501, 501)
    assert full == (1002, 1001)

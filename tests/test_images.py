from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.images import (
    ImageError,
    ImageTooLarge,
    Letterbox,
    Preprocess,
    decode,
    decode_with_size,
    letterbox,
    letterbox_size,
    preprocess,
    resize_linear,
)
from tests.images import encode, exif_rotated_jpeg, photo

SPEC = Preprocess(resize_to_cover=(256, 256), crop=(224, 224), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


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


def test_jpeg_draft_decodes_large_photos_at_reduced_scale_but_covers_the_target() -> None:
    data = encode(photo((1920, 1080)), "JPEG", quality=90)
    image = decode(data, 10**7, draft_short_side=256)
    assert min(image.size) >= 256
    assert image.size[0] < 1920  # decoded at 1/2 or 1/4 scale
    full = preprocess(decode(data, 10**7), SPEC)
    drafted = preprocess(image, SPEC)
    assert np.abs(full - drafted).mean() < 0.1  # normalised units: a small resampling difference


def test_preprocess_matches_the_official_eval_transform() -> None:
    """Resize short side to 256 (bicubic), centre crop 224, /255, mean/std, CHW - computed by hand here."""
    image = photo((300, 200))
    out = preprocess(image, SPEC)
    assert out.shape == (3, 224, 224)
    assert out.dtype == np.float32
    resized = image.resize((384, 256), Image.Resampling.BICUBIC)  # 300x200 -> short side 256
    left, top = round((384 - 224) / 2), round((256 - 224) / 2)
    crop = np.asarray(resized.crop((left, top, left + 224, top + 224)), np.float32) / 255
    expected = ((crop - np.array(SPEC.mean, np.float32)) / np.array(SPEC.std, np.float32)).transpose(2, 0, 1)
    assert np.allclose(out, expected, atol=1e-6)


def test_png_bomb_header_is_refused_cheaply() -> None:
    """A 30,000 x 30,000 PNG of one colour is small on the wire but 900 MP decoded."""
    buffer = io.BytesIO()
    Image.new("1", (30000, 30000)).save(buffer, format="PNG")
    with pytest.raises(ImageTooLarge):
        decode(buffer.getvalue(), max_pixels=40_000_000)


def test_non_square_crops_cover_both_sides() -> None:
    """256x320 crop: resized to cover 292x365 whatever the image's shape, so no padding is needed."""
    spec = Preprocess(resize_to_cover=(292, 365), crop=(256, 320), mean=SPEC.mean, std=SPEC.std)
    for size in ((300, 600), (600, 300), (500, 500)):
        out = preprocess(photo(size), spec)
        assert out.shape == (3, 256, 320)
        black = ((0 - np.array(spec.mean)) / np.array(spec.std)).reshape(3, 1, 1)
        assert not np.isclose(out, black, atol=1e-4).all(axis=0).any()  # no zero-padded border pixel


def test_extreme_aspect_ratios_are_cheap() -> None:
    """A 1x40000 strip: only the cropped region is ever resized (not a 256 x 10,240,000 image)."""
    import resource
    import time

    strip = Image.new("RGB", (1, 40000), (10, 200, 30))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    out = preprocess(decode(encode(strip, "PNG"), 10**7), SPEC)
    assert out.shape == (3, 224, 224)
    assert time.perf_counter() - start < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KiB: far below the 10 GB


@pytest.mark.parametrize(
    ("source", "target"),
    [((480, 640), (427, 320)), ((1080, 1920), (640, 360)), ((100, 37), (320, 865)), ((1, 4000), (1, 320)),
     ((3, 5), (640, 384)), ((701, 1399), (320, 160)), ((480, 640), (640, 480))],
)  # fmt: skip
def test_letterbox_resize_is_opencv_bilinear(source: tuple[int, int], target: tuple[int, int]) -> None:
    """mmdetection resizes with cv2.INTER_LINEAR (no smoothing when shrinking): within one level of it."""
    import cv2

    pixels = np.random.default_rng(0).integers(0, 256, (*source, 3), dtype=np.uint8)
    expected = cv2.resize(pixels, target, interpolation=cv2.INTER_LINEAR).reshape(target[1], target[0], 3)
    got = resize_linear(pixels, target)
    assert got.shape == expected.shape
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def test_letterbox_places_the_image_top_left_and_pads_with_the_mean() -> None:
    spec = Letterbox(canvas=(320, 320), mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    assert letterbox_size(121, 200, spec.canvas) == (194, 320)  # int(121 * 1.6 + 0.5)
    assert letterbox_size(1, 40000, spec.canvas) == (1, 320)
    boxed = letterbox(Image.new("RGB", (121, 200), (255, 255, 255)), spec)
    assert (boxed.image_size, boxed.resized, boxed.scale) == ((121, 200), (194, 320), (194 / 121, 1.6))
    white = (1 - np.asarray(spec.mean)) / np.asarray(spec.std)
    np.testing.assert_allclose(
        boxed.pixels[:, :, :194], np.broadcast_to(white[:, None, None], (3, 320, 194)), rtol=1e-6
    )
    assert not boxed.pixels[:, :, 194:].any()  # zero after normalisation: the mean colour


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

"""camserve.images: every format decodes to RGB, EXIF orientation applies, bad data is a clear 4xx."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from camserve.images import ImageError, decode_image, preprocess


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_formats_decode_to_rgb(fmt: str, image_bytes):
    img = Image.new("RGB", (40, 30), (200, 20, 20))
    out = decode_image(image_bytes(img, fmt=fmt))
    assert out.mode == "RGB" and out.size == (40, 30)
    assert np.asarray(out)[15, 20, 0] > 150


def test_gif_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    px = np.asarray(decode_image(buf.getvalue()))[4, 4]
    assert px[0] > 200 and px[2] < 50


def test_exif_orientation_applied(image_bytes):
    img = Image.new("RGB", (40, 20), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    out = decode_image(image_bytes(img, fmt="JPEG", exif=exif.tobytes()))
    assert out.size == (20, 40)


def test_transparency_on_white(image_bytes):
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert tuple(np.asarray(decode_image(image_bytes(img, fmt="PNG")))[0, 0]) == (255, 255, 255)


@pytest.mark.parametrize("data,match", [
    (b"", "empty body"),
    (b"hello world!", r"cannot identify image data \(12 bytes\)"),
])
def test_bad_data_is_400(data: bytes, match: str):
    with pytest.raises(ImageError, match=match) as ei:
        decode_image(data)
    assert ei.value.code == 400 and ei.value.type == "InvalidImage"


def test_truncated_jpeg_is_400(image_bytes):
    rng = np.random.default_rng(0)
    data = image_bytes(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), fmt="JPEG")
    with pytest.raises(ImageError, match="truncated") as ei:
        decode_image(data[: len(data) // 2])
    assert ei.value.code == 400


def test_pixel_limit_checked_before_decoding(image_bytes):
    data = image_bytes(Image.new("L", (3000, 3000)), fmt="PNG")  # 9 MP, compresses to a few KB
    with pytest.raises(ImageError, match="exceeds the limit of 1000000 pixels") as ei:
        decode_image(data, max_pixels=1_000_000)
    assert ei.value.code == 413 and ei.value.type == "ImageTooLarge"
    assert Image.MAX_IMAGE_PIXELS is not None  # the global guard is untouched


def test_preprocess_resizes_and_normalises():
    img = Image.new("RGB", (50, 20), (255, 0, 128))
    x = preprocess(img, (16, 24), (0.5, 0.5, 0.5), (0.5, 0.25, 1.0))
    assert x.shape == (3, 16, 24) and str(x.dtype) == "torch.float32"
    assert abs(x[0].mean().item() - 1.0) < 1e-6 and abs(x[1].mean().item() + 2.0) < 1e-6

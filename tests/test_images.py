"""camserve.images: every allowed format decodes to RGB, EXIF orientation applies, 16-bit and float
images are scaled, other formats are refused, and any bytes give an RGB image or an ImageError."""
from __future__ import annotations

import io
import statistics
import struct
import time
import zlib
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from camserve.images import (DEFAULT_FORMATS, KNOWN_FORMATS, ImageError, check_formats,
                             decode_image, preprocess, to_rgb)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_formats_decode_to_rgb(fmt: str):
    img = Image.new("RGB", (40, 30), (200, 20, 20))
    out = decode_image(_encode(img, fmt))
    assert out.mode == "RGB" and out.size == (40, 30)
    assert np.asarray(out)[15, 20, 0] > 150


def test_gif_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    px = np.asarray(decode_image(buf.getvalue()))[4, 4]
    assert px[0] > 200 and px[2] < 50


def test_exif_orientation_applied():
    img = Image.new("RGB", (40, 20), "white")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    out = decode_image(_encode(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (20, 40)


def test_transparency_on_white():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert tuple(np.asarray(decode_image(_encode(img, "PNG")))[0, 0]) == (255, 255, 255)


@pytest.mark.parametrize("data,match", [
    (b"", "empty body"),
    (b"hello world!", r"cannot identify image data \(12 bytes\)"),
])
def test_bad_data_is_400(data: bytes, match: str):
    with pytest.raises(ImageError, match=match) as ei:
        decode_image(data)
    assert ei.value.code == 400 and ei.value.type == "InvalidImage"


def test_truncated_jpeg_is_400():
    rng = np.random.default_rng(0)
    data = _encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(ImageError, match="truncated") as ei:
        decode_image(data[: len(data) // 2])
    assert ei.value.code == 400


def test_pixel_limit_checked_before_decoding():
    data = _encode(Image.new("L", (3000, 3000)), "PNG")  # 9 MP, compresses to a few KB
    with pytest.raises(ImageError, match="exceeds the limit of 1000000 pixels") as ei:
        decode_image(data, max_pixels=1_000_000)
    assert ei.value.code == 413 and ei.value.type == "ImageTooLarge"
    assert Image.MAX_IMAGE_PIXELS is not None  # the global guard is untouched


def test_preprocess_resizes_and_normalises():
    img = Image.new("RGB", (50, 20), (255, 0, 128))
    x = preprocess(img, (16, 24), (0.5, 0.5, 0.5), (0.5, 0.25, 1.0))
    assert x.shape == (3, 16, 24) and str(x.dtype) == "torch.float32"
    assert abs(x[0].mean().item() - 1.0) < 1e-6 and abs(x[1].mean().item() + 2.0) < 1e-6


# ------------------------------------------------------------------------------- format allow-list

def _pcx() -> bytes:
    return _encode(Image.new("RGB", (8, 8), (10, 200, 10)), "PCX")


def test_public_format_lists():
    assert DEFAULT_FORMATS == ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
    assert set(DEFAULT_FORMATS) <= KNOWN_FORMATS
    assert "EPS" not in KNOWN_FORMATS and "MPO" not in KNOWN_FORMATS


def test_format_outside_list_is_400_naming_it_and_the_allowed_ones():
    with pytest.raises(ImageError) as ei:
        decode_image(_pcx())
    assert ei.value.code == 400 and ei.value.type == "InvalidImage"
    assert str(ei.value) == ("unsupported image format PCX (176 bytes); allowed formats: "
                             "JPEG, PNG, WEBP, BMP, GIF, TIFF")


def test_allow_list_is_configurable():
    assert decode_image(_pcx(), formats=["pcx"]).getpixel((4, 4)) == (10, 200, 10)
    assert decode_image(_pcx(), formats="JPEG, PCX").size == (8, 8)
    png = _encode(Image.new("RGB", (4, 4)), "PNG")
    with pytest.raises(ImageError, match=r"unsupported image format PNG \(\d+ bytes\); "
                                         r"allowed formats: JPEG$"):
        decode_image(png, formats=["JPEG"])


@pytest.mark.parametrize("formats,match", [
    (["JPEG", "EPS"], r"invalid value for formats: 'EPS' \(allowed: AVIF, BLP, BMP"),
    ("PNG,SVG", r"invalid value for formats: 'SVG'"),
    ([], r"invalid value for formats: empty \(allowed: AVIF, BLP"),
    (" , ", r"invalid value for formats: empty"),
    ([b"PNG"], r"invalid value for formats: b'PNG' is not a name"),
    ([["PNG"]], r"invalid value for formats: \['PNG'\] is not a name"),
    (["X" * 500], r"invalid value for formats: 'XXXX"),
    (42, r"invalid value for formats: 42 \(a comma-separated string or a list of names"),
])
def test_bad_formats_are_value_errors(formats, match: str):
    png = _encode(Image.new("RGB", (4, 4)), "PNG")
    with pytest.raises(ValueError, match=match) as ei:
        decode_image(png, formats=formats)
    assert not isinstance(ei.value, ImageError)
    assert len(str(ei.value)) < 400  # an echoed name is cut


def test_check_formats_normalises():
    assert check_formats("jpeg, PNG ,png") == ("JPEG", "PNG")
    assert check_formats(("tiff",)) == ("TIFF",)


@pytest.mark.parametrize("max_pixels", [0, -1, 1.5, True, "100"])
def test_bad_max_pixels_is_value_error(max_pixels):
    with pytest.raises(ValueError, match="max_pixels must be a positive integer") as ei:
        decode_image(b"x", max_pixels=max_pixels)
    assert not isinstance(ei.value, ImageError)


def test_plugins_outside_the_list_never_parse(monkeypatch):
    """EPS (Ghostscript) and DDS files are identified by signature only; their parsers never run."""
    from PIL import DdsImagePlugin, EpsImagePlugin
    calls = []
    for plugin in (EpsImagePlugin.EpsImageFile, DdsImagePlugin.DdsImageFile):
        original = plugin._open

        def spy(self, _original=original, _name=plugin.format):
            calls.append(_name)
            return _original(self)
        monkeypatch.setattr(plugin, "_open", spy)
    small = Image.new("RGB", (8, 8))
    for fmt in ("EPS", "DDS"):
        with pytest.raises(ImageError, match=f"unsupported image format {fmt} "):
            decode_image(_encode(small, fmt))
    assert calls == []
    decode_image(_encode(small, "DDS"), formats=["DDS"])  # the spy works when DDS is allowed
    assert calls == ["DDS"]


def test_mpo_counts_as_jpeg():
    img = Image.new("RGB", (16, 12), (220, 30, 30))
    data = _encode(img, "MPO", save_all=True, append_images=[Image.new("RGB", (16, 12), "blue")])
    assert Image.open(io.BytesIO(data)).format == "MPO"
    assert decode_image(data).getpixel((8, 6))[0] > 200
    with pytest.raises(ImageError, match="unsupported image format"):
        decode_image(data, formats=["PNG"])


# ---------------------------------------------------------------------- any decoder error is a 400

DECODER_ERRORS = [NotImplementedError("no"), TypeError("bad type"), struct.error("unpack"),
                  IndexError("index"), KeyError("key"), ZeroDivisionError("div"),
                  MemoryError(), RecursionError("deep"), EOFError(), SyntaxError("syntax"),
                  OSError("broken"), ValueError("value"), RuntimeError("runtime"),
                  SystemError("system")]


@pytest.mark.parametrize("exc", DECODER_ERRORS, ids=lambda e: type(e).__name__)
@pytest.mark.parametrize("stage", ["open", "load", "exif", "convert"])
def test_any_decoder_exception_is_invalid_image(monkeypatch, exc: BaseException, stage: str):
    from PIL import ImageFile

    def boom(*args, **kwargs):
        raise exc

    data = _encode(Image.new("L", (10, 10), 7), "PNG")
    if stage == "open":
        monkeypatch.setattr(Image, "open", boom)
    elif stage == "load":
        monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
    elif stage == "exif":
        monkeypatch.setattr(Image.Image, "getexif", boom)
    else:
        monkeypatch.setattr(Image.Image, "convert", boom)
    if stage == "exif":  # unreadable EXIF is ignored: the pixels are still good
        assert decode_image(data).getpixel((0, 0)) == (7, 7, 7)
        return
    with pytest.raises(ImageError) as ei:
        decode_image(data)
    assert ei.value.code == 400 and ei.value.type == "InvalidImage"
    assert f"({len(data)} bytes)" in str(ei.value) and type(exc).__name__ in str(ei.value)
    if stage != "open":
        assert "PNG" in str(ei.value)


def test_messages_are_short_and_never_echo_the_data(monkeypatch):
    from PIL import ImageFile
    secret = b"SECRET-PAYLOAD-" * 1000
    with pytest.raises(ImageError) as ei:
        decode_image(secret)
    assert "SECRET" not in str(ei.value)

    def boom(self):
        raise OSError("\n".join(["x" * 50] * 1000))
    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
    with pytest.raises(ImageError) as ei:
        decode_image(_encode(Image.new("RGB", (4, 4)), "PNG"))
    assert len(str(ei.value)) < 250 and "\n" not in str(ei.value)


@pytest.mark.parametrize("data", [bytearray(b"GIF89a"), memoryview(b"\x89PNG\r\n\x1a\n")])
def test_buffer_types_accepted(data):
    with pytest.raises(ImageError, match=r"not a valid (GIF|PNG) image"):
        decode_image(data)


def test_non_bytes_is_invalid_image():
    with pytest.raises(ImageError, match="expected bytes, got str"):
        decode_image("not bytes")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ bombs: never decoded

def _gif_screen(w: int, h: int) -> bytes:
    return (b"GIF89a" + struct.pack("<HHBBB", w, h, 0x80, 0, 0) + b"\xff\x00\x00\x00\x00\xff"
            + b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00\x3b")


def test_bomb_refused_without_decoding_pixels(monkeypatch):
    from PIL import ImageFile
    loads = []
    original = ImageFile.ImageFile.load

    def spy(self):
        loads.append(self.size)
        return original(self)
    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    data = _gif_screen(8000, 8000)
    assert len(data) < 40
    with pytest.raises(ImageError, match=r"GIF 8000x8000 = 64000000 pixels exceeds the limit of "
                                         r"40000000 pixels") as ei:
        decode_image(data)
    assert ei.value.code == 413 and ei.value.type == "ImageTooLarge"
    assert loads == []
    decode_image(_gif_screen(8, 8))  # the spy does see a load when the image is small enough
    assert loads and set(loads) == {(8, 8)}


def test_bomb_refusal_is_cheap():
    data = _gif_screen(8000, 8000)
    times = []
    for _ in range(15):
        t0 = time.perf_counter()
        with pytest.raises(ImageError):
            decode_image(data)
        times.append(time.perf_counter() - t0)
    assert statistics.median(times) < 0.02, times  # decoding it would take ~0.2 s and 64 MB


def test_beyond_pillow_limit_is_413_too():
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 65535, 65535, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    with pytest.raises(ImageError, match="image too large: the PNG header declares more than "
                                         r"178956970 pixels; the limit is 1000000000000 pixels") as ei:
        decode_image(data, max_pixels=10**12)
    assert ei.value.code == 413


# --------------------------------------------------------------------------- modes and bit depths

@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_mid_grey_stays_mid_grey(fmt: str):
    img = Image.fromarray(np.full((8, 8), 32768, np.uint16))
    assert img.mode == "I;16"
    out = decode_image(_encode(img, fmt))
    assert out.mode == "RGB" and out.getpixel((4, 4)) == (128, 128, 128)


def test_16bit_big_endian_tiff():
    img = Image.frombytes("I;16B", (4, 4), np.full((4, 4), 65535, ">u2").tobytes())
    assert decode_image(_encode(img, "TIFF")).getpixel((1, 1)) == (255, 255, 255)


@pytest.mark.parametrize("values,expected", [
    (np.full((3, 3), 0.5, np.float32), 128),                          # [0, 1]: x 255
    (np.full((3, 3), 1.0, np.float32), 255),
    (np.array([[-1.0, 0.0, 1.0]] * 3, np.float32), 128),              # outside [0, 1]: min-max
    (np.array([[0.0, 500.0, 1000.0]] * 3, np.float32), 128),
    (np.full((3, 3), 300.0, np.float32), 255),                        # constant: clipped
    (np.full((3, 3), np.nan, np.float32), 0),                         # NaN: 0
    (np.array([[0.0, 0.5, np.inf]] * 3, np.float32), 128),            # inf clipped to the range
    (np.full((3, 3), 32768, np.int32), 128),                          # I within 0..65535: 16-bit
    (np.array([[-10, 0, 10]] * 3, np.int32), 128),                    # I negative: min-max
])
def test_float_and_int_rule(values: np.ndarray, expected: int):
    img = Image.fromarray(values)
    assert img.mode in ("F", "I")
    assert to_rgb(img).getpixel((1, 1)) == (expected,) * 3
    assert decode_image(_encode(img, "TIFF")).getpixel((1, 1)) == (expected,) * 3


@pytest.mark.parametrize("mode,color,expected", [
    ("P", None, (0, 0, 0)),
    ("1", 1, (255, 255, 255)),
    ("L", 77, (77, 77, 77)),
    ("LA", (0, 0), (255, 255, 255)),
    ("RGBA", (0, 0, 0, 0), (255, 255, 255)),
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ("YCbCr", (76, 85, 255), (254, 0, 0)),
])
def test_modes_to_rgb(mode: str, color, expected):
    img = Image.new(mode, (4, 4), color)
    out = decode_image(_encode(img, "TIFF"))
    assert out.mode == "RGB"
    assert max(abs(a - b) for a, b in zip(out.getpixel((2, 2)), expected)) <= 2


def test_la_premultiplied_to_rgb():
    assert to_rgb(Image.new("La", (2, 2), (0, 0))).getpixel((0, 0)) == (255, 255, 255)


# ----------------------------------------------------------------------------- property-based tests

_SETTINGS = settings(max_examples=200, deadline=timedelta(seconds=2), database=None,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
_LIMIT = 1_000_000  # bounds the work a mutated header can ask for


def _decodes_or_image_error(data: bytes, **kw) -> None:
    try:
        img = decode_image(data, max_pixels=_LIMIT, **kw)
    except ImageError as exc:
        assert exc.code in (400, 413) and exc.type in ("InvalidImage", "ImageTooLarge")
        assert len(str(exc)) < 400
    else:
        assert img.mode == "RGB" and img.width * img.height <= _LIMIT
        assert np.asarray(img).shape == (img.height, img.width, 3)


def _bases() -> dict[str, bytes]:
    rng = np.random.default_rng(3)
    rgb = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [Image.new("RGB", (6, 6), c) for c in ("red", "blue")]
    return {
        "png": _encode(rgb, "PNG"),
        "png16": _encode(Image.fromarray(np.full((6, 6), 32768, np.uint16)), "PNG"),
        "png_palette": _encode(rgb.convert("P"), "PNG"),
        "jpeg": _encode(rgb, "JPEG", quality=80),
        "jpeg_exif": _encode(rgb, "JPEG", exif=exif.tobytes()),
        "progressive_jpeg": _encode(rgb, "JPEG", progressive=True),
        "gif": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "tiff": _encode(rgb, "TIFF"),
        "tiff_lzw": _encode(rgb, "TIFF", compression="tiff_lzw"),
        "tiff_float": _encode(Image.fromarray(np.full((4, 4), 0.25, np.float32)), "TIFF"),
        "webp": _encode(rgb, "WEBP", quality=80),
        "webp_lossless_anim": _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:],
                                      lossless=True),
        "bmp": _encode(rgb, "BMP"),
        "bmp_rle": _encode(rgb.convert("P"), "BMP"),
    }


BASES = _bases()


@st.composite
def mutated_images(draw) -> bytes:
    data = bytearray(BASES[draw(st.sampled_from(sorted(BASES)))])
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "header", "field", "insert"]))
        n = len(data)
        if n == 0:
            break
        if op == "flip":
            i = draw(st.integers(0, n - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[draw(st.integers(0, n - 1)):]
        elif op == "header":  # overwrite bytes among the first 64 (sizes, depths, offsets)
            i = draw(st.integers(0, min(n, 64) - 1))
            patch = draw(st.binary(min_size=1, max_size=4))
            data[i:i + len(patch)] = patch
        elif op == "field":  # an extreme 16/32-bit value anywhere in the first 512 bytes
            i = draw(st.integers(0, min(n, 512) - 1))
            value = draw(st.sampled_from([b"\x00\x00", b"\xff\xff", b"\x7f\xff\xff\xff",
                                          b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x80\x00"]))
            data[i:i + len(value)] = value
        else:
            i = draw(st.integers(0, n))
            data[i:i] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


@_SETTINGS
@given(st.binary(max_size=4096))
def test_any_bytes_give_rgb_or_image_error(data: bytes):
    _decodes_or_image_error(data)


_SIGNATURES = [b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"GIF87a", b"II*\x00",
               b"MM\x00*", b"BM", b"RIFF\x00\x00\x00\x00WEBPVP8X", b"RIFF\x00\x00\x00\x00WEBPVP8L",
               b"DDS |", b"qoif", b"8BPS", b"\x00\x00\x01\x00", b"%!PS-Adobe-3.0 EPSF-3.0"]


@_SETTINGS
@given(st.sampled_from(_SIGNATURES), st.binary(max_size=512),
       st.sampled_from([DEFAULT_FORMATS, tuple(sorted(KNOWN_FORMATS))]))
def test_signature_then_any_bytes(signature: bytes, tail: bytes, formats):
    _decodes_or_image_error(signature + tail, formats=formats)


@_SETTINGS
@given(mutated_images(), st.sampled_from([DEFAULT_FORMATS, tuple(sorted(KNOWN_FORMATS))]))
def test_mutated_images_give_rgb_or_image_error(data: bytes, formats):
    _decodes_or_image_error(data, formats=formats)


@settings(max_examples=100, deadline=timedelta(seconds=1), database=None)
@given(st.lists(st.integers(0, 65535), min_size=1, max_size=16))
def test_16bit_scaling_is_the_high_byte(values: list[int]):
    img = Image.fromarray(np.array([values], np.uint16))
    got = np.asarray(to_rgb(img))[0, :, 0]
    assert got.tolist() == [v >> 8 for v in values]


@settings(max_examples=100, deadline=timedelta(seconds=1), database=None)
@given(st.lists(st.floats(0.0, 1.0, width=32), min_size=1, max_size=16))
def test_unit_floats_scale_by_255(values: list[float]):
    img = Image.fromarray(np.array([values], np.float32))
    got = np.asarray(to_rgb(img))[0, :, 0].astype(int)
    assert np.abs(got - np.rint(np.array(values, np.float32) * 255)).max() <= 1

"""A deterministic corpus of hostile and unusual image files, each with its expected outcome.

:func:`hostile_corpus` returns ``name -> HostileImage``: decompression bombs, truncated files,
canvas-only WebP, a many-frame GIF, crafted TIFF tags and strip offsets, crafted EXIF orientation,
formats outside the default allow-list (DDS, PCX, TGA, SGI, QOI, EPS, ICO, PSD, ...), 16-bit, float,
palette, alpha and CMYK modes, empty and random bytes. Each entry knows what
:func:`camserve.images.decode_image` must answer (:meth:`HostileImage.outcome`) under any pixel
limit and format allow-list, so the same corpus drives unit tests, end-to-end tests against a real
TorchServe and soak benchmarks. ``python -m camserve.testing.hostile DIR`` writes it to a folder
with a ``manifest.json``.

The bytes are built by hand (PNG, GIF, TIFF, WebP chunks) or with Pillow's encoders from fixed
pixels; nothing is random except the seeded random-bytes entry, so every call gives the same bytes.

Example::

    >>> corpus = hostile_corpus()
    >>> case = corpus["gif_bomb_8000"]
    >>> len(case.data) < 100, case.outcome()
    (True, Outcome(status=413, type='ImageTooLarge'))
    >>> corpus["pcx_outside_list"].outcome(), corpus["pcx_outside_list"].outcome(formats=["PCX"])
    (Outcome(status=400, type='InvalidImage'), Outcome(status=200, type=None))
"""
from __future__ import annotations

import functools
import io
import json
import random
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np
from PIL import Image

from camserve.images import DEFAULT_FORMATS, DEFAULT_MAX_PIXELS, check_formats

__all__ = ["HostileImage", "Outcome", "hostile_corpus", "write_corpus", "HEAVY_PIXELS"]

#: Entries that decode to more pixels than this are ``heavy``: valid, but costly to explain.
HEAVY_PIXELS = 4_000_000


class Outcome(NamedTuple):
    """What ``decode_image`` answers: HTTP-like status and error type (None for 200)."""

    status: int
    type: str | None


OK = Outcome(200, None)
INVALID = Outcome(400, "InvalidImage")
TOO_LARGE = Outcome(413, "ImageTooLarge")


@dataclass(frozen=True)
class HostileImage:
    """One corpus entry.

    ``format``: the Pillow format name of the data (None: not an image, or a format without a
    signature). ``pixels``: the pixel count the header declares (None when the header cannot be
    read). ``valid``: whether the data decodes when its format is allowed and it is within the
    pixel limit. ``size``/``center``: decoded size (after EXIF orientation) and RGB at the centre,
    when checked. ``note``: what the entry exercises.
    """

    name: str
    data: bytes
    format: str | None
    pixels: int | None
    valid: bool
    note: str
    size: tuple[int, int] | None = None
    center: tuple[int, int, int] | None = None
    tolerance: int = 0

    def outcome(self, max_pixels: int = DEFAULT_MAX_PIXELS,
                formats: str | Iterable[str] = DEFAULT_FORMATS) -> Outcome:
        """The answer of ``decode_image(self.data, max_pixels, formats)``."""
        allowed = check_formats(formats)
        if self.format is None or _FORMAT_ALIASES.get(self.format, self.format) not in allowed:
            return INVALID
        if self.pixels is not None:
            bomb_limit = 2 * (Image.MAX_IMAGE_PIXELS or sys.maxsize)
            if self.pixels > max_pixels or self.pixels > bomb_limit:
                return TOO_LARGE
        return OK if self.valid else INVALID

    @property
    def status(self) -> int:
        """Status under the default limit and formats."""
        return self.outcome().status

    @property
    def error_type(self) -> str | None:
        """Error type under the default limit and formats (None for 200)."""
        return self.outcome().type

    @property
    def heavy(self) -> bool:
        """Valid but big (decodes to more than :data:`HEAVY_PIXELS` pixels)."""
        return self.valid and (self.pixels or 0) > HEAVY_PIXELS

    def manifest(self) -> dict:
        """JSON-ready description (without the bytes)."""
        out = self.outcome()
        return {"name": self.name, "bytes": len(self.data), "format": self.format,
                "pixels": self.pixels, "valid": self.valid, "heavy": self.heavy,
                "status": out.status, "type": out.type, "size": self.size,
                "center": self.center, "note": self.note}


_FORMAT_ALIASES = {"MPO": "JPEG"}


# ----------------------------------------------------------------------------------------- builders

def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _gradient(w: int, h: int) -> Image.Image:
    """A smooth RGB test picture (compresses well, survives JPEG)."""
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1),
                    np.full_like(x, 96)], axis=-1).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(w: int, h: int, bit_depth: int, color_type: int, raw: bytes | None = None, *,
         extra: bytes = b"", idat: bytes | None = None) -> bytes:
    """A PNG from raw scanlines (each row prefixed by filter byte 0 by the caller)."""
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    if idat is None:
        idat = zlib.compress(raw or b"", 9)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + extra + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


_GIF_PIXEL = b"\x02\x02\x44\x01\x00"  # LZW data of one pixel, colour index 0 (min code size 2)


def _gif(screen: tuple[int, int], frames: Iterable[tuple[int, int, int, int]]) -> bytes:
    """GIF89a with a 2-colour table (red, blue) and 1x1-pixel frames at the given rectangles."""
    out = [b"GIF89a", struct.pack("<HHBBB", screen[0], screen[1], 0x80, 0, 0),
           b"\xff\x00\x00\x00\x00\xff"]
    for x, y, w, h in frames:
        out.append(b"\x2c" + struct.pack("<HHHHB", x, y, w, h, 0) + _GIF_PIXEL)
    out.append(b"\x3b")
    return b"".join(out)


_TIFF_TYPES = {1: "B", 2: "s", 3: "H", 4: "I", 5: "II", 12: "d"}


def _tiff(w: int, h: int, data: bytes, tags: dict[int, tuple[int, object]], *,
          strip_offset: int | None = None, next_ifd: int = 0) -> bytes:
    """A little-endian one-strip TIFF. ``tags``: tag -> (type, value or list of values); the size,
    strip offset/count and rows-per-strip tags are filled in unless given."""
    base: dict[int, tuple[int, object]] = {256: (4, w), 257: (4, h), 259: (3, 1), 278: (4, h),
                                           279: (4, len(data))}
    base.update(tags)
    header_len = 8
    data_off = header_len
    ifd_off = data_off + len(data) + (len(data) & 1)
    base.setdefault(273, (4, data_off if strip_offset is None else strip_offset))
    entries = sorted(base.items())
    extra = b""
    extra_off = ifd_off + 2 + 12 * len(entries) + 4
    raw_entries = []
    for tag, (typ, value) in entries:
        values = value if isinstance(value, (list, tuple)) else [value]
        if typ == 2:
            payload = bytes(value) if isinstance(value, (bytes, bytearray)) else str(value).encode() + b"\0"
            count = len(payload)
        else:
            code = _TIFF_TYPES[typ]
            flat = [v for pair in values for v in pair] if typ == 5 else list(values)
            payload = struct.pack("<" + code[0] * len(flat), *flat)
            count = len(values)
        if len(payload) <= 4:
            field = payload.ljust(4, b"\0")
        else:
            field = struct.pack("<I", extra_off + len(extra))
            extra += payload + (b"\0" if len(payload) & 1 else b"")
        raw_entries.append(struct.pack("<HHI", tag, typ, count) + field)
    ifd = struct.pack("<H", len(entries)) + b"".join(raw_entries) + struct.pack("<I", next_ifd)
    return (b"II*\x00" + struct.pack("<I", ifd_off) + data + b"\0" * (len(data) & 1) + ifd + extra)


def _grey_tiff_tags(bits: int = 8, sample_format: int = 1) -> dict[int, tuple[int, object]]:
    return {258: (3, bits), 262: (3, 1), 277: (3, 1), 339: (3, sample_format)}


def _patch(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new):]


def _jpeg_with_size(data: bytes, w: int, h: int) -> bytes:
    """Rewrite the SOF0 frame size of a baseline JPEG."""
    i = data.index(b"\xff\xc0")
    return _patch(data, i + 5, struct.pack(">HH", h, w))


def _webp_canvas(data: bytes, w: int, h: int) -> bytes:
    """Rewrite the VP8X canvas size of an extended WebP."""
    i = data.index(b"VP8X") + 8
    return _patch(data, i + 4, (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little"))


def _exif_jpeg(orientation_entry: bytes | None = None, *, raw_exif: bytes | None = None,
               size: tuple[int, int] = (40, 20)) -> bytes:
    """A JPEG whose APP1 EXIF block holds one IFD0 entry (12 raw bytes) or ``raw_exif`` as is."""
    if raw_exif is None:
        ifd = struct.pack("<H", 1) + orientation_entry + struct.pack("<I", 0)
        raw_exif = b"Exif\x00\x00" + b"II*\x00" + struct.pack("<I", 8) + ifd
    return _save(_gradient(*size), "JPEG", quality=90, exif=raw_exif)


def _psd_header(w: int, h: int) -> bytes:
    """A PSD: 3-channel 8-bit RGB, raw data."""
    head = (b"8BPS" + struct.pack(">H", 1) + bytes(6) + struct.pack(">HIIHH", 3, h, w, 8, 3)
            + struct.pack(">I", 0) + struct.pack(">I", 0) + struct.pack(">I", 0))
    return head + struct.pack(">H", 0) + bytes([200]) * (w * h) + bytes([20]) * (w * h * 2)


# ----------------------------------------------------------------------------------------- corpus

def _entries() -> list[HostileImage]:
    E = HostileImage
    out: list[HostileImage] = []
    add = out.append
    g224 = _gradient(224, 224)
    red = Image.new("RGB", (16, 12), (220, 30, 30))

    # -- good images in every allowed format
    add(E("good_jpeg_224", _save(g224, "JPEG", quality=90), "JPEG", 224 * 224, True,
          "ordinary 224x224 JPEG", (224, 224), (128, 128, 96), 6))
    add(E("good_png", _save(red, "PNG"), "PNG", 192, True, "RGB PNG", (16, 12), (220, 30, 30)))
    add(E("good_webp_lossless", _save(red, "WEBP", lossless=True), "WEBP", 192, True,
          "lossless WebP", (16, 12), (220, 30, 30)))
    add(E("good_bmp", _save(red, "BMP"), "BMP", 192, True, "24-bit BMP", (16, 12), (220, 30, 30)))
    add(E("good_tiff", _save(red, "TIFF"), "TIFF", 192, True, "uncompressed RGB TIFF",
          (16, 12), (220, 30, 30)))
    add(E("good_gif", _save(red, "GIF"), "GIF", 192, True, "single-frame GIF", (16, 12),
          (220, 30, 30)))
    mpo = _save(red, "MPO", save_all=True, append_images=[Image.new("RGB", (16, 12), "blue")])
    add(E("jpeg_mpo_two_pictures", mpo, "MPO", 192, True,
          "JPEG carrying a second picture (Pillow's MPO): decoded as JPEG, first picture",
          (16, 12), (220, 30, 30), 8))

    # -- multi-frame: only the first frame is decoded, whatever the frame count
    many = _gif((8, 8), [(0, 0, 1, 1)] * 20_001)
    add(E("gif_20000_frames", many, "GIF", 64, True,
          "GIF with 20,001 frames; only the first is decoded (cost independent of frame count)",
          (8, 8), None))
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    add(E("gif_animated_first_frame", _save(frames[0], "GIF", save_all=True, append_images=frames[1:]),
          "GIF", 64, True, "animated GIF: first frame (red)", (8, 8), (255, 0, 0)))
    anim_webp = _save(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    add(E("webp_animated_first_frame", anim_webp, "WEBP", 64, True,
          "animated WebP: first frame (red)", (8, 8), (255, 0, 0)))
    tif_pages = _save(frames[0], "TIFF", save_all=True, append_images=frames[1:])
    add(E("tiff_three_pages", tif_pages, "TIFF", 64, True, "multi-page TIFF: first page",
          (8, 8), (255, 0, 0)))

    # -- decompression bombs and huge declared sizes
    add(E("gif_bomb_6000", _gif((6000, 6000), [(0, 0, 1, 1)]), "GIF", 36_000_000, True,
          "29-byte GIF whose screen is 6000x6000 (36 MP): under the default 40 MP limit it decodes; "
          "heavy (a serving work budget may refuse it)", (6000, 6000), None))
    add(E("gif_bomb_8000", _gif((8000, 8000), [(0, 0, 1, 1)]), "GIF", 64_000_000, True,
          "tiny GIF whose screen is 8000x8000 (64 MP)"))
    add(E("gif_frame_beyond_screen", _gif((1, 1), [(0, 0, 9000, 9000)]), "GIF", 81_000_000, False,
          "1x1 screen, first frame declares 9000x9000 (Pillow grows the image to the frame)"))
    row = b"\0" + bytes(1250)
    add(E("png_bomb_10000", _png(10000, 10000, 1, 0, row * 10000), "PNG", 100_000_000, True,
          "real 1-bit PNG bomb: ~12 KB inflating to 100 MP"))
    add(E("png_declares_65535", _png(65535, 65535, 8, 2, b""), "PNG", 65535 * 65535, False,
          "PNG header declares 65535x65535 RGB with no pixel data (beyond Pillow's own bomb limit)"))
    add(E("png_declares_2_31", _png(2**31 - 1, 1, 8, 0, b""), "PNG", 2**31 - 1, False,
          "PNG header declares 2^31-1 x 1"))
    add(E("jpeg_declares_60000", _jpeg_with_size(_save(red, "JPEG"), 60000, 60000), "JPEG",
          3_600_000_000, False, "JPEG SOF frame size rewritten to 60000x60000"))
    add(E("tiff_declares_100000", _tiff(100000, 100000, bytes(64), _grey_tiff_tags()), "TIFF",
          10**10, False, "TIFF tags declare 100000x100000 with 64 bytes of data"))
    bmp = bytearray(_save(red, "BMP"))
    bmp[18:26] = struct.pack("<ii", 50000, 50000)
    add(E("bmp_declares_50000", bytes(bmp), "BMP", 2_500_000_000, False,
          "BMP header rewritten to 50000x50000"))
    webp_small = _save(Image.new("RGB", (4, 4), "red"), "WEBP", save_all=True,
                       append_images=[Image.new("RGB", (4, 4), "blue")], lossless=True)
    add(E("webp_canvas_16384", _webp_canvas(webp_small, 16384, 16384), "WEBP", 16384 * 16384,
          False, "animated WebP whose VP8X canvas says 16384x16384 around a 4x4 frame"))
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\x10\x00\x00\x00" + (1999).to_bytes(3, "little") * 2
    canvas_only = b"RIFF" + struct.pack("<I", 4 + len(vp8x)) + b"WEBP" + vp8x
    add(E("webp_canvas_only", canvas_only, "WEBP", None, False,
          "WebP with only a VP8X canvas (2000x2000) and no image data"))

    # -- truncated and broken files in allowed formats
    photo = _save(_gradient(64, 64), "JPEG", quality=95)
    add(E("jpeg_truncated_half", photo[: len(photo) // 2], "JPEG", 4096, False,
          "JPEG cut in the middle of the scan"))
    add(E("jpeg_header_only", photo[:20], "JPEG", None, False, "SOI and part of APP0 only"))
    png = _save(_gradient(64, 64), "PNG")
    add(E("png_truncated_half", png[: len(png) // 2], "PNG", 4096, False, "PNG cut in its IDAT"))
    add(E("png_bad_ihdr_crc", _patch(png, 29, b"\0\0\0\0"), "PNG", None, False,
          "PNG whose IHDR CRC is wrong"))
    ztxt = _png_chunk(b"zTXt", b"k\0\0" + zlib.compress(bytes(8 << 20), 9))
    add(E("png_ztxt_bomb", _png(4, 4, 8, 0, (b"\0" + bytes(4)) * 4, extra=ztxt), "PNG", None,
          False, "PNG with a zTXt chunk inflating to 8 MB: Pillow refuses text over its limit"))
    add(E("gif_truncated", _save(_gradient(32, 32), "GIF")[:40], "GIF", None, False,
          "GIF cut after its colour table"))
    add(E("webp_truncated", _save(_gradient(32, 32), "WEBP")[:30], "WEBP", None, False,
          "WebP cut after its first chunk header"))
    add(E("bmp_bad_bit_depth", _patch(_save(red, "BMP"), 28, struct.pack("<H", 7)), "BMP", None,
          False, "BMP declaring 7 bits per pixel"))

    # -- crafted TIFF tags and strip offsets
    g8 = bytes(range(64))
    add(E("tiff_strip_offset_past_end", _tiff(8, 8, g8, _grey_tiff_tags(), strip_offset=10**6),
          "TIFF", 64, False, "strip offset points past the end of the file"))
    add(E("tiff_strip_count_huge", _tiff(8, 8, g8, {**_grey_tiff_tags(), 279: (4, 2**32 - 1)}),
          "TIFF", 64, True, "strip byte count 2^32-1: the bytes present are read", (8, 8),
          (36, 36, 36)))
    add(E("tiff_bits_per_sample_ascii", _tiff(8, 8, g8, {**_grey_tiff_tags(), 258: (2, "xx")}),
          "TIFF", None, False, "BitsPerSample stored as ASCII"))
    add(E("tiff_bits_per_sample_3", _tiff(8, 8, g8, _grey_tiff_tags(bits=3)), "TIFF", None, False,
          "3 bits per sample (no such Pillow mode)"))
    add(E("tiff_unknown_compression", _tiff(8, 8, g8, {**_grey_tiff_tags(), 259: (3, 54321)}),
          "TIFF", None, False, "compression scheme 54321"))
    add(E("tiff_jpeg_compressed_garbage", _tiff(8, 8, g8, {**_grey_tiff_tags(), 259: (3, 7)}),
          "TIFF", 64, False, "JPEG-in-TIFF compression over bytes that are not JPEG"))
    add(E("tiff_zero_width", _tiff(0, 8, g8, _grey_tiff_tags()), "TIFF", None, False,
          "ImageWidth 0"))
    add(E("tiff_ifd_loop", _tiff(8, 8, g8, _grey_tiff_tags(), next_ifd=8 + 64), "TIFF", 64, True,
          "next-IFD offset points back to the first IFD; the first page is fine",
          (8, 8), (36, 36, 36)))
    add(E("tiff_rows_per_strip_zero", _tiff(8, 8, g8, {**_grey_tiff_tags(), 278: (4, 0)}),
          "TIFF", 64, False, "RowsPerStrip 0"))
    add(E("tiff_xmp_wrong_type", _tiff(8, 8, g8, {**_grey_tiff_tags(), 700: (3, 7), 274: (3, 6)}),
          "TIFF", 64, False, "XMP tag stored as a number (Pillow raises TypeError while loading)"))
    add(E("tiff_photometric_bogus", _tiff(8, 8, g8, {**_grey_tiff_tags(), 262: (3, 99)}),
          "TIFF", None, False, "PhotometricInterpretation 99"))

    # -- crafted EXIF orientation (pixels are good: unreadable or odd orientation is ignored)
    def orient(value_type: int, count: int, field: bytes) -> bytes:
        return _exif_jpeg(struct.pack("<HHI", 0x0112, value_type, count) + field)

    add(E("exif_orientation_6", orient(3, 1, struct.pack("<HH", 6, 0)), "JPEG", 800, True,
          "orientation 6: rotated to 20x40", (20, 40), None))
    for value in (0, 9, 65535):
        add(E(f"exif_orientation_{value}", orient(3, 1, struct.pack("<HH", value, 0)), "JPEG", 800,
              True, f"orientation {value} (out of range): ignored", (40, 20), None))
    add(E("exif_orientation_ascii", orient(2, 4, b"six\0"), "JPEG", 800, True,
          "orientation stored as ASCII: ignored", (40, 20), None))
    add(E("exif_orientation_pair", orient(3, 2, struct.pack("<HH", 6, 6)), "JPEG", 800, True,
          "orientation with two values (6, 6): Pillow reads the first, rotated to 20x40",
          (20, 40), None))
    add(E("exif_orientation_offset_past_end", orient(3, 40, struct.pack("<I", 10**6)), "JPEG", 800,
          True, "orientation values at an offset past the EXIF block: ignored", (40, 20), None))
    bad_ifd = b"Exif\x00\x00II*\x00" + struct.pack("<I", 10**6)
    add(E("exif_ifd_offset_past_end", _exif_jpeg(raw_exif=bad_ifd), "JPEG", 800, True,
          "EXIF IFD0 offset past the end: ignored", (40, 20), None))
    huge_count = b"Exif\x00\x00II*\x00" + struct.pack("<IH", 8, 65535) + bytes(24)
    add(E("exif_ifd_65535_entries", _exif_jpeg(raw_exif=huge_count), "JPEG", 800, True,
          "EXIF IFD0 claims 65535 entries in 24 bytes: ignored", (40, 20), None))
    add(E("exif_not_tiff", _exif_jpeg(raw_exif=b"Exif\x00\x00XX*\x00garbage"), "JPEG", 800, True,
          "EXIF block without a TIFF header: ignored", (40, 20), None))

    # -- formats outside the default allow-list (valid files of their format)
    small = Image.new("RGB", (8, 8), (200, 20, 20))
    for fmt, name in (("DDS", "dds"), ("PCX", "pcx"), ("SGI", "sgi"), ("QOI", "qoi"),
                      ("ICO", "ico"), ("PPM", "ppm"), ("JPEG2000", "jpeg2000")):
        add(E(f"{name}_outside_list", _save(small, fmt), fmt, 64, True,
              f"valid {fmt} file: refused unless {fmt} is allowed", (8, 8), (200, 20, 20)))
    add(E("tga_outside_list", _save(small, "TGA"), "TGA", 64, True,
          "valid TGA file: refused unless TGA is allowed (TGA has no signature; its first bytes "
          "match CUR's, so the refusal may name CUR)", (8, 8), (200, 20, 20)))
    add(E("psd_outside_list", _psd_header(8, 8), "PSD", 64, True,
          "valid PSD file: refused unless PSD is allowed", (8, 8), (200, 20, 20)))
    add(E("eps_outside_list", _save(small, "EPS"), "EPS", None, False,
          "EPS: never allowed (its decoder runs Ghostscript); no parser ever sees it"))
    add(E("dds_header_only", _save(small, "DDS")[:128], "DDS", None, False,
          "DDS header without data"))
    dds = _save(small, "DDS")
    add(E("dds_unknown_pixel_flags", _patch(dds, 80, struct.pack("<I", 0)), "DDS", None, False,
          "DDS pixel-format flags 0: Pillow raises NotImplementedError while opening"))
    add(E("dds_unknown_fourcc", _patch(dds, 80, struct.pack("<II", 4, 0x39545844)), "DDS", None,
          False, "DDS FourCC 'DXT9': Pillow raises NotImplementedError while opening"))

    # -- modes: 16-bit, float, palette, alpha, CMYK, YCbCr, 1-bit
    mid16 = np.full((6, 6), 32768, np.uint16)
    add(E("png_16bit_grey_mid", _save(Image.fromarray(mid16), "PNG"), "PNG", 36, True,
          "16-bit grey 32768 -> 128 (scaled, not clipped)", (6, 6), (128, 128, 128)))
    rgb16 = (b"\0" + struct.pack(">HHH", 32768, 65535, 0) * 6) * 6
    add(E("png_16bit_rgb", _png(6, 6, 16, 2, rgb16), "PNG", 36, True,
          "16-bit RGB (32768, 65535, 0) -> (128, 255, 0)", (6, 6), (128, 255, 0)))
    add(E("tiff_16bit_grey_mid", _save(Image.fromarray(mid16), "TIFF"), "TIFF", 36, True,
          "16-bit grey TIFF 32768 -> 128", (6, 6), (128, 128, 128)))
    big_endian = Image.frombytes("I;16B", (6, 6), mid16.astype(">u2").tobytes())
    add(E("tiff_16bit_big_endian_mid", _save(big_endian, "TIFF"), "TIFF", 36, True,
          "16-bit big-endian grey TIFF (I;16B) 32768 -> 128", (6, 6), (128, 128, 128)))
    rgb16_tiff = struct.pack("<HHH", 32768, 65535, 0) * 36
    add(E("tiff_16bit_rgb", _tiff(6, 6, rgb16_tiff, {258: (3, [16, 16, 16]), 262: (3, 2),
                                                      277: (3, 3), 284: (3, 1)}),
          "TIFF", 36, True, "16-bit RGB TIFF (32768, 65535, 0) -> (128, 255, 0)", (6, 6),
          (128, 255, 0)))
    add(E("tiff_float_unit", _save(Image.fromarray(np.full((6, 6), 0.5, np.float32)), "TIFF"),
          "TIFF", 36, True, "float 0.5 in [0, 1] -> 128", (6, 6), (128, 128, 128)))
    wide = np.linspace(-1000, 1000, 36, dtype=np.float32).reshape(6, 6)
    add(E("tiff_float_wide", _save(Image.fromarray(wide), "TIFF"), "TIFF", 36, True,
          "float -1000..1000 -> min-max to 0..255", (6, 6), (153, 153, 153)))
    nan = np.full((6, 6), np.nan, np.float32)
    add(E("tiff_float_nan", _save(Image.fromarray(nan), "TIFF"), "TIFF", 36, True,
          "float NaN everywhere -> 0", (6, 6), (0, 0, 0)))
    add(E("tiff_int32_16bit_range", _save(Image.fromarray(np.full((6, 6), 32768, np.int32)), "TIFF"),
          "TIFF", 36, True, "32-bit integer within 0..65535 -> 16-bit rule -> 128", (6, 6),
          (128, 128, 128)))
    ints = np.arange(36, dtype=np.int32).reshape(6, 6) * 100_000 - 1_000_000
    add(E("tiff_int32_wide", _save(Image.fromarray(ints), "TIFF"), "TIFF", 36, True,
          "32-bit integer -1e6..2.5e6 -> min-max", (6, 6), (153, 153, 153)))
    pal = red.convert("P")
    add(E("png_palette", _save(pal, "PNG"), "PNG", 192, True,
          "palette PNG (web palette: red becomes (204, 51, 51))", (16, 12), (204, 51, 51)))
    pal_t = Image.new("P", (8, 8), 0)
    pal_t.putpalette([10, 20, 30] * 256)
    add(E("png_palette_transparent", _save(pal_t, "PNG", transparency=0), "PNG", 64, True,
          "palette PNG whose colour 0 is transparent -> white", (8, 8), (255, 255, 255)))
    add(E("png_la_half", _save(Image.new("LA", (8, 8), (0, 128)), "PNG"), "PNG", 64, True,
          "grey+alpha, black at alpha 128 on white", (8, 8), (127, 127, 127), 1))
    add(E("png_rgba_transparent", _save(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "PNG"), "PNG",
          64, True, "fully transparent RGBA -> white", (8, 8), (255, 255, 255)))
    add(E("webp_rgba_transparent", _save(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "WEBP",
                                         lossless=True), "WEBP", 64, True,
          "fully transparent WebP -> white", (8, 8), (255, 255, 255)))
    add(E("gif_transparent", _save(pal_t, "GIF", transparency=0), "GIF", 64, True,
          "GIF with a transparent colour -> white", (8, 8), (255, 255, 255)))
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    add(E("jpeg_cmyk", _save(cmyk, "JPEG", quality=95), "JPEG", 64, True, "CMYK JPEG (red)",
          (8, 8), (255, 0, 0), 8))
    add(E("tiff_cmyk", _save(cmyk, "TIFF"), "TIFF", 64, True, "CMYK TIFF (red)", (8, 8),
          (255, 0, 0)))
    add(E("tiff_ycbcr", _save(red.convert("YCbCr"), "TIFF"), "TIFF", 192, True, "YCbCr TIFF",
          (16, 12), (220, 30, 30), 3))
    add(E("bmp_1bit", _save(Image.new("1", (8, 8), 1), "BMP"), "BMP", 64, True, "1-bit BMP (white)",
          (8, 8), (255, 255, 255)))
    add(E("tiff_lab", _save(Image.new("LAB", (8, 8), (50, 128, 128)), "TIFF"), "TIFF", 64, True,
          "CIELab TIFF: converted with Pillow's band rule", (8, 8), None))

    # -- not images at all
    add(E("empty", b"", None, None, False, "zero bytes"))
    add(E("random_1k", random.Random(9).randbytes(1024), None, None, False, "1 KiB of seeded random bytes"))
    add(E("text", b"hello, this is not an image\n" * 4, None, None, False, "plain text"))
    add(E("svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="9000" height="9000"/>', None,
          None, False, "SVG (vector, not decoded)"))
    add(E("pdf", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n%%EOF\n", None, None, False,
          "PDF header"))
    add(E("zip", b"PK\x03\x04" + bytes(26), None, None, False, "ZIP header"))
    return out


@functools.lru_cache(maxsize=1)
def _corpus() -> tuple[HostileImage, ...]:
    entries = tuple(_entries())
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise RuntimeError("duplicate names in the hostile corpus")
    return entries


def hostile_corpus() -> dict[str, HostileImage]:
    """The corpus: ``name -> HostileImage``, in a fixed order, same bytes on every call."""
    return {e.name: e for e in _corpus()}


_EXTENSIONS = {"JPEG": ".jpg", "MPO": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp",
               "GIF": ".gif", "TIFF": ".tif", "JPEG2000": ".jp2"}


def write_corpus(folder: str | Path) -> Path:
    """Write every entry to ``folder`` (``<name>.<ext>``) plus ``manifest.json``; return the
    manifest path. The manifest lists each file with its expected status/type under the defaults."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = []
    for case in _corpus():
        ext = _EXTENSIONS.get(case.format or "", f".{(case.format or 'bin').lower()}")
        path = folder / f"{case.name}{ext}"
        path.write_bytes(case.data)
        manifest.append({"file": path.name, **case.manifest()})
    out = folder / "manifest.json"
    out.write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m camserve.testing.hostile DIR``: write the corpus and its manifest to DIR."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m camserve.testing.hostile OUTPUT_DIR\n")
        return 2
    path = write_corpus(args[0])
    sys.stdout.write(f"{len(_corpus())} files and {path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Decode, validate and preprocess images: the one path shared by the handler and the batch job.

* :func:`decode_image` takes raw bytes in one of the allowed formats (by default
  :data:`DEFAULT_FORMATS`: JPEG, PNG, WebP, BMP, GIF first frame, TIFF first page), checks the pixel
  count from the header *before* decoding pixels (a decompression-bomb guard that does not touch
  Pillow's global ``Image.MAX_IMAGE_PIXELS``), applies EXIF orientation and returns 8-bit RGB.
  Whatever the bytes are, the only exception it raises is :class:`ImageError`.
* :func:`to_rgb` is the mode rule: 16-bit and float images are scaled to 8 bits (see there),
  transparency is composited on white, every other mode is converted to RGB.
* :func:`preprocess` resizes the whole image to the model's input size (no crop, so a heatmap maps
  back onto the whole image) and normalises with the model's mean/std.

Errors are :class:`ImageError` with an HTTP-like ``code`` (400 or 413) and a ``type``
(``InvalidImage`` or ``ImageTooLarge``). Messages name the format and the byte count and never echo
the data.

Example::

    >>> import io
    >>> from PIL import Image
    >>> buf = io.BytesIO(); Image.new("RGB", (40, 30), "red").save(buf, "PNG")
    >>> img = decode_image(buf.getvalue())
    >>> preprocess(img, (96, 96), (0.5,) * 3, (0.25,) * 3).shape
    torch.Size([3, 96, 96])
    >>> buf = io.BytesIO(); Image.new("RGB", (4, 4)).save(buf, "PCX")
    >>> decode_image(buf.getvalue(), formats=["JPEG", "PNG"])
    Traceback (most recent call last):
    ...
    camserve.images.ImageError: unsupported image format PCX (152 bytes); allowed formats: JPEG, PNG
    >>> decode_image(buf.getvalue(), formats="jpeg, pcx").size
    (4, 4)
"""
from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from .parsing import parse_choices, short_repr


log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 40_000_000

#: Formats decoded unless configured otherwise (names as Pillow's ``Image.format`` spells them).
#: A multi-frame file (GIF, animated WebP, multi-page TIFF) gives its first frame; a JPEG with
#: several pictures (Pillow's "MPO") counts as JPEG.
DEFAULT_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")

#: Every format an operator may allow: raster formats Pillow decodes in-process. EPS (handed to
#: Ghostscript), the metadata stubs and the vector formats are deliberately absent.
KNOWN_FORMATS: frozenset[str] = frozenset(DEFAULT_FORMATS) | frozenset({
    "AVIF", "BLP", "CUR", "DCX", "DDS", "FLI", "FTEX", "GBR", "ICNS", "ICO", "IM", "JPEG2000",
    "MSP", "PCX", "PPM", "PSD", "QOI", "SGI", "SUN", "TGA", "XBM",
})

#: Pillow names an image by its concrete plugin; these are decoded by the plugin on the right.
_FORMAT_ALIASES = {"MPO": "JPEG"}

#: Modes with an alpha band, composited on white.
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})

_ORIENTATION = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageError(ValueError):
    """An input that is not a usable image. ``code`` is 400 (bad data) or 413 (too large)."""

    def __init__(self, message: str, code: int = 400, type: str = "InvalidImage") -> None:
        super().__init__(message)
        self.code = code
        self.type = type



def check_formats(formats: str | Iterable[str]) -> tuple[str, ...]:
    """Validate an allow-list of image formats and return it normalised (upper case, unique, in order).

    ``formats`` is a list of names as Pillow's ``Image.format`` spells them (case-insensitive) or
    one comma-separated string (a config value such as ``handler.formats: "jpeg, png"``). Unknown
    names, names this Pillow build cannot open, and an empty list raise ``ValueError`` naming the
    allowed ones (:func:`camserve.parsing.parse_choices`).

    Example::

        >>> check_formats("jpeg, PNG ,png")
        ('JPEG', 'PNG')
        >>> check_formats(["JPEG", "EPS"])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: invalid value for formats: 'EPS' (allowed: AVIF, BLP, BMP, ...
    """
    if isinstance(formats, (set, frozenset)) or (not isinstance(formats, (str, list, tuple))
                                                  and isinstance(formats, Iterable)):
        formats = tuple(formats)
    names = parse_choices(formats, sorted(KNOWN_FORMATS), key="formats", normalize=str.upper)
    missing = [n for n in names if n not in Image.OPEN]
    if missing:
        Image.init()
        missing = [n for n in missing if n not in Image.OPEN]
    if missing:
        raise ValueError(f"invalid value for formats: image format {missing[0]} cannot be decoded "
                         f"by this Pillow build (plugin missing); available: "
                         f"{', '.join(sorted(KNOWN_FORMATS & set(Image.OPEN)))}")
    return names


def detect_format(data: bytes) -> str | None:
    """The Pillow format whose signature ``data`` starts with, or None.

    Only the plugins' signature checks run (on the first 16 bytes, as ``Image.open`` does); no
    plugin parses anything, so this is safe for any format. Formats without a signature (TGA, IM,
    ...) are not detected.

    Example::

        >>> detect_format(b"qoif" + bytes(12)), detect_format(b"hello")
        ('QOI', None)
    """
    prefix = bytes(data[:16])
    Image.init()
    for name in Image.ID:
        _, accept = Image.OPEN[name]
        if accept is None:
            continue
        try:
            hit = accept(prefix)
        except Exception:  # a signature check that trips over odd bytes is just "no"
            hit = False
        if hit and not isinstance(hit, str):
            return name
    return None


def _describe(exc: BaseException) -> str:
    """Exception class plus its message, escaped and cut: never more than ~100 characters."""
    text = str(exc)
    if not text.isprintable():
        text = text.encode("unicode_escape", "replace").decode("ascii")
    if len(text) > 100:
        text = text[:100] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _too_large(w: int, h: int, max_pixels: int, fmt: str) -> ImageError:
    return ImageError(f"image too large: {fmt} {w}x{h} = {w * h} pixels exceeds the limit of "
                      f"{max_pixels} pixels", 413, "ImageTooLarge")


def decode_image(data: bytes | bytearray | memoryview, max_pixels: int = DEFAULT_MAX_PIXELS,
                 formats: str | Iterable[str] = DEFAULT_FORMATS,
                 before_load: Optional[Callable[[int, int], None]] = None) -> Image.Image:
    """Decode image bytes to an 8-bit RGB :class:`PIL.Image.Image` with EXIF orientation applied.

    Only the plugins of ``formats`` (see :func:`check_formats`; default :data:`DEFAULT_FORMATS`)
    are asked to open the data, so no other parser ever sees it. The result is the first frame.

    Raises :class:`ImageError` and nothing else for any bytes:

    * 400 ``InvalidImage``: empty, unidentifiable, a format outside ``formats`` (named, with the
      allowed ones), a corrupt or truncated file, or any exception of the decoder while opening,
      seeking, loading or converting (a crafted file may make Pillow raise ``TypeError``,
      ``struct.error``, ``NotImplementedError``, ``MemoryError``, ...).
    * 413 ``ImageTooLarge``: more than ``max_pixels`` pixels, checked from the header before any
      pixel is decoded.

    ``before_load(width, height)``, when given, runs once the header's size has passed the pixel
    check and before any pixel is decoded: a caller's own budget check (what it raises propagates
    unchanged).

    EXIF metadata that cannot be read, and orientation values other than 1..8, are ignored (the
    pixels are still good). ``ValueError`` (not ImageError) only for a bad ``formats`` or
    ``max_pixels`` argument, a configuration error.

    Example::

        >>> decode_image(b"GIF89a" + bytes(10)).mode
        Traceback (most recent call last):
        ...
        camserve.images.ImageError: not a valid GIF image: cannot read the header (16 bytes)
    """
    allowed = check_formats(formats)
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive integer, got {short_repr(max_pixels)}")
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise ImageError(f"not an image: expected bytes, got {type(data).__name__}")
    n = len(data)
    if not n:
        raise ImageError("not an image: empty body (0 bytes)")
    allowed_text = ", ".join(allowed)
    with warnings.catch_warnings():
        # Pillow warns about big or odd files; every decision here is explicit instead.
        warnings.simplefilter("ignore")
        img = _open(data, allowed, allowed_text, max_pixels)
        fmt = img.format or "image"
        try:
            w, h = img.size
            if w <= 0 or h <= 0:
                raise ImageError(f"not an image: {fmt} declares an empty size {w}x{h} ({n} bytes)")
            if w * h > max_pixels:
                raise _too_large(w, h, max_pixels, fmt)
            if before_load is not None:
                before_load(w, h)
            try:
                img.load()  # the frame open() settled on: the first (GIF, WebP, TIFF, MPO, ...)
            except ImageError:
                raise
            except Image.DecompressionBombError:
                raise _too_large(w, h, max_pixels, fmt) from None
            except Exception as exc:
                log.debug("decode failed for %s data (%d bytes)", fmt, n, exc_info=True)
                raise ImageError(f"not an image: corrupt or truncated {fmt} data ({n} bytes): "
                                 f"{_describe(exc)}") from None
            w, h = img.size  # a plugin may settle the size while loading
            if w * h > max_pixels:
                raise _too_large(w, h, max_pixels, fmt)
            try:
                out = to_rgb(_orient(img))
            except Exception as exc:
                log.debug("mode conversion failed for %s %s (%d bytes)", fmt, img.mode, n, exc_info=True)
                raise ImageError(f"not an image: cannot convert {fmt} mode {img.mode} to RGB "
                                 f"({n} bytes): {_describe(exc)}") from None
        except BaseException:
            _close(img)
            raise
    if out is not img:
        _close(img)
    return out


def _close(img: Image.Image) -> None:
    try:
        img.close()
    except Exception:  # closing a half-parsed file must not replace the real answer
        log.debug("ignoring an error while closing an image", exc_info=True)


def _open(data: bytes, allowed: tuple[str, ...], allowed_text: str, max_pixels: int):
    """``Image.open`` restricted to ``allowed``; every failure is an :class:`ImageError`."""
    n = len(data)
    try:
        img = Image.open(io.BytesIO(data), formats=list(allowed))
    except UnidentifiedImageError:
        found = detect_format(data)
        if found is None:
            raise ImageError(f"not an image: cannot identify image data ({n} bytes); allowed "
                             f"formats: {allowed_text}") from None
        if _FORMAT_ALIASES.get(found, found) in allowed:
            raise ImageError(f"not a valid {found} image: cannot read the header ({n} bytes)") from None
        raise ImageError(f"unsupported image format {found} ({n} bytes); allowed formats: "
                         f"{allowed_text}") from None
    except Image.DecompressionBombError:  # beyond Pillow's own hard limit, whatever ours is
        found = detect_format(data) or "image"
        raise ImageError(f"image too large: the {found} header declares more than "
                         f"{2 * (Image.MAX_IMAGE_PIXELS or 0)} pixels; the limit is {max_pixels} "
                         f"pixels ({n} bytes)", 413, "ImageTooLarge") from None
    except Exception as exc:
        found = detect_format(data)
        log.debug("open failed for %s data (%d bytes)", found, n, exc_info=True)
        what = f"not a valid {found} image" if found else "not an image"
        raise ImageError(f"{what}: cannot read the header ({n} bytes): {_describe(exc)}") from None
    fmt = _FORMAT_ALIASES.get(img.format or "", img.format)
    if fmt not in allowed:  # a plugin that hands over to another one; never decode that
        _close(img)
        raise ImageError(f"unsupported image format {img.format} ({n} bytes); allowed formats: "
                         f"{allowed_text}")
    return img


def _orient(img: Image.Image) -> Image.Image:
    """Apply the EXIF orientation (values 2..8); unreadable EXIF or other values are ignored."""
    try:
        orientation = img.getexif().get(_ORIENTATION, 1)
    except Exception:
        log.debug("ignoring unreadable EXIF data", exc_info=True)
        return img
    if isinstance(orientation, int) and not isinstance(orientation, bool) and orientation in _TRANSPOSE:
        return img.transpose(_TRANSPOSE[orientation])
    return img


def _to_l8(img: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float single-band images -> 8-bit ``L`` (see :func:`to_rgb`)."""
    a = np.asarray(img)
    if img.mode.startswith("I;16"):
        return Image.fromarray((a >> 8).astype(np.uint8), "L")
    if img.mode == "I" and a.size and int(a.min()) >= 0 and int(a.max()) <= 0xFFFF:
        return Image.fromarray((a >> 8).astype(np.uint8), "L")
    a = a.astype(np.float32, copy=False)
    finite = np.isfinite(a)
    if not finite.all():
        a = np.where(finite, a, 0).astype(np.float32)
        if finite.any():
            a = np.clip(a, a[finite].min(), a[finite].max())
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
        a = a * 255.0
    elif hi > lo:
        a = (a - lo) * (255.0 / (hi - lo))
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, scaling by bit depth rather than clipping.

    * ``I;16`` / ``I;16B`` / ``I;16L`` (16-bit grey): ``v >> 8`` (65535 -> 255, 32768 -> 128).
    * ``I`` (32-bit integer): values within 0..65535 are 16-bit data (``v >> 8``); anything else
      (negative or wider values) is min-max scaled to 0..255.
    * ``F`` (float): NaN -> 0, infinities clipped to the finite range; values within [0, 1] are
      multiplied by 255; otherwise min-max scaled to 0..255; a constant image outside [0, 1] is
      clipped to 0..255.
    * alpha (RGBA, LA, PA, RGBa, La) and palette/grey/RGB with a transparency key: composited on
      white. Everything else (P, 1, L, CMYK, YCbCr, LAB, HSV, RGBX, ...): Pillow's ``convert``.
      16-bit RGB(A) files are already reduced to 8 bits by Pillow's decoders (high byte).

    Example::

        >>> import numpy as np
        >>> grey16 = Image.fromarray(np.full((2, 2), 32768, np.uint16))
        >>> to_rgb(grey16).getpixel((0, 0))
        (128, 128, 128)
        >>> to_rgb(Image.fromarray(np.full((2, 2), 0.5, np.float32))).getpixel((0, 0))
        (128, 128, 128)
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _to_l8(img)
        return img.convert("RGB")
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        if img.mode == "La":
            img = img.convert("LA")
        rgba = img.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return img.convert("RGB")


def load_image_file(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS,
                    formats: str | Iterable[str] = DEFAULT_FORMATS) -> Image.Image:
    """Read and decode an image file (see :func:`decode_image`); OSError for unreadable files."""
    return decode_image(Path(path).read_bytes(), max_pixels=max_pixels, formats=formats)


def preprocess(img: Image.Image, size: Sequence[int], mean: Sequence[float],
               std: Sequence[float], interpolation: Optional[str] = None,
               crop: Optional[float] = None) -> torch.Tensor:
    """RGB image -> float32 tensor (3, H, W): resize of the whole image to ``size`` (H, W; filter
    ``interpolation``: nearest, bilinear (default) or bicubic), scale to [0, 1], then
    ``(x - mean) / std`` per channel. With ``crop`` (a fraction in (0, 1], timm's ``crop_pct``):
    resize so the centre ``crop`` of the image covers ``size`` (aspect kept), then cut that centre."""
    h, w = int(size[0]), int(size[1])
    if img.mode != "RGB":
        img = to_rgb(img)
    resample = {None: Image.BILINEAR, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
                "bicubic": Image.BICUBIC}[interpolation]
    if crop is not None:
        scale = max(h / (crop * img.size[1]), w / (crop * img.size[0]))
        rw, rh = max(w, round(img.size[0] * scale)), max(h, round(img.size[1] * scale))
        if (rw, rh) != img.size:
            img = img.resize((rw, rh), resample)
        left, top = (rw - w) // 2, (rh - h) // 2
        img = img.crop((left, top, left + w, top + h))
    elif img.size != (w, h):
        img = img.resize((w, h), resample)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

"""Decode, validate and preprocess images: the one path shared by the handler and the batch job.

* :func:`decode_image` takes raw bytes (JPEG, PNG, WebP, BMP, GIF first frame, TIFF, ...), checks
  the pixel count from the header *before* decoding pixels (a decompression-bomb guard that does not
  touch Pillow's global ``Image.MAX_IMAGE_PIXELS``), applies EXIF orientation and returns RGB.
* :func:`preprocess` resizes the whole image to the model's input size (no crop, so a heatmap maps
  back onto the whole image) and normalises with the model's mean/std.

Errors are :class:`ImageError` with an HTTP-like ``code`` (400 or 413) and a ``type``.

Example::

    >>> import io
    >>> from PIL import Image
    >>> buf = io.BytesIO(); Image.new("RGB", (40, 30), "red").save(buf, "PNG")
    >>> img = decode_image(buf.getvalue())
    >>> preprocess(img, (96, 96), (0.5,) * 3, (0.25,) * 3).shape
    torch.Size([3, 96, 96])
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000


class ImageError(ValueError):
    """An input that is not a usable image. ``code`` is 400 (bad data) or 413 (too large)."""

    def __init__(self, message: str, code: int = 400, type: str = "InvalidImage") -> None:
        super().__init__(message)
        self.code = code
        self.type = type


def decode_image(data: bytes | bytearray | memoryview, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes to an RGB :class:`PIL.Image.Image` with EXIF orientation applied.

    Raises :class:`ImageError` for empty, unidentifiable or truncated data (400) and for images over
    ``max_pixels`` (413), the latter checked from the header before any pixel is decoded.
    """
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise ImageError(f"not an image: expected bytes, got {type(data).__name__}")
    if not data:
        raise ImageError("not an image: empty body (0 bytes)")
    with warnings.catch_warnings():
        # Pillow's own bomb check is relative to its global limit; ours is explicit below.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageError(f"not an image: cannot identify image data ({len(data)} bytes)") from None
        except Image.DecompressionBombError as exc:
            raise ImageError(f"image too large: {exc}", 413, "ImageTooLarge") from None
        except (OSError, ValueError, SyntaxError) as exc:
            raise ImageError(f"not an image: {exc} ({len(data)} bytes)") from None
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ImageError(f"not an image: invalid size {w}x{h}")
        if w * h > max_pixels:
            raise ImageError(f"image too large: {w}x{h} = {w * h} pixels exceeds the limit of "
                             f"{max_pixels} pixels", 413, "ImageTooLarge")
        try:
            img.seek(0)  # first frame of GIF/TIFF/WebP animations
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode != "RGB":
                if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                    rgba = img.convert("RGBA")
                    bg = Image.new("RGB", rgba.size, (255, 255, 255))
                    bg.paste(rgba, mask=rgba.getchannel("A"))
                    img = bg
                else:
                    img = img.convert("RGB")
        except Image.DecompressionBombError as exc:
            raise ImageError(f"image too large: {exc}", 413, "ImageTooLarge") from None
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            fmt = img.format or "image"
            raise ImageError(f"not an image: corrupt or truncated {fmt} data: {exc} "
                             f"({len(data)} bytes)") from None
    return img


def load_image_file(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read and decode an image file (see :func:`decode_image`); OSError for unreadable files."""
    return decode_image(Path(path).read_bytes(), max_pixels=max_pixels)


def preprocess(img: Image.Image, size: Sequence[int], mean: Sequence[float],
               std: Sequence[float]) -> torch.Tensor:
    """RGB image -> float32 tensor (3, H, W): bilinear resize of the whole image to ``size``
    (H, W), scale to [0, 1], then ``(x - mean) / std`` per channel."""
    h, w = int(size[0]), int(size[1])
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != (w, h):
        img = img.resize((w, h), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

"""The report's thumbnails: small JPEGs of each row's image and overlay (and, for segmentation, a
colour mask), made once under ``OUT_DIR/thumbs/`` and made again only when a source is newer.

Files are read with the batch job's bounded read of regular files
(:func:`camserve.onnx.inputs.read_file`) and decoded with :func:`camserve.images.decode_image`
(format allow-list, pixel limit before decoding); they are written atomically without following
links (:func:`camserve.onnx.outputs.write_file`). Each thumbnail is its own transaction: a missing,
refused, corrupt or hostile source leaves that thumbnail out and returns a reason, never an
exception.

Names: ``thumbs/<k[:2]>/<k>.<kind><side>.<ext>`` where ``k`` is :func:`thumb_key` of the row's
output name (hex, so no name ever reaches a URL or the filesystem) and kind is ``i`` (image),
``o`` (overlay: the job's overlay, else its heatmap over the image thumbnail), and for a
segmentation row ``s`` (its colour mask over the image thumbnail) and ``m`` (the colour mask alone,
RGBA PNG at most :data:`MASK_SIDE` pixels, drawn over the original in the detail view); class 0
is left transparent.

Example::

    >>> thumb_rel(thumb_key("photos/a.jpg"), "i", 128)
    'thumbs/58/58d4d8dec171db3f9c5a1448.i128.jpg'
    >>> palette(0), palette(1), palette(2)
    ((0, 0, 0), (128, 0, 0), (0, 128, 0))
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from ..images import DEFAULT_MAX_PIXELS, ImageError, decode_image
from ..onnx.inputs import DEFAULT_MAX_FILE_SIZE, Item, Refused, internal_error, os_reason, read_file
from ..onnx.outputs import write_file
from ..render import capped_size, colorize, overlay, resize_map
from .job import Sources

log = logging.getLogger(__name__)

THUMBS = "thumbs"
#: long side of a thumbnail (``--thumb-size``)
THUMB_SIDE = 128
#: long side of a segmentation row's colour mask
MASK_SIDE = 1024
JPEG_QUALITY = 80
#: alpha of the colour mask over the image (0..255)
MASK_ALPHA = 140

#: bits of :attr:`Preview.flags`: the thumbnails that exist (MASK: ``s`` and ``m``)
IMAGE, OVERLAY, MASK = 1, 2, 4


def thumb_key(ident: str) -> str:
    """24 hex characters of the SHA-256 of a row's output name (its bytes, undecodable ones
    included)."""
    return hashlib.sha256(ident.encode("utf-8", "surrogatepass")).hexdigest()[:24]


def thumb_prefix(key: str) -> str:
    """The path under OUT_DIR shared by a row's thumbnails (the page adds :func:`thumb_suffix`)."""
    return f"{THUMBS}/{key[:2]}/{key}"


def thumb_suffix(kind: str, side: int) -> str:
    """``.<kind><side>.<ext>``: ``.jpg`` for thumbnails, ``.png`` for the colour mask (``m``)."""
    return f".{kind}{side}.{'png' if kind == 'm' else 'jpg'}"


def thumb_rel(key: str, kind: str, side: int) -> str:
    """The thumbnail's path under OUT_DIR (see the module docstring)."""
    return thumb_prefix(key) + thumb_suffix(kind, side)


def palette(index: int) -> tuple[int, int, int]:
    """The colour of class ``index`` (0..255) in masks and legends: the PASCAL VOC palette
    (bits of the index spread over the three channels)."""
    r = g = b = 0
    c = index
    for j in range(8):
        r |= ((c >> 0) & 1) << (7 - j)
        g |= ((c >> 1) & 1) << (7 - j)
        b |= ((c >> 2) & 1) << (7 - j)
        c >>= 3
    return r, g, b


_PALETTE = np.array([palette(i) for i in range(256)], dtype=np.uint8)


@dataclass
class Preview:
    """What :meth:`Thumbnailer.make` did for one row: ``flags`` (:data:`IMAGE`, :data:`OVERLAY`,
    :data:`MASK`: the thumbnails there now), ``made`` (how many were written this time), one
    reason per thumbnail that could not be made, and whether the original image was not found
    (a wrong ``--input-root``?)."""

    flags: int = 0
    made: int = 0
    failures: list[str] = field(default_factory=list)
    missing_original: bool = False


class Thumbnailer:
    """Makes the thumbnails of rows under ``out_dir`` (thread-safe: one call per row)."""

    def __init__(self, out_dir: Path, side: int = THUMB_SIDE, *,
                 max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_file_size: int = DEFAULT_MAX_FILE_SIZE) -> None:
        self.out_dir = Path(out_dir)
        self.side = side
        self.max_pixels = max_pixels
        self.max_file_size = max_file_size

    # -- one row ----------------------------------------------------------------------------------

    def make(self, key: str, src: Sources) -> Preview:
        """The thumbnails of one row (``key``: :func:`thumb_key`), each made only when missing
        or older than one of its sources; never raises for a bad source."""
        p = Preview()
        base: Optional[Image.Image] = None
        rel_i = thumb_rel(key, "i", self.side)
        if src.image is not None:
            try:
                if self._fresh(rel_i, [src.image]):
                    p.flags |= IMAGE
                else:
                    base = self._write_jpeg(rel_i, self._thumb(self._decode(src.image)))
                    p.flags |= IMAGE
                    p.made += 1
            except Exception as exc:
                p.failures.append(f"image: {self._reason(exc, src.image)}")
                p.missing_original = isinstance(exc, FileNotFoundError)
        image_thumb = [str(self.out_dir / rel_i)] if p.flags & IMAGE else []
        for flag, source, deps, rels, make in (
                (MASK, src.mask, image_thumb, (thumb_rel(key, "s", self.side),
                                               thumb_rel(key, "m", MASK_SIDE)), self._make_mask),
                (OVERLAY, src.overlay or src.heatmap, [] if src.overlay else image_thumb,
                 (thumb_rel(key, "o", self.side),), self._make_overlay)):
            if source is None:
                continue
            try:
                if not all(self._fresh(rel, [source, *deps]) for rel in rels):
                    if base is None and deps:
                        base = self._decode(deps[0])
                    p.made += make(key, src, base)
                p.flags |= flag
            except Exception as exc:
                p.failures.append(f"{'mask' if flag == MASK else 'overlay'}: "
                                  f"{self._reason(exc, source)}")
        return p

    def _make_mask(self, key: str, src: Sources, base: Optional[Image.Image]) -> int:
        """The colour mask (RGBA, :data:`MASK_SIDE`) and its thumbnail over the image (``s``)."""
        index = np.asarray(self._decode(str(src.mask)))[:, :, 0]
        rgba = Image.fromarray(_PALETTE[index], "RGB")
        rgba.putalpha(Image.fromarray(np.where(index > 0, MASK_ALPHA, 0).astype(np.uint8), "L"))
        del index
        big = rgba.resize(capped_size(rgba.size, MASK_SIDE), Image.NEAREST)
        self._write(thumb_rel(key, "m", MASK_SIDE), _png(big))
        small = rgba.resize(capped_size(rgba.size, self.side), Image.NEAREST)
        canvas = (base.resize(small.size, Image.BILINEAR) if base is not None
                  else Image.new("RGB", small.size, (255, 255, 255)))
        canvas.paste(small, mask=small.getchannel("A"))
        self._write_jpeg(thumb_rel(key, "s", self.side), canvas)
        return 2

    def _make_overlay(self, key: str, src: Sources, base: Optional[Image.Image]) -> int:
        """The overlay thumbnail: the job's overlay, else its heatmap over the image thumbnail
        (alone, colour-mapped, without one)."""
        rel_o = thumb_rel(key, "o", self.side)
        if src.overlay is not None:
            self._write_jpeg(rel_o, self._thumb(self._decode(src.overlay)))
            return 1
        heat = self._thumb(self._decode(str(src.heatmap)))
        hm = np.ascontiguousarray(np.asarray(heat)[:, :, 0])
        if base is None:  # no image to blend over: the colour-mapped heatmap alone
            self._write_jpeg(rel_o, Image.fromarray(colorize(hm), "RGB"))
        else:
            self._write_jpeg(rel_o, overlay(base, resize_map(hm, base.size)))
        return 1

    # -- pieces -------------------------------------------------------------------------------------

    def _decode(self, path: str) -> Image.Image:
        return decode_image(read_file(path, self.max_file_size), max_pixels=self.max_pixels)

    def _thumb(self, img: Image.Image, resample: int = Image.BICUBIC) -> Image.Image:
        size = capped_size(img.size, self.side)
        return img if size == img.size else img.resize(size, resample, reducing_gap=2.0)

    def _write_jpeg(self, rel: str, img: Image.Image) -> Image.Image:
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "JPEG", quality=JPEG_QUALITY, optimize=True)
        self._write(rel, buf.getvalue())
        return img

    def _write(self, rel: str, data: bytes) -> None:
        try:
            write_file(self.out_dir, rel, data)
        except OSError as exc:
            raise Refused("UnwritableOutput", f"cannot write the thumbnail: {os_reason(exc)}") \
                from None

    def _fresh(self, rel: str, sources: Sequence[str]) -> bool:
        """The thumbnail exists as a regular file no older than any of ``sources`` (a source
        that cannot be stat'ed makes it stale, so the attempt reports why)."""
        try:
            st = os.lstat(self.out_dir / rel)
        except OSError:
            return False
        if not stat.S_ISREG(st.st_mode):
            return False
        try:
            newest = max(os.stat(s).st_mtime_ns for s in sources)
        except OSError:
            return False
        return st.st_mtime_ns >= newest

    @staticmethod
    def _reason(exc: BaseException, path: str) -> str:
        """``type: reason`` of a failed thumbnail, as the batch job words its item errors."""
        if isinstance(exc, Refused):
            return f"{exc.type}: {exc.reason}"
        if isinstance(exc, ImageError):
            return f"{exc.type}: {exc}"
        if isinstance(exc, OSError):
            return f"UnreadableFile: cannot read file: {os_reason(exc)}"
        if isinstance(exc, MemoryError):
            return "OutOfMemory: not enough memory to decode this file"
        failed = internal_error(Item(path, path), exc)
        return f"{failed.type}: {failed.reason}"


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=False, compress_level=6)
    return buf.getvalue()

"""Heatmap -> PNG, colour overlay and bounding box (Pillow + numpy + a colormap table; no OpenCV).

Heatmaps here are uint8 arrays (H, W), 0..255: at the size of the original image, or at a capped
size (:func:`capped_size`) from which :func:`resize_map` makes them bigger and :func:`scale_box`
takes boxes back to original pixels. Memory stays bounded: the overlay is blended in bands of
about one megapixel into one output image (never several full-size float copies), and
:func:`png_bytes` can stop an encoding as soon as it passes a byte limit
(:class:`OutputTooLarge`).

Example::

    >>> import numpy as np
    >>> hm = np.zeros((40, 60), np.uint8); hm[10:20, 30:50] = 255
    >>> bbox_from_heatmap(hm)
    [30, 10, 50, 20]
    >>> capped_size((6000, 4000), 2048)
    (2048, 1365)
    >>> scale_box([30, 10, 50, 20], (60, 40), (600, 400))
    [300, 100, 500, 200]
"""
from __future__ import annotations

import base64
import io
import math
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage


def _jet_table() -> np.ndarray:
    """256×3 uint8 'jet' colormap: dark blue -> blue -> cyan -> yellow -> red -> dark red."""
    x = np.linspace(0.0, 1.0, 256)

    def ramp(center: float) -> np.ndarray:
        return np.clip(1.5 - np.abs(4.0 * x - center), 0.0, 1.0)

    rgb = np.stack([ramp(3.0), ramp(2.0), ramp(1.0)], axis=1)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


JET: np.ndarray = _jet_table()


def _check_map(heatmap: np.ndarray) -> np.ndarray:
    hm = np.asarray(heatmap)
    if hm.ndim != 2:
        raise ValueError(f"invalid value for heatmap: expected (H, W), got shape {hm.shape}")
    if hm.dtype != np.uint8:
        raise ValueError(f"invalid value for heatmap: expected uint8, got {hm.dtype}")
    return hm


#: Pixels per band when blending an overlay (about one megapixel).
BAND_PIXELS = 1 << 20


class OutputTooLarge(ValueError):
    """An encoding passed its byte limit and was stopped (``size``: bytes written so far)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"encoded output too large: more than {limit} bytes")
        self.size = size
        self.limit = limit


class _CappedBuffer(io.BytesIO):
    """A BytesIO that refuses to grow past ``limit`` bytes (stops an encoder early)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def write(self, data) -> int:  # type: ignore[override]
        n = super().write(data)
        if self.tell() > self.limit:
            raise OutputTooLarge(self.tell(), self.limit)
        return n


def png_bytes(img: Image.Image, max_bytes: Optional[int] = None) -> bytes:
    """Encode a Pillow image as PNG bytes; with ``max_bytes`` the encoder is stopped as soon as the
    output passes it (:class:`OutputTooLarge`)."""
    buf = io.BytesIO() if max_bytes is None else _CappedBuffer(max_bytes)
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def capped_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """``size`` (W, H) scaled down, aspect kept, so that its long side is at most ``max_side``
    (each side at least 1); unchanged when it already fits."""
    w, h = int(size[0]), int(size[1])
    if max(w, h) <= max_side:
        return w, h
    s = max_side / max(w, h)
    return max(1, min(max_side, round(w * s))), max(1, min(max_side, round(h * s)))


def resize_map(heatmap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A uint8 map resized (bilinear) to ``size`` (W, H); the same array when it already is."""
    hm = _check_map(heatmap)
    if (hm.shape[1], hm.shape[0]) == tuple(size):
        return hm
    return np.asarray(Image.fromarray(hm, mode="L").resize(tuple(size), Image.BILINEAR))


def scale_box(box: Optional[list[int]], src: tuple[int, int],
              dst: tuple[int, int]) -> Optional[list[int]]:
    """A box ``[x0, y0, x1, y1]`` on a map of size ``src`` (W, H) in the pixels of ``dst``: the
    smallest box of ``dst`` pixels covering it (x1, y1 exclusive)."""
    if box is None or tuple(src) == tuple(dst):
        return box
    sx, sy = dst[0] / src[0], dst[1] / src[1]
    return [max(0, math.floor(box[0] * sx)), max(0, math.floor(box[1] * sy)),
            min(int(dst[0]), math.ceil(box[2] * sx)), min(int(dst[1]), math.ceil(box[3] * sy))]


def b64(data: bytes) -> str:
    """Base64 text of ``data`` (for JSON)."""
    return base64.b64encode(data).decode("ascii")


def heatmap_png(heatmap: np.ndarray, max_bytes: Optional[int] = None) -> bytes:
    """8-bit grayscale PNG of a uint8 heatmap (``max_bytes``: see :func:`png_bytes`)."""
    return png_bytes(Image.fromarray(_check_map(heatmap), mode="L"), max_bytes)


def colorize(heatmap: np.ndarray) -> np.ndarray:
    """uint8 (H, W) -> uint8 (H, W, 3) through the jet table."""
    return JET[_check_map(heatmap)]


def overlay(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The colour-mapped heatmap blended over ``image`` (resized to the heatmap's size if needed).

    Blended in bands of about :data:`BAND_PIXELS` into one RGB output: besides the image and the
    map, memory holds the output and one band's colour and blend (uint8), never a full-size float
    copy. The result equals one ``Image.blend`` over the whole image.
    """
    hm = _check_map(heatmap)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"invalid value for alpha: {alpha} (allowed: 0..1)")
    h, w = hm.shape
    base = image if image.mode == "RGB" else image.convert("RGB")
    if base.size != (w, h):
        base = base.resize((w, h), Image.BILINEAR)
    out = Image.new("RGB", (w, h))
    step = max(1, BAND_PIXELS // w)
    for y0 in range(0, h, step):
        y1 = min(h, y0 + step)
        colour = Image.fromarray(JET[hm[y0:y1]], mode="RGB")
        out.paste(Image.blend(base.crop((0, y0, w, y1)), colour, alpha), (0, y0))
    return out


def draw_box(img: Image.Image, box: Sequence[float], width: Optional[int] = None) -> Image.Image:
    """``img`` with the outline of ``box`` (``x0, y0, x1, y1`` in its pixels, x1/y1 exclusive)
    drawn in white over black, so it shows on any map; the line is about 0.4 % of the long side
    (at least 1 px). Drawn in place; returns ``img``.

    Example::

        >>> im = draw_box(Image.new("RGB", (20, 10)), (2, 2, 12, 8), width=1)
        >>> im.getpixel((2, 5)), im.getpixel((6, 5))
        ((255, 255, 255), (0, 0, 0))
    """
    w = width or max(1, round(0.004 * max(img.size)))
    x0, y0, x1, y1 = (float(v) for v in box)
    draw = ImageDraw.Draw(img)
    outer = [x0 - w, y0 - w, x1 - 1 + w, y1 - 1 + w]
    draw.rectangle(outer, outline=(0, 0, 0), width=w)
    draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(255, 255, 255), width=w)
    return img


def overlay_png(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.5,
                max_bytes: Optional[int] = None, box: Optional[Sequence[float]] = None) -> bytes:
    """PNG bytes of :func:`overlay` (``max_bytes``: see :func:`png_bytes`), with ``box`` (in the
    heatmap's pixels) drawn when given (:func:`draw_box`)."""
    img = overlay(image, heatmap, alpha)
    if box is not None:
        draw_box(img, box)
    return png_bytes(img, max_bytes)


def bbox_from_heatmap(heatmap: np.ndarray, threshold: float = 0.15) -> list[int] | None:
    """Box ``[x0, y0, x1, y1]`` (x1, y1 exclusive) around the largest 8-connected region of the map
    above ``threshold`` × its maximum — the Grad-CAM paper's localisation rule. None for an
    all-zero map."""
    hm = _check_map(heatmap)
    peak = int(hm.max())
    if peak == 0:
        return None
    mask = hm >= max(1.0, threshold * peak)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    k = 1
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        k = int(sizes.argmax())
    del mask
    # the region's bounding slices: no index arrays the size of the map (a 24 MP map would need two
    # int64 arrays of up to 192 MB each)
    rows, cols = ndimage.find_objects(labels, max_label=k)[k - 1]
    return [int(cols.start), int(rows.start), int(cols.stop), int(rows.stop)]

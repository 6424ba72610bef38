"""Heatmap -> PNG, colour overlay and bounding box (Pillow + numpy + a colormap table; no OpenCV).

Heatmaps here are uint8 arrays (H, W), 0..255, at the size of the original image.

Example::

    >>> import numpy as np
    >>> hm = np.zeros((40, 60), np.uint8); hm[10:20, 30:50] = 255
    >>> bbox_from_heatmap(hm)
    [30, 10, 50, 20]
"""
from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image
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


def png_bytes(img: Image.Image) -> bytes:
    """Encode a Pillow image as PNG bytes."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def b64(data: bytes) -> str:
    """Base64 text of ``data`` (for JSON)."""
    return base64.b64encode(data).decode("ascii")


def heatmap_png(heatmap: np.ndarray) -> bytes:
    """8-bit grayscale PNG of a uint8 heatmap."""
    return png_bytes(Image.fromarray(_check_map(heatmap), mode="L"))


def colorize(heatmap: np.ndarray) -> np.ndarray:
    """uint8 (H, W) -> uint8 (H, W, 3) through the jet table."""
    return JET[_check_map(heatmap)]


def overlay(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The colour-mapped heatmap blended over ``image`` (resized to the heatmap's size if needed)."""
    hm = _check_map(heatmap)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"invalid value for alpha: {alpha} (allowed: 0..1)")
    base = image.convert("RGB")
    if base.size != (hm.shape[1], hm.shape[0]):
        base = base.resize((hm.shape[1], hm.shape[0]), Image.BILINEAR)
    return Image.blend(base, Image.fromarray(colorize(hm), mode="RGB"), alpha)


def overlay_png(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.5) -> bytes:
    """PNG bytes of :func:`overlay`."""
    return png_bytes(overlay(image, heatmap, alpha))


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
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == int(sizes.argmax())
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]

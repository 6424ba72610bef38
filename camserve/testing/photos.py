"""Photo-like test images: what benchmarks and end-to-end tests feed the batch job and the servers.

Example::

    >>> import tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> [p.name for p in write_photos(folder, 2, size=(64, 48))]
    ['img_0000.jpg', 'img_0001.jpg']
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def photo(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """One photo-like RGB image: smooth colour gradients, a few shapes, blur and sensor noise (so
    JPEG sizes and decode times resemble real photos, unlike flat synthetic images)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([(xx / width) * rng.uniform(60, 200), (yy / height) * rng.uniform(60, 200),
                     np.full_like(xx, rng.uniform(30, 220))], axis=-1)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        x0 = int(rng.integers(0, max(1, width - 60)))
        y0 = int(rng.integers(0, max(1, height - 60)))
        box = [x0, y0, x0 + int(rng.integers(8, max(9, width // 2))),
               y0 + int(rng.integers(8, max(9, height // 2)))]
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(1.5)), dtype=np.int16)
    return Image.fromarray(np.clip(arr + rng.integers(-12, 13, arr.shape), 0, 255).astype(np.uint8))


def write_photos(folder: Path, n: int, *, seed: int = 0, size: Optional[tuple[int, int]] = None,
                 quality: int = 90) -> list[Path]:
    """Write ``n`` photo-like JPEGs ``img_0000.jpg``... into ``folder``; ``size`` (W, H) fixed, or
    by default random between 400×300 and 640×480. Returns the paths, in order."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = size or (int(rng.integers(400, 641)), int(rng.integers(300, 481)))
        path = folder / f"img_{i:04d}.jpg"
        photo(rng, w, h).save(path, quality=quality)
        paths.append(path)
    return paths

"""Synthetic batch-job folders: input images, artefacts and ``results.jsonl``/``errors.jsonl`` lines
in the batch job's own format, without a model, for the report's tests and benchmark.

Images are seeded noise with one bright square; the "CAM" is a Gaussian blob on the square, so the
heatmap, overlay and bbox are made by :mod:`camserve.render` exactly as the job makes them, and
lines are encoded with the job's :func:`camserve.onnx.outputs.encode_line` and written with its
:func:`camserve.onnx.outputs.write_file`. Scores are seeded, so sorting has something to sort.

Example::

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> lines = write_job(root / "job", 3, inputs=root / "in", errors=1)
    >>> [line["label"] for line in lines] == [json.loads(t)["label"] for t in
    ...     (root / "job" / "results.jsonl").read_text().splitlines()]
    True
    >>> sorted(lines[0]["files"])
    ['heatmap', 'overlay']
"""
from __future__ import annotations

import io
import json  # noqa: F401  (the example reads the lines back)
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from ..onnx.outputs import ERRORS, RESULTS, SAVE_SUFFIXES, encode_line, write_file
from ..render import bbox_from_heatmap, heatmap_png, overlay_png

__all__ = ["write_job", "LABELS"]

LABELS: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring", "diamond",
                           "hexagon")


def _image(rng: np.random.Generator, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """(H, W, 3) uint8 noise with a bright square; the square's centre (x, y)."""
    w, h = size
    arr = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    s = max(2, min(w, h) // 3)
    x0, y0 = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
    arr[y0:y0 + s, x0:x0 + s] = rng.integers(120, 255, 3, dtype=np.uint8)
    return arr, (x0 + s // 2, y0 + s // 2)


def _blob(size: tuple[int, int], centre: tuple[int, int]) -> np.ndarray:
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    sigma = max(w, h) / 8
    g = np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * sigma ** 2))
    return (255 * g / g.max()).astype(np.uint8)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def write_job(out_dir: Path, n: int, *, inputs: Path, root: Optional[Path] = None, seed: int = 0,
              size: tuple[int, int] = (64, 48), save: Sequence[str] = ("heatmap", "overlay"),
              metrics: Sequence[str] = ("deletion", "avg_drop"), errors: int = 0,
              names: Optional[Sequence[str]] = None, method: str = "gradcam") -> list[dict[str, Any]]:
    """A job folder ``out_dir`` over ``n`` synthetic PNGs written to ``inputs`` (``names``: their
    file names, default ``img_00000.png``...), with the artefacts of ``save`` and ``metrics``
    values, plus ``errors`` lines in errors.jsonl; ``path`` keys are relative to ``root`` when
    given (as a job run from ``root`` writes them), else absolute. Returns the results lines."""
    rng = np.random.default_rng(seed)
    inputs.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines: list[dict[str, Any]] = []
    for i in range(n):
        fname = names[i] if names is not None else f"img_{i:05d}.png"
        arr, centre = _image(rng, size)
        src = inputs / fname
        with open(os.fsencode(src), "wb") as fh:
            fh.write(_png(arr))
        path = os.path.relpath(src, root) if root is not None else str(src)
        name = f"{inputs.name}/{fname}"
        heat = _blob(size, centre)
        files: dict[str, str] = {}
        for kind in save:
            rel = name + SAVE_SUFFIXES[kind]
            if kind == "heatmap":
                data = heatmap_png(heat)
            elif kind == "overlay":
                data = overlay_png(Image.fromarray(arr, "RGB"), heat)
            else:
                buf = io.BytesIO()
                np.save(buf, heat.astype(np.float32) / 255)
                data = buf.getvalue()
            write_file(out_dir, rel, data)
            files[kind] = rel
        probs = rng.dirichlet(np.full(len(LABELS), 0.3))
        order = np.argsort(-probs, kind="stable")[:3]
        topk = [{"index": int(k), "label": LABELS[k], "score": round(float(probs[k]), 6)}
                for k in order]
        line: dict[str, Any] = {"path": path, "name": name, "width": size[0], "height": size[1],
                                "topk": topk, "target": topk[0]["index"],
                                "label": topk[0]["label"], "score": topk[0]["score"],
                                "bbox": bbox_from_heatmap(heat), "method": method,
                                "layer": "features"}
        if metrics:
            line["metrics"] = {k: round(float(rng.random()), 6) for k in metrics}
        line["files"] = files
        lines.append(line)
    with open(out_dir / RESULTS, "w", encoding="utf-8") as fh:
        fh.writelines(encode_line(line) + "\n" for line in lines)
    with open(out_dir / ERRORS, "w", encoding="utf-8") as fh:
        for j in range(errors):
            fh.write(encode_line({"path": str(inputs / f"broken_{j:03d}.png"),
                                  "type": "InvalidImage",
                                  "reason": "not an image: cannot identify image data (12 bytes)"})
                     + "\n")
    return lines


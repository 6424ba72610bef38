"""Synthetic batch-job folders: input images, artefacts and ``results.jsonl``/``errors.jsonl`` lines
in the batch job's own format, without a model, for the report's tests and benchmark.

Images are seeded noise with one bright square; the "CAM" is a Gaussian blob on the square, so the
heatmap, overlay and bbox are made by :mod:`camserve.render` exactly as the job makes them (a
segmentation line's mask by :func:`camserve.tasks.segmentation.mask_png`: the square is the
class), and lines are encoded with the job's :func:`camserve.onnx.outputs.encode_line` and
written with its :func:`camserve.onnx.outputs.write_file`. Scores are seeded, so sorting has
something to sort. Lines of every task of :data:`TASK_NAMES` (``write_job(..., task=)``).

Example::

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> lines = write_job(root / "job", 3, inputs=root / "in", errors=1)
    >>> [line["label"] for line in lines] == [json.loads(t)["label"] for t in
    ...     (root / "job" / "results.jsonl").read_text().splitlines()]
    True
    >>> sorted(lines[0]["files"])
    ['heatmap', 'overlay']
    >>> det = write_job(root / "det", 1, inputs=root / "in", task="detection")[0]
    >>> [sorted(d["explanation"]["files"]) for d in det["detections"]]
    [['heatmap', 'overlay'], ['heatmap', 'overlay']]
"""
from __future__ import annotations

import io
import json  # noqa: F401  (the example reads the lines back)
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from ..onnx.job import MASK_SUFFIX
from ..onnx.outputs import ERRORS, RESULTS, SAVE_SUFFIXES, encode_line, write_file
from ..render import bbox_from_heatmap, heatmap_png, overlay_png
from ..tasks.segmentation import mask_png

__all__ = ["write_job", "LABELS", "TASK_NAMES"]

LABELS: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring", "diamond",
                           "hexagon")


def _image(rng: np.random.Generator, size: tuple[int, int]
           ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """(H, W, 3) uint8 noise with a bright square; the square's box [x0, y0, x1, y1]."""
    w, h = size
    arr = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    s = max(2, min(w, h) // 3)
    x0, y0 = int(rng.integers(0, w - s)), int(rng.integers(0, h - s))
    arr[y0:y0 + s, x0:x0 + s] = rng.integers(120, 255, 3, dtype=np.uint8)
    return arr, (x0, y0, x0 + s - 1, y0 + s - 1)


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


#: the tasks :func:`write_job` writes lines of
TASK_NAMES = ("classification", "multilabel", "segmentation", "detection")


def _artefacts(out_dir: Path, name: str, arr: np.ndarray, heat: np.ndarray,
               save: Sequence[str]) -> dict[str, str]:
    """The artefacts of ``save`` for one map, written under ``out_dir``; ``{kind: path}``."""
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
    return files


def _task_line(task: str, rng: np.random.Generator, labels: Sequence[str], out_dir: Path,
               name: str, arr: np.ndarray, heat: np.ndarray, square: tuple[int, int, int, int],
               save: Sequence[str], method: str) -> dict[str, Any]:
    """The task's keys of one line (the batch job's shapes, docs/tasks.md and docs/batch.md)."""
    probs = rng.dirichlet(np.full(len(labels), 0.3))
    order = np.argsort(-probs, kind="stable")[:3]
    topk = [{"index": int(k), "label": labels[k], "score": round(float(probs[k]), 6)}
            for k in order]
    if task == "detection":  # the square, and a second box on the other half
        h, w = arr.shape[:2]
        x0, y0, x1, y1 = square
        other = [0, 0, w // 2, h // 2] if x0 >= w // 2 else [w // 2, h // 2, w - 1, h - 1]
        dets = []
        for j, (box, k) in enumerate(((list(square), int(order[0])), (other, int(order[1])))):
            files = _artefacts(out_dir, f"{name}.{j}", arr, heat, save)
            dets.append({"box": box, "label": labels[k], "index": k,
                         "score": round(float(0.5 + probs[k] / 2), 6),
                         "explanation": {"method": method, "bbox": bbox_from_heatmap(heat),
                                         "files": files}})
        return {"task": "detection", "detections": dets}
    line: dict[str, Any] = {"topk": topk, "target": topk[0]["index"], "label": topk[0]["label"],
                            "score": topk[0]["score"], "bbox": bbox_from_heatmap(heat),
                            "method": method}
    if task == "multilabel":
        sig = [round(float(v), 6) for v in rng.random(len(labels))]
        chosen = [k for k in np.argsort(sig)[::-1] if sig[k] >= 0.5][:4] or [int(np.argmax(sig))]
        picked = [{"index": int(k), "label": labels[k], "score": sig[k]} for k in chosen]
        line.update(topk=picked[:3], target=picked[0]["index"], label=picked[0]["label"],
                    score=picked[0]["score"], task="multilabel", labels=picked, threshold=0.5)
    elif task == "segmentation":  # background 0, the square of class k
        k = 1 + int(rng.integers(0, len(labels) - 1))
        mask = np.zeros(arr.shape[:2], np.uint8)
        x0, y0, x1, y1 = square
        mask[y0:y1 + 1, x0:x1 + 1] = k
        write_file(out_dir, name + MASK_SUFFIX, mask_png(mask))
        share = round(float((mask == k).mean()), 6)
        line.update(target=k, label=labels[k], task="segmentation", segmentation={
            "mask": name + MASK_SUFFIX,
            "classes": [{"index": 0, "label": labels[0], "share": round(1 - share, 6)},
                        {"index": k, "label": labels[k], "share": share}]})
        line.pop("topk")
    return line


def write_job(out_dir: Path, n: int, *, inputs: Path, root: Optional[Path] = None, seed: int = 0,
              size: tuple[int, int] = (64, 48), save: Sequence[str] = ("heatmap", "overlay"),
              metrics: Sequence[str] = ("deletion", "avg_drop"), errors: int = 0,
              names: Optional[Sequence[str]] = None, method: str = "gradcam",
              task: str = "classification", labels: Sequence[str] = LABELS
              ) -> list[dict[str, Any]]:
    """A job folder ``out_dir`` over ``n`` synthetic PNGs written to ``inputs`` (``names``: their
    file names, default ``img_00000.png``...), with the artefacts of ``save`` and ``metrics``
    values, plus ``errors`` lines in errors.jsonl; ``path`` keys are relative to ``root`` when
    given (as a job run from ``root`` writes them), else absolute. ``task``: one of
    :data:`TASK_NAMES`, the lines that task's graph writes (multilabel ``labels``, segmentation
    a class-index mask file and class shares, ``labels[0]`` the background, detection two boxes
    each with its explanation's files), over ``labels``. Returns the results lines."""
    if task not in TASK_NAMES:
        raise ValueError(f"invalid value for task: {task!r} (allowed: {', '.join(TASK_NAMES)})")
    rng = np.random.default_rng(seed)
    inputs.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    lines: list[dict[str, Any]] = []
    for i in range(n):
        fname = names[i] if names is not None else f"img_{i:05d}.png"
        arr, square = _image(rng, size)
        src = inputs / fname
        with open(os.fsencode(src), "wb") as fh:
            fh.write(_png(arr))
        path = os.path.relpath(src, root) if root is not None else str(src)
        name = f"{inputs.name}/{fname}"
        centre = ((square[0] + square[2]) // 2, (square[1] + square[3]) // 2)
        heat = _blob(size, centre)
        line: dict[str, Any] = {"path": path, "name": name, "width": size[0], "height": size[1]}
        line.update(_task_line(task, rng, labels, out_dir, name, arr, heat, square, save, method))
        if task != "detection":
            line["layer"] = "features"
        if metrics:
            line["metrics"] = {k: round(float(rng.random()), 6) for k in metrics}
        if task != "detection":
            line["files"] = _artefacts(out_dir, name, arr, heat, save)
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

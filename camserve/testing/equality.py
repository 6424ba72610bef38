"""Are two servers' answers the same? The comparison behind "answers do not depend on the backend".

:func:`compare_answers` takes the JSON bodies two servers (or two backends) gave for the same
requests, in order, and measures how far apart they are: the largest score difference (predictions
and explanations), the largest heatmap difference in grey levels (overlays: their size), the largest bbox difference in
pixels, and whether everything discrete — statuses, error types, predicted and explained classes,
labels, methods, layers, sizes — is equal. Per task: a segmentation's class mask (pixels that
differ) and its classes' shares, an embedding's vector and similarity (as scores), the role of
each explanation's image. :meth:`AnswerDiff.check` holds them to the project's
bar: scores within 1e-4, heatmaps within one grey level, the same bbox.

Example::

    >>> a = [{"predictions": [{"index": 1, "label": "b", "score": 0.7}]}]
    >>> b = [{"predictions": [{"index": 1, "label": "b", "score": 0.70004}]}]
    >>> d = compare_answers(a, b)
    >>> d.rows, d.same_discrete, round(d.max_score, 5), d.ok()
    (1, True, 4e-05, True)
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

#: keys of an explanation that must be equal (besides score, heatmap, bbox)
EXPLANATION_KEYS = ("target", "label", "method", "layer", "width", "height", "scaled",
                    "map_width", "map_height", "image")
#: keys of a segmentation answer that must be equal (besides its mask and shares)
SEGMENTATION_KEYS = ("width", "height", "scaled", "mask_width", "mask_height")


@dataclass
class AnswerDiff:
    """How far two lists of answers are apart (see the module docstring); ``problems`` names the
    first discrete differences."""

    rows: int = 0
    maps: int = 0
    max_score: float = 0.0
    max_grey: int = 0
    max_bbox: int = 0
    #: segmentation masks: the most pixels of one mask that differ
    mask_pixels: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def same_discrete(self) -> bool:
        """Statuses, classes, labels, methods, sizes: all equal."""
        return not self.problems

    def ok(self, score: float = 1e-4, grey: int = 1, bbox: int = 0, mask: int = 0) -> bool:
        """Within the bar: scores within ``score``, heatmaps within ``grey`` levels, bboxes within
        ``bbox`` pixels, at most ``mask`` pixels of a segmentation mask differ, and nothing
        discrete differs."""
        return (self.same_discrete and self.max_score <= score and self.max_grey <= grey
                and self.max_bbox <= bbox and self.mask_pixels <= mask)

    def check(self, score: float = 1e-4, grey: int = 1, bbox: int = 0, mask: int = 0) -> None:
        """AssertionError saying what is over the bar."""
        if not self.ok(score, grey, bbox, mask):
            raise AssertionError(f"answers differ: {self}")

    def __str__(self) -> str:
        first = "; ".join(self.problems[:3]) or "none"
        return (f"{self.rows} rows, {self.maps} maps: max score diff {self.max_score:.2e}, max "
                f"heatmap diff {self.max_grey} grey levels, max bbox diff {self.max_bbox} px, "
                f"mask pixels differing {self.mask_pixels}, discrete differences: {first}")


def _png(text: str) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(base64.b64decode(text))) as im:
        return np.asarray(im).astype(np.int64)


def _scores(diff: AnswerDiff, where: str, a: Sequence[dict], b: Sequence[dict]) -> None:
    if [(p.get("index"), p.get("label")) for p in a] != [(p.get("index"), p.get("label"))
                                                         for p in b]:
        diff.problems.append(f"{where}: {[p.get('index') for p in a]} vs "
                             f"{[p.get('index') for p in b]}")
        return
    for p, q in zip(a, b):
        diff.max_score = max(diff.max_score, abs(float(p["score"]) - float(q["score"])))


def _values(diff: AnswerDiff, where: str, a: Any, b: Any) -> None:
    """Numbers compared as scores (an embedding, a similarity); None only against None."""
    if (a is None) != (b is None) or np.shape(a) != np.shape(b):
        diff.problems.append(f"{where}: {np.shape(a) if a is not None else None} vs "
                             f"{np.shape(b) if b is not None else None}")
    elif a is not None and np.size(a):
        diff.max_score = max(diff.max_score, float(np.abs(np.subtract(a, b, dtype=float)).max()))


def _segmentation(diff: AnswerDiff, where: str, s: dict, t: dict) -> None:
    for key in SEGMENTATION_KEYS:
        if s.get(key) != t.get(key):
            diff.problems.append(f"{where}.{key}: {s.get(key)!r} vs {t.get(key)!r}")
    ma, mb = _png(s["mask"]), _png(t["mask"])
    differ = int((ma != mb).sum()) if ma.shape == mb.shape else ma.size
    if ma.shape != mb.shape:
        diff.problems.append(f"{where}.mask: shape {ma.shape} vs {mb.shape}")
    diff.mask_pixels = max(diff.mask_pixels, differ)
    ca = {c["index"]: c["share"] for c in s.get("classes", ())}
    cb = {c["index"]: c["share"] for c in t.get("classes", ())}
    if differ == 0 and list(ca) != list(cb):  # the same mask lists the same classes
        diff.problems.append(f"{where}.classes: {list(ca)} vs {list(cb)}")
    for c in set(ca) & set(cb):
        diff.max_score = max(diff.max_score, abs(float(ca[c]) - float(cb[c])))


def _explanation(diff: AnswerDiff, where: str, e: dict, f: dict) -> None:
    diff.maps += 1
    for key in EXPLANATION_KEYS:
        if e.get(key) != f.get(key):
            diff.problems.append(f"{where}.{key}: {e.get(key)!r} vs {f.get(key)!r}")
    if "score" in e and "score" in f:
        diff.max_score = max(diff.max_score, abs(float(e["score"]) - float(f["score"])))
    for key in ("heatmap", "overlay"):
        if (e.get(key) is None) != (f.get(key) is None):
            diff.problems.append(f"{where}.{key}: present in one answer only")
        elif e.get(key) is not None:
            ha, hb = _png(e[key]), _png(f[key])
            if ha.shape != hb.shape:
                diff.problems.append(f"{where}.{key}: shape {ha.shape} vs {hb.shape}")
            elif key == "heatmap":  # the overlay's colours follow the heatmap's grey levels
                diff.max_grey = max(diff.max_grey, int(np.abs(ha - hb).max()) if ha.size else 0)
    ba, bb = e.get("bbox"), f.get("bbox")
    if (ba is None) != (bb is None):
        diff.problems.append(f"{where}.bbox: {ba!r} vs {bb!r}")
    elif ba is not None:
        diff.max_bbox = max(diff.max_bbox, int(np.abs(np.subtract(ba, bb)).max()))


def compare_answers(a: Sequence[dict[str, Any]], b: Sequence[dict[str, Any]],
                    statuses: Optional[tuple[Sequence[int], Sequence[int]]] = None) -> AnswerDiff:
    """Compare two lists of answer bodies row by row (``statuses``: their HTTP statuses, when
    known, compared too)."""
    diff = AnswerDiff(rows=len(a))
    if len(a) != len(b):
        diff.problems.append(f"{len(a)} answers vs {len(b)}")
    if statuses is not None and list(statuses[0]) != list(statuses[1]):
        diff.problems.append(f"statuses {list(statuses[0])} vs {list(statuses[1])}")
    for i, (x, y) in enumerate(zip(a, b)):
        if "type" in x or "type" in y:  # error bodies: same code and type
            if (x.get("code"), x.get("type")) != (y.get("code"), y.get("type")):
                diff.problems.append(f"row {i}: {x.get('type')} vs {y.get('type')}")
            continue
        for key in ("predictions", "labels"):
            if (key in x) != (key in y):
                diff.problems.append(f"row {i}: {key} in one answer only")
            elif key in x:
                _scores(diff, f"row {i}.{key}", x[key], y[key])
        if ("segmentation" in x) != ("segmentation" in y):
            diff.problems.append(f"row {i}: segmentation in one answer only")
        elif "segmentation" in x:
            _segmentation(diff, f"row {i}.segmentation", x["segmentation"], y["segmentation"])
        for key in ("embedding", "similarity"):
            if key in x or key in y:
                _values(diff, f"row {i}.{key}", x.get(key), y.get(key))
        if x.get("reference") != y.get("reference"):
            diff.problems.append(f"row {i}.reference: {x.get('reference')!r} vs "
                                 f"{y.get('reference')!r}")
        ex, ey = x.get("explanations"), y.get("explanations")
        if (ex is None) != (ey is None) or len(ex or ()) != len(ey or ()):
            diff.problems.append(f"row {i}: {len(ex or ())} explanations vs {len(ey or ())}")
            continue
        for k, (e, f) in enumerate(zip(ex or (), ey or ())):
            _explanation(diff, f"row {i}.explanations[{k}]", e, f)
    return diff

"""The records camserve answers with, and the one target parser: shared by the serving path (the
TorchServe handler, KServe) and the offline batch job, so both speak the same JSON.

* :class:`Prediction` — one class of a top-k list: ``{"index", "label", "score"}``;
* :class:`Explanation` — one map: ``{"target", "label", "score", "method", "layer", "width",
  "height"}`` plus the outputs that were asked for (``bbox``, ``heatmap``, ``overlay``, ``raw``);
* :func:`parse_targets` — what a client may write as a target: a class index, a label (exact,
  then case-insensitive), or a list of them; ``-1`` (the top-1 class) where the caller allows it.

Integers are parsed strictly: ASCII digits with at most one leading sign and a bounded length, so
``"²"``, ``"+-1"`` or a 5,000-digit number are a clear :class:`TargetError`, never a crash.

Example::

    >>> parse_targets("Dog, 0", ["cat", "dog"])
    (1, 0)
    >>> Prediction(1, "dog", 0.9123456).to_json()
    {'index': 1, 'label': 'dog', 'score': 0.912346}
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .parsing import parse_int, short_repr

SCORE_DIGITS = 6


class TargetError(ValueError):
    """A target that names no class; the message says what is allowed."""


def round_score(p: float) -> float:
    """Scores travel rounded to 6 decimals."""
    return round(float(p), SCORE_DIGITS)


@dataclass(frozen=True)
class Prediction:
    """One entry of a top-k list."""

    index: int
    label: str
    score: float

    def to_json(self) -> dict[str, Any]:
        """``{"index", "label", "score"}`` (score rounded to 6 decimals)."""
        return {"index": int(self.index), "label": self.label, "score": round_score(self.score)}


def top_predictions(probs: Sequence[float], labels: Sequence[str], k: int) -> list[Prediction]:
    """The ``k`` most probable classes of one row of probabilities, best first (ties: lower
    index first)."""
    order = sorted(range(len(probs)), key=lambda i: (-float(probs[i]), i))[:k]
    return [Prediction(i, labels[i], float(probs[i])) for i in order]


@dataclass(frozen=True)
class Explanation:
    """One explanation map of one image. ``heatmap``/``overlay`` are base64 PNG text, ``bbox`` is
    ``[x0, y0, x1, y1]`` in original pixels (or None), ``raw`` is ``{"shape", "data"}``; the
    outputs that were not asked for are left out of the JSON (``with_bbox``: the bbox was asked
    for, so it is written even when no box was found, as ``null``)."""

    target: int
    label: str
    score: float
    method: str
    layer: str
    width: int
    height: int
    bbox: Optional[list[int]] = None
    heatmap: Optional[str] = None
    overlay: Optional[str] = None
    raw: Optional[dict[str, Any]] = None
    with_bbox: bool = False

    def to_json(self) -> dict[str, Any]:
        """The explanation's JSON object (the REST contract)."""
        out: dict[str, Any] = {"target": int(self.target), "label": self.label,
                               "score": round_score(self.score), "method": self.method,
                               "layer": self.layer, "width": int(self.width),
                               "height": int(self.height)}
        if self.with_bbox:
            out["bbox"] = self.bbox
        if self.heatmap is not None:
            out["heatmap"] = self.heatmap
        if self.overlay is not None:
            out["overlay"] = self.overlay
        if self.raw is not None:
            out["raw"] = self.raw
        return out


def _known(labels: Sequence[str]) -> str:
    shown = ", ".join(short_repr(x, 40)[1:-1] for x in labels[:10])
    return shown + (f", ... ({len(labels)} in all)" if len(labels) > 10 else "")


def parse_target(item: Any, labels: Sequence[str], *, allow_top1: bool = False,
                   what: str = "target") -> int:
    """One target -> a class index. ``item``: an int, a string holding an int, or a label (exact
    match first, then case-insensitive). ``-1`` means "the top-1 class" when ``allow_top1``."""
    n = len(labels)
    lo = -1 if allow_top1 else 0
    allowed = f"a class index 0..{n - 1}{' (or -1 for the top-1 class)' if allow_top1 else ''}"
    if isinstance(item, str):
        num = parse_int(item)
        if num is None and item.strip().lstrip("+-")[:1].isdigit():
            raise TargetError(f"invalid value for {what}: {short_repr(item)} ({allowed}, or a label)")
        if num is not None:
            item = num
    if isinstance(item, int) and not isinstance(item, bool):
        if not lo <= item < n:
            raise TargetError(f"invalid value for {what}: class index {short_repr(item)} out of range "
                              f"(allowed: {allowed})")
        return item
    if isinstance(item, str):
        name = item.strip()
        for i, lab in enumerate(labels):
            if lab == name:
                return i
        low = name.lower()
        for i, lab in enumerate(labels):
            if lab.lower() == low:
                return i
        raise TargetError(f"invalid value for {what}: unknown label {short_repr(name)} (known: "
                          f"{_known(labels)}; or {allowed})")
    raise TargetError(f"invalid value for {what}: {short_repr(item)} ({allowed}, or a label)")


def parse_targets(value: Any, labels: Sequence[str], *, max_targets: int = 16,
                    allow_top1: bool = False, what: str = "target") -> Optional[tuple[int, ...]]:
    """A target option -> class indices, or None (no target: the top-1 class).

    ``value``: None or ``""`` (None), an int, a label, ``"a,b"``, a JSON list text ``"[1, 2]"`` or a
    list. At most ``max_targets`` entries.
    """
    if value is None:
        return None
    if isinstance(value, str):
        s = value.strip()
        if not s:
            return None
        if s.startswith("["):
            try:
                value = json.loads(s)
            except (json.JSONDecodeError, RecursionError, ValueError):
                raise TargetError(f"invalid value for {what}: {short_repr(s)} is not a JSON list") from None
        else:
            value = [p for p in (q.strip() for q in s.split(",")) if p]
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise TargetError(f"invalid value for {what}: empty list (a class index, a label, or a "
                          f"list of them)")
    if len(items) > max_targets:
        raise TargetError(f"invalid value for {what}: {len(items)} targets (at most {max_targets} "
                          f"per request)")
    return tuple(parse_target(item, labels, allow_top1=allow_top1, what=what) for item in items)

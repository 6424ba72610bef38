"""Object detection: per image a list of boxes, scores and labels; a target is one detection.

The model's raw output is normalised across families (:mod:`camserve.tasks.detectors`: torchvision
Faster/Mask R-CNN, RetinaNet, FCOS, SSD/SSDlite; Hugging Face DETR and RT-DETR; Ultralytics YOLO;
any model returning torchvision-style ``[{"boxes", "scores", "labels"}]``) into
:class:`Detections`: per image ``boxes`` (N, 4) ``x0, y0, x1, y1`` in model-input pixels,
``scores`` (N,) and ``labels`` (N,), best first, above ``score_threshold`` and at most
``max_detections``. Boxes and scores keep their autograd history: a detection's score is its class
score at its anchor / query, differentiable back to the target layer.

A target is a reference box with a label (:class:`camserve.tasks.TargetBatch`: ``index`` the
label, ``box`` the reference box in input pixels). Its score is re-matched in every forward (the
explained one and the perturbed ones of perturbation methods), as pytorch-grad-cam does:

* ``box_target: score`` (default) — the prediction of the same label with the highest IoU with the
  reference box (IoU > 0.5); its score. Targets taken from the model's own detections match
  themselves (IoU 1).
* ``box_target: iou+score`` — pytorch-grad-cam's ``FasterRCNNBoxScoreTarget``: the prediction of
  highest IoU whatever its label, counted only when its label agrees (and IoU > 0.5); the value is
  IoU + score, so gradients also flow through the box regression.

Unmatched targets score 0 (a zero map). The ``handler:`` keys (:attr:`Detection.config_keys`):
``score_threshold`` (0.5), ``max_detections`` (100), ``nms_iou`` (the family's own NMS unless set),
``explain_top`` (5), ``box_target`` and ``box_normalize`` (maps renormalised inside each box; always
for gradient-free methods, whose map is the same for every box). A request may send ``boxes``
(``[{"label": ..., "box": [x0, y0, x1, y1]}]`` in original-image pixels), ``explain_top``,
``box_target`` and ``box_normalize``. The manual: README, "Detection".

Example::

    >>> import torch
    >>> task = Detection(["bg", "cat", "dog"], {"score_threshold": 0.3})
    >>> raw = [{"boxes": torch.tensor([[0., 0., 10., 10.], [5., 5., 30., 20.]]),
    ...         "scores": torch.tensor([0.9, 0.2]), "labels": torch.tensor([1, 2])}]
    >>> out = task.output(raw)
    >>> len(out[0]), out[0].labels.tolist()
    (1, [1])
    >>> t = task.default_targets(out)
    >>> [round(v, 4) for v in task.scores(out, t)[0].tolist()]
    [0.9]
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch

from ..errors import OptionError
from ..parsing import parse_int, short_repr
from ..records import TargetError, parse_target, round_score
from .base import Geometry, GraphInput, Shown, TargetBatch, Task, TaskError
from .multilabel import parse_threshold

BOX_TARGETS = ("score", "iou+score")
#: IoU a prediction must exceed to match a reference box (pytorch-grad-cam's default)
MATCH_IOU = 0.5
DEFAULT_SCORE_THRESHOLD = 0.5
DEFAULT_MAX_DETECTIONS = 100
DEFAULT_EXPLAIN_TOP = 5
#: the largest coordinate a requested box may have (pixels)
MAX_COORD = 1_000_000.0
TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
FALSE_WORDS = frozenset({"false", "0", "no", "off"})


@dataclass(frozen=True)
class ImageDetections:
    """One image's detections, best first: ``boxes`` (N, 4) ``x0, y0, x1, y1`` in model-input
    pixels, ``scores`` (N,), ``labels`` (N,) int64. Boxes and scores may carry autograd history."""

    boxes: torch.Tensor
    scores: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def detach(self) -> "ImageDetections":
        return ImageDetections(self.boxes.detach(), self.scores.detach(), self.labels.detach())

    def cpu(self) -> "ImageDetections":
        return ImageDetections(self.boxes.detach().cpu(), self.scores.detach().cpu(),
                               self.labels.detach().cpu())


class Detections(list):
    """A batch's detections: one :class:`ImageDetections` per image (a list)."""


def as_detections(raw: Any) -> Detections:
    """A detector's raw output as :class:`Detections`: torchvision's (and every adapter's)
    ``[{"boxes", "scores", "labels"}]``, or Detections already; a :class:`TaskError` otherwise."""
    if isinstance(raw, Detections):
        return raw
    if isinstance(raw, (list, tuple)) and all(isinstance(d, Mapping) for d in raw):
        out = Detections()
        for d in raw:
            try:
                boxes, scores, labels = d["boxes"], d["scores"], d["labels"]
            except KeyError:
                raise TaskError(f"the detection task needs per image 'boxes', 'scores' and "
                                f"'labels'; the model gives keys {short_repr(list(d)[:8])}") from None
            out.append(ImageDetections(boxes.reshape(-1, 4), scores.reshape(-1),
                                       labels.reshape(-1).long()))
        return out
    raise TaskError(f"the detection task needs a list of {{'boxes', 'scores', 'labels'}} per image; "
                    f"the model gives {type(raw).__name__} (a detector family camserve does not "
                    f"know? see camserve.tasks.detectors)")


def _finite(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    v = float(value)
    return v if math.isfinite(v) else None


def _count(value: Any, key: str, lo: int, hi: int, exc: type[Exception]) -> int:
    num = parse_int(value) if isinstance(value, str) else value
    if isinstance(num, bool) or not isinstance(num, int) or not lo <= num <= hi:
        raise exc(f"invalid value for {key}: {short_repr(value)} (an integer {lo}..{hi})")
    return int(num)


def _flag(value: Any, key: str, exc: type[Exception]) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS | FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise exc(f"invalid value for {key}: {short_repr(value)} (true or false)")


def _box_target(value: Any, key: str, exc: type[Exception]) -> str:
    word = value.strip().lower() if isinstance(value, str) else None
    if word not in BOX_TARGETS:
        raise exc(f"invalid value for {key}: {short_repr(value)} (allowed: {', '.join(BOX_TARGETS)})")
    return word  # type: ignore[return-value]


@dataclass(frozen=True)
class BoxRequest:
    """One requested box: its ``label`` index and ``box`` in original-image pixels."""

    label: int
    box: tuple[float, float, float, float]


def parse_boxes(value: Any, labels: Sequence[str], *, max_targets: int) -> Optional[tuple[BoxRequest, ...]]:
    """The ``boxes`` option -> :class:`BoxRequest` records (None when absent or empty text).

    ``value``: a list (JSON body) or its JSON text, each item ``{"label": <name or index>,
    "box": [x0, y0, x1, y1]}`` in original-image pixels (finite, ``0 <= x0 < x1``,
    ``0 <= y0 < y1``, at most 1e6). At most ``max_targets`` boxes. :class:`OptionError` (422)
    names what is wrong.

    Example::

        >>> parse_boxes('[{"label": "dog", "box": [1, 2, 30, 40]}]', ["cat", "dog"], max_targets=4)
        (BoxRequest(label=1, box=(1.0, 2.0, 30.0, 40.0)),)
        >>> parse_boxes([{"label": 0, "box": [5, 5, 1, 9]}], ["cat"], max_targets=4)
        Traceback (most recent call last):
        ...
        camserve.errors.OptionError: invalid value for boxes[0].box: [5, 5, 1, 9] (x0 < x1 and y0 < y1 are needed)
    """
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            raise OptionError(f"invalid value for boxes: {short_repr(text)} is not JSON (a list of "
                              f"{{\"label\": ..., \"box\": [x0, y0, x1, y1]}})") from None
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list):
        raise OptionError(f"invalid value for boxes: {short_repr(value)} (a list of "
                          f"{{\"label\": ..., \"box\": [x0, y0, x1, y1]}})")
    if not value:
        raise OptionError("invalid value for boxes: empty list (one box at least, or leave it out)")
    if len(value) > max_targets:
        raise OptionError(f"invalid value for boxes: {len(value)} boxes (at most {max_targets} per "
                          f"request)")
    out = []
    for i, item in enumerate(value):
        where = f"boxes[{i}]"
        if not isinstance(item, Mapping):
            raise OptionError(f"invalid value for {where}: {short_repr(item)} (an object "
                              f"{{\"label\": ..., \"box\": [x0, y0, x1, y1]}})")
        extra = [k for k in item if k not in ("label", "box")]
        if extra:
            raise OptionError(f"invalid value for {where}: unknown key {short_repr(extra[0], 40)} "
                              f"(allowed: label, box)")
        if "label" not in item or "box" not in item:
            raise OptionError(f"invalid value for {where}: it needs 'label' and 'box'")
        lab = item["label"]
        if not isinstance(lab, (str, int)) or isinstance(lab, bool):
            raise OptionError(f"invalid value for {where}.label: {short_repr(lab)} (a label or a "
                              f"class index)")
        try:
            index = parse_target(lab, labels, what=f"{where}.label")
        except TargetError as exc:
            raise OptionError(str(exc)) from None
        box = item["box"]
        coords = [_finite(v) for v in box] if isinstance(box, list) and len(box) == 4 else None
        if coords is None or any(c is None for c in coords):
            raise OptionError(f"invalid value for {where}.box: {short_repr(box)} (four finite "
                              f"numbers x0, y0, x1, y1 in image pixels)")
        x0, y0, x1, y1 = (float(c) for c in coords)  # type: ignore[arg-type]
        if min(x0, y0) < 0 or max(x1, y1) > MAX_COORD:
            raise OptionError(f"invalid value for {where}.box: {short_repr(box)} (coordinates in "
                              f"0..{MAX_COORD:g})")
        if not (x0 < x1 and y0 < y1):
            raise OptionError(f"invalid value for {where}.box: {short_repr(box)} (x0 < x1 and "
                              f"y0 < y1 are needed)")
        out.append(BoxRequest(index, (x0, y0, x1, y1)))
    return tuple(out)


@dataclass(frozen=True)
class DetectionOptions:
    """A request's detection options: the requested ``boxes`` (None: the top detections),
    ``explain_top`` (how many of the top detections are explained), ``box_target`` and
    ``box_normalize``."""

    boxes: Optional[tuple[BoxRequest, ...]] = None
    explain_top: int = DEFAULT_EXPLAIN_TOP
    box_target: str = "score"
    box_normalize: bool = False


def match(dets: ImageDetections, label: torch.Tensor, box: torch.Tensor, mode: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Match K reference boxes to one image's detections.

    ``label`` (K,), ``box`` (K, 4), ``mode`` (K,) bool (True: ``iou+score``). Returns ``(idx,
    ok, iou)``: the matched detection per reference (K,), whether it counts (K,) and the IoU
    matrix (K, N) (differentiable in the detections' boxes). See the module docstring for the
    two rules."""
    from torchvision.ops import box_iou

    iou = box_iou(box.to(dets.boxes.dtype), dets.boxes)  # (K, N)
    with torch.no_grad():
        same = label[:, None] == dets.labels[None, :]
        any_label = iou.detach().nan_to_num(-1.0)  # degenerate boxes never match
        by_label = any_label.masked_fill(~same, -1.0)
        chosen = torch.where(mode[:, None], any_label, by_label)
        idx = chosen.argmax(dim=1)
        best = chosen.gather(1, idx[:, None])[:, 0]
        ok = (best > MATCH_IOU) & (dets.labels[idx] == label)
    return idx, ok, iou


def pair_iou(a: torch.Tensor, b: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """IoU of box ``a[k]`` with box ``b[k]`` (K,), with the arithmetic of
    :func:`torchvision.ops.box_iou` (so its gradients, ties of min/max included, are the same);
    pairs outside ``valid`` (K,) bool give 0 and no NaN gradient even when degenerate."""
    a = a.to(b.dtype)
    lt = torch.max(a[:, :2], b[:, :2])
    rb = torch.min(a[:, 2:], b[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = torch.where(valid, area_a + area_b - inter, torch.ones_like(inter))
    return torch.where(valid, inter / union, torch.zeros_like(inter))


def _modes(targets: TargetBatch) -> torch.Tensor:
    """(R, K) bool: True where a target is scored ``iou+score``."""
    if targets.reference is not None:
        return targets.reference[..., 0] > 0.5
    return torch.full(tuple(targets.index.shape), targets.mode == "iou+score", dtype=torch.bool,
                      device=targets.index.device)


def detection_targets(rows: Sequence[Sequence[tuple[int, Sequence[float], str]]],
                      device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> TargetBatch:
    """A :class:`TargetBatch` of detection targets: per row a list of ``(label, box in input
    pixels, box_target)``; rows may be empty (count 0). Modes that differ between targets are
    carried per target in ``reference`` (R, K, 1) (1: ``iou+score``).

    Example::

        >>> t = detection_targets([[(1, [0, 0, 5, 5], "score")], []])
        >>> t.index.tolist(), t.count, t.box.shape, t.mode
        ([[1], [0]], (1, 0), torch.Size([2, 1, 4]), 'score')
    """
    if not rows:
        raise TaskError("invalid value for targets: no rows")
    k = max(1, max(len(r) for r in rows))
    index = torch.zeros(len(rows), k, dtype=torch.long)
    box = torch.zeros(len(rows), k, 4, dtype=dtype)
    flag = torch.zeros(len(rows), k, 1, dtype=dtype)
    for r, items in enumerate(rows):
        for j, (lab, b, mode) in enumerate(items):
            index[r, j] = int(lab)
            box[r, j] = torch.as_tensor([float(v) for v in b], dtype=dtype)
            flag[r, j, 0] = float(mode == "iou+score")
        for j in range(len(items), k):  # padding repeats the row's first target
            if items:
                index[r, j], box[r, j], flag[r, j] = index[r, 0], box[r, 0], flag[r, 0]
    modes = {m for items in rows for _, _, m in items}
    mixed = len(modes) > 1
    mode = modes.pop() if len(modes) == 1 else "score"
    return TargetBatch(index.to(device), tuple(len(r) for r in rows), box=box.to(device),
                       reference=flag.to(device) if mixed else None, mode=mode)


class Detection(Task):
    """Object detection (see the module docstring)."""

    name = "detection"
    option_keys = ("boxes", "explain_top", "box_target", "box_normalize")
    config_keys = ("score_threshold", "max_detections", "nms_iou", "explain_top", "box_target",
                   "box_normalize")
    logits_output = False

    def __init__(self, labels: Sequence[str] = (), settings: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__(labels, settings)
        s = self.settings
        self.score_threshold = parse_threshold(s.get("score_threshold", DEFAULT_SCORE_THRESHOLD),
                                               "handler.score_threshold", TaskError)
        self.max_detections = _count(s.get("max_detections", DEFAULT_MAX_DETECTIONS),
                                     "handler.max_detections", 1, 10_000, TaskError)
        self.nms_iou = (None if s.get("nms_iou") is None else
                        parse_threshold(s["nms_iou"], "handler.nms_iou", TaskError))
        self.explain_top = _count(s.get("explain_top", DEFAULT_EXPLAIN_TOP), "handler.explain_top",
                                  0, 10_000, TaskError)
        self.box_target = _box_target(s.get("box_target", "score"), "handler.box_target", TaskError)
        self.box_normalize = _flag(s.get("box_normalize", False), "handler.box_normalize", TaskError)

    # -- loader side ---------------------------------------------------------------------------
    @classmethod
    def prepare_model(cls, model: Any, spec: Any) -> None:
        from .detectors import family_of

        family_of(model).prepare(model, spec, cls(settings=spec.task_settings))

    @classmethod
    def count_labels(cls, model: Any, raw: Any) -> int:
        from .detectors import family_of

        as_detections(raw)  # the output must be detections
        return int(family_of(model).count_labels(model))

    # -- engine side ---------------------------------------------------------------------------
    def output(self, raw: Any) -> Detections:
        out = Detections()
        for d in as_detections(raw):
            keep = d.scores.detach() >= self.score_threshold
            if self.nms_iou is not None and bool(keep.any()):
                from torchvision.ops import batched_nms

                idx = keep.nonzero()[:, 0]
                kept = batched_nms(d.boxes.detach()[idx].float(), d.scores.detach()[idx].float(),
                                   d.labels[idx], self.nms_iou)
                keep = torch.zeros_like(keep)
                keep[idx[kept]] = True
            idx = keep.nonzero()[:, 0]
            order = d.scores.detach()[idx].argsort(descending=True, stable=True)
            idx = idx[order][:self.max_detections]
            out.append(ImageDetections(d.boxes[idx], d.scores[idx], d.labels[idx]))
        return out

    def select(self, out: Detections, rows: torch.Tensor) -> Detections:
        return Detections(out[int(i)] for i in rows.tolist())

    def row(self, out: Detections, j: int) -> ImageDetections:
        return out[j]

    def to_host(self, out: Detections) -> Detections:
        return Detections(d.cpu() for d in out)

    def detach(self, out: Any) -> Any:
        if isinstance(out, torch.Tensor):  # a CAM graph's packed detections
            return out.detach()
        return Detections(d.detach() for d in out)

    def scores(self, out: Detections, targets: TargetBatch) -> torch.Tensor:
        if targets.box is None:
            raise TaskError("invalid value for targets: detection targets need reference boxes "
                            "(TargetBatch.box)")
        modes = _modes(targets)
        rows = []
        for r, dets in enumerate(out):
            label = targets.index[r].to(dets.labels.device)
            zero = dets.scores.sum() * 0  # keeps the graph when nothing matches
            if len(dets) == 0:
                rows.append(zero.expand(targets.k))
                continue
            mode = modes[r].to(dets.labels.device)
            idx, ok, iou = match(dets, label, targets.box[r].to(dets.boxes.device), mode)
            value = dets.scores[idx]
            if bool(mode.any()):  # IoU + score: gradients through the box regression as well
                both = mode & ok
                picked = pair_iou(targets.box[r].to(dets.boxes.device), dets.boxes[idx], both)
                value = value + torch.where(both, picked, torch.zeros_like(picked))
            rows.append(torch.where(ok, value, zero))
        return torch.stack(rows)

    def default_targets(self, out: Detections) -> TargetBatch:
        """Each row's best detection (count 0 for a row without one)."""
        return detection_targets([self._top(d, 1, self.box_target) for d in self.detach(out)],
                                 _device(out), _dtype(out))

    @staticmethod
    def _top(d: ImageDetections, n: int, mode: str) -> list[tuple[int, Sequence[float], str]]:
        return [(int(lab), box, mode) for lab, box in
                zip(d.labels[:n].tolist(), d.boxes[:n].tolist())]

    def probe_score(self, out: Any) -> torch.Tensor:
        dets = self.output(out)
        if not dets or len(dets[0]) == 0:
            raise TaskError("the detector finds nothing on the probe image (lower "
                            "handler.score_threshold, or name handler.target_layer)")
        return dets[0].scores[0]

    # -- the CAM graph (camserve.onnx) ---------------------------------------------------------
    graph_output = "detections"
    graph_per_target = True

    @property
    def graph_top(self) -> int:
        """How many of each image's top detections a CAM graph explains: ``explain_top`` (at
        least 1), at most ``max_detections``."""
        return max(1, min(self.explain_top, self.max_detections))

    def graph_inputs(self, input_size: tuple[int, int]) -> tuple[GraphInput, ...]:
        """None: a detection graph explains its own top detections (:attr:`graph_top`)."""
        return ()

    def graph_forward(self, model: Any, x: torch.Tensor) -> torch.Tensor:
        """The detections as one (N, ``max_detections``, 6) tensor (:func:`pack_detections`)
        from the model's family's tensor-only decoding
        (:meth:`camserve.tasks.detectors.DetectorFamily.fixed_detections`), the threshold and
        count of :meth:`output` applied; the score column keeps its autograd history."""
        from .detectors import family_of

        d = family_of(model).fixed_detections(model, x)
        boxes, scores, labels = d["boxes"], d["scores"], d["labels"].long()
        m = self.max_detections
        if boxes.shape[1] < m:  # pad to max_detections: every detection graph is that wide
            pad = m - int(boxes.shape[1])
            boxes = torch.nn.functional.pad(boxes, (0, 0, 0, pad))
            scores = torch.nn.functional.pad(scores, (0, pad))
            labels = torch.nn.functional.pad(labels, (0, pad), value=-1)
        boxes, scores, labels = boxes[:, :m], scores[:, :m], labels[:, :m]
        valid = (labels >= 0) & (scores.detach() >= self.score_threshold)
        return pack_detections(boxes, scores, labels, valid)

    def graph_value(self, out: Any) -> torch.Tensor:
        """Packed detections (N, ``max_detections``, 6): the graph's own, or :class:`Detections`
        packed the same way (valid rows first, then padding)."""
        if isinstance(out, torch.Tensor):
            return out
        m = self.max_detections
        rows = []
        for d in out:  # padded by concatenation and a fixed slice: traceable whatever len(d)
            d = d.detach()
            boxes = torch.cat([d.boxes, d.boxes.new_zeros(m, 4)])[:m]
            scores = torch.cat([d.scores.to(d.boxes.dtype), d.boxes.new_zeros(m)])[:m]
            labels = torch.cat([d.labels, d.labels.new_full((m,), -1)])[:m]
            rows.append(pack_detections(boxes, scores, labels, labels >= 0))
        if not rows:
            return torch.zeros(0, m, 6)
        return torch.stack(rows)

    def graph_targets(self, out: Any, inputs: Mapping[str, torch.Tensor]) -> TargetBatch:
        """The top :attr:`graph_top` detections of each row, by ``score`` (padding: label 0 and a
        zero box, which match nothing: a zero map)."""
        packed = self.graph_value(out)
        top = packed[:, :self.graph_top]
        return TargetBatch(top[..., 5].clamp(min=0).long(), None, box=top[..., :4])

    def graph_scores(self, out: torch.Tensor, targets: TargetBatch) -> torch.Tensor:
        """(N, :attr:`graph_top`): the explained detections' own scores (padding 0)."""
        return out[:, :self.graph_top, 4]

    def unpack(self, row: torch.Tensor) -> ImageDetections:
        """One image's packed detections (M, 6) -> its :class:`ImageDetections` (valid rows)."""
        row = row.detach()
        keep = row[:, 5] >= 0
        return ImageDetections(row[keep, :4], row[keep, 4], row[keep, 5].long())

    def detections_json(self, row: torch.Tensor, geometry: Geometry) -> list[dict[str, Any]]:
        """One image's packed detections as an answer's ``detections`` (boxes in original
        pixels), without explanations."""
        dets = self.unpack(row).cpu()
        return [self._det_json(dets, j, geometry) for j in range(len(dets))]

    # -- serving side --------------------------------------------------------------------------
    def parse_options(self, options: Mapping[str, Any], *, max_targets: int) -> DetectionOptions:
        boxes = parse_boxes(options.get("boxes"), self.labels, max_targets=max_targets)
        top = self.explain_top if options.get("explain_top") is None else \
            _count(options["explain_top"], "explain_top", 0, max_targets, OptionError)
        if options.get("explain_top") is None and top > max_targets:
            top = max_targets
        mode = self.box_target if options.get("box_target") is None else \
            _box_target(options["box_target"], "box_target", OptionError)
        norm = self.box_normalize if options.get("box_normalize") is None else \
            _flag(options["box_normalize"], "box_normalize", OptionError)
        return DetectionOptions(boxes, top, mode, norm)

    def max_targets(self, parsed: DetectionOptions) -> int:
        return len(parsed.boxes) if parsed.boxes else parsed.explain_top

    def _row_targets(self, dets: ImageDetections, parsed: DetectionOptions,
                     geometry: Geometry) -> list[tuple[int, Sequence[float], str]]:
        if parsed.boxes:
            return [(b.label, geometry.box_to_input(b.box), parsed.box_target) for b in parsed.boxes]
        return self._top(dets, parsed.explain_top, parsed.box_target)

    def request_targets(self, out: Detections, parsed: Sequence[DetectionOptions],
                        geometry: Sequence[Geometry], topk: Sequence[int]) -> TargetBatch:
        return detection_targets([self._row_targets(d, p, g) for d, p, g in
                                  zip(self.detach(out), parsed, geometry)], _device(out), _dtype(out))

    def _matches(self, dets: ImageDetections, targets: TargetBatch, r: int
                 ) -> list[Optional[int]]:
        """The detection each of row ``r``'s real targets matches (None: no match)."""
        n = targets.count[r]
        if n == 0 or len(dets) == 0:
            return [None] * n
        d = dets.detach()
        idx, ok, _ = match(d, targets.index[r, :n].to(d.labels.device),
                           targets.box[r, :n].to(d.boxes.device),  # type: ignore[index]
                           _modes(targets)[r, :n].to(d.labels.device))
        return [int(i) if bool(o) else None for i, o in zip(idx.tolist(), ok.tolist())]

    def shown(self, out_row: ImageDetections, targets: TargetBatch, r: int,
              geometry: Geometry) -> list[Shown]:
        n = targets.count[r]
        out_row = out_row.detach()
        found = self._matches(out_row, targets, r)
        shown = []
        for k in range(n):
            lab = int(targets.index[r, k])
            j = found[k]
            if j is not None:
                box = out_row.boxes[j].tolist()
                score = float(out_row.scores[j])
            else:
                box, score = targets.box[r, k].tolist(), 0.0  # type: ignore[index]
            shown.append(Shown(lab, self._label(lab), score,
                               tuple(geometry.box_to_image(box))))  # type: ignore[arg-type]
        return shown

    def _label(self, i: int) -> str:
        return self.labels[i] if 0 <= i < len(self.labels) else str(i)

    def box_normalized(self, parsed: DetectionOptions, gradients: bool) -> bool:
        """Whether a row's maps are renormalised inside each box: when asked, and always for a
        gradient-free method (its map is the same for every box)."""
        return parsed.box_normalize or not gradients

    def _det_json(self, dets: ImageDetections, j: int, geometry: Geometry) -> dict[str, Any]:
        lab = int(dets.labels[j])
        return {"box": [round(v, 2) for v in geometry.box_to_image(dets.boxes[j].tolist())],
                "label": self._label(lab), "index": lab, "score": round_score(float(dets.scores[j]))}

    def answer(self, out_row: ImageDetections, parsed: DetectionOptions, topk: int,
               geometry: Geometry, explanations: Optional[list[dict[str, Any]]]) -> dict[str, Any]:
        dets = out_row.cpu()
        items = [self._det_json(dets, j, geometry) for j in range(len(dets))]
        if explanations is None:
            return {"detections": items}
        if not parsed.boxes:
            for item, exp in zip(items, explanations):
                item["explanation"] = exp
            return {"detections": items}
        rows = [(b.label, geometry.box_to_input(b.box), parsed.box_target) for b in parsed.boxes]
        found = self._matches(dets, detection_targets([rows]), 0)
        for i, (req, j, exp) in enumerate(zip(parsed.boxes, found, explanations)):
            if j is not None and "explanation" not in items[j]:
                items[j].update(requested=i, explanation=exp)
                continue
            entry = (dict(self._det_json(dets, j, geometry)) if j is not None else
                     {"box": [round(v, 2) for v in req.box], "label": self._label(req.label),
                      "index": req.label, "score": 0.0})
            entry.update(matched=j is not None, requested=i, explanation=exp)
            items.append(entry)
        return {"detections": items}

    def describe(self) -> dict[str, Any]:
        return {"task": self.name, "options": list(self.option_keys),
                "score_threshold": self.score_threshold, "max_detections": self.max_detections,
                "explain_top": self.explain_top, "box_target": self.box_target}


def pack_detections(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                    valid: torch.Tensor) -> torch.Tensor:
    """(N, M, 6) ``x0, y0, x1, y1, score, label`` of a detection graph's ``detections`` output:
    entries outside ``valid`` (N, M) get a zero box, score 0 and label -1. Tensor operations only.

    Example::

        >>> p = pack_detections(torch.ones(1, 2, 4), torch.tensor([[0.9, 0.1]]),
        ...                     torch.tensor([[3, 1]]), torch.tensor([[True, False]]))
        >>> p[0].tolist()
        [[1.0, 1.0, 1.0, 1.0, 0.8999999761581421, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0, -1.0]]
    """
    scores = torch.where(valid, scores, torch.zeros_like(scores))
    boxes = torch.where(valid[..., None], boxes.to(scores.dtype), torch.zeros_like(boxes, dtype=scores.dtype))
    labels = torch.where(valid, labels, torch.full_like(labels, -1)).to(scores.dtype)
    return torch.cat([boxes, scores[..., None], labels[..., None]], dim=-1)


def _device(out: Detections) -> torch.device:
    return out[0].boxes.device if out else torch.device("cpu")


def _dtype(out: Detections) -> torch.dtype:
    return out[0].boxes.dtype if out and out[0].boxes.is_floating_point() else torch.float32

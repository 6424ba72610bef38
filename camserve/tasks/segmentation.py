"""Semantic segmentation: per-pixel class logits; a target is a class summed over a region.

The model's output is read as (B, C, H, W) logits at the input's size: torchvision FCN, DeepLabV3
and LR-ASPP give a dict whose ``out`` is that; Hugging Face SegFormer and UperNet give logits at a
quarter of the input, upsampled bilinearly as their image processors do
(:func:`camserve.sources.ensure_dense`, applied by the loader).

* **Prediction**: the class mask (argmax per pixel) — answered as a PNG of class indices at the
  original image size (8-bit, 16-bit beyond 256 classes; smaller where the work budget caps the
  maps: the mask counts as one map) — and per class its pixel share.
* **Target**: a class ``c`` and a region ``M``; the score is ``sum_hw logits[c, h, w] * M[h, w]``,
  pytorch-grad-cam's ``SemanticSegmentationTarget``. By default ``M`` is the predicted mask of
  ``c``; a request may give one region for its targets (option ``region``): a box
  ``[x0, y0, x1, y1]`` in original-image pixels (its pixel coverage at the input size) or a mask
  PNG of the image's size (base64 or a form file; non-zero pixels are inside). Explained by
  default: the predicted classes, largest share first, at most ``topk``, without the
  ``handler.background`` class; with a region and no ``target``, the class predicted most inside
  it.

Example::

    >>> import torch
    >>> task = Segmentation(["background", "cat", "dog"], {"background": 0})
    >>> logits = torch.zeros(1, 3, 4, 6)
    >>> logits[0, 1, :2] = 5.0; logits[0, 2, 2:, :2] = 5.0
    >>> [(c, round(s, 3)) for c, s in task.shares(logits[0])]
    [(1, 0.5), (0, 0.333), (2, 0.167)]
    >>> o = task.parse_options({}, max_targets=16)
    >>> tb = task.request_targets(logits, [o], [Geometry((60, 40), (4, 6))], [3])
    >>> tb.index.tolist(), tb.count, task.scores(logits, tb).tolist()
    ([[1, 2]], (2,), [[60.0, 20.0]])
    >>> box = task.bind(task.parse_options({"region": "[0, 0, 30, 20]"}, max_targets=16),
    ...                 Geometry((60, 40), (4, 6)))
    >>> box.mask.tolist()
    [[1.0, 1.0, 1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import OptionError, RequestError, from_image_error
from ..parsing import short_repr
from ..records import TargetError, parse_targets, round_score
from .base import Geometry, GraphInput, Shown, TargetBatch, Task, TaskError
from .classification import class_index

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: a region given as text longer than this is not a box (it is read as a base64 mask PNG)
MAX_BOX_TEXT = 200
#: the mask of a region is refused beyond this many pixels before decoding (it must have the
#: image's size anyway; this bounds the header check of a hostile file)
MAX_MASK_PIXELS = 1 << 28

REGION_INPUT_DOC = ("float32 (N, H, W) or (1, 1, 1): weights of the pixels a class's logits are "
                    "summed over, at the input size; negative = the predicted mask of the target "
                    "class; optional, default -1")


@dataclass(frozen=True)
class Region:
    """A region as a request gives it: a ``box`` in original-image pixels, or ``png`` mask bytes."""

    box: Optional[tuple[float, float, float, float]] = None
    png: Optional[bytes] = None


@dataclass(frozen=True, eq=False)
class SegOptions:
    """A request's classes to explain (None: the predicted ones), its region (as given; once
    bound to the image, ``mask`` (H, W) at the input size and ``box`` in input pixels when it
    was a box), and ``limit``, the most default targets a row may get."""

    targets: Optional[tuple[int, ...]] = None
    region: Optional[Region] = None
    mask: Optional[torch.Tensor] = None
    box: Optional[tuple[float, float, float, float]] = None
    limit: int = 16


def _box(value: Any) -> tuple[float, float, float, float]:
    """Four finite numbers ``x0 < x1``, ``y0 < y1``; 422 naming ``region`` otherwise."""
    allowed = "a box [x0, y0, x1, y1] in image pixels with x0 < x1 and y0 < y1, or a mask PNG"
    if not isinstance(value, (list, tuple)) or len(value) != 4 or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
            for v in value):
        raise OptionError(f"invalid value for region: {short_repr(value)} ({allowed})")
    x0, y0, x1, y1 = (float(v) for v in value)
    if not (x0 < x1 and y0 < y1):
        raise OptionError(f"invalid value for region: {short_repr(list(value))} ({allowed})")
    return x0, y0, x1, y1


def parse_region(value: Any) -> Optional[Region]:
    """A ``region`` option -> a :class:`Region`: a list of four numbers or its JSON text is a box;
    PNG bytes (a form file), base64 text of a PNG or ``{"b64": ...}`` is a mask. Nothing is
    decoded here (:meth:`Segmentation.bind` does, once the image size is known)."""
    from ..envelopes import image_from

    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return Region(box=_box(value))
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if data.startswith(PNG_SIGNATURE):
            return Region(png=data)
        if len(data) > MAX_BOX_TEXT:
            raise OptionError(f"invalid value for region: {len(data)} bytes that are not a PNG "
                              f"(a box [x0, y0, x1, y1] or a mask PNG)")
        try:
            value = data.decode("utf-8")
        except UnicodeDecodeError:
            raise OptionError("invalid value for region: not UTF-8 text and not a PNG") from None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and len(text) <= MAX_BOX_TEXT:
            try:
                return Region(box=_box(json.loads(text)))
            except (json.JSONDecodeError, RecursionError):
                raise OptionError(f"invalid value for region: {short_repr(text)} is not a JSON "
                                  f"list") from None
        if not text:
            return None
    try:
        data = image_from(value, "region")
    except RequestError as exc:
        raise OptionError(f"invalid value for region: {exc.message}") from None
    if not data.startswith(PNG_SIGNATURE):
        raise OptionError(f"invalid value for region: {len(data)} bytes that are not a PNG "
                          f"(a box [x0, y0, x1, y1] or a mask PNG of the image's size)")
    return Region(png=data)


def box_mask(box: Sequence[float], size: tuple[int, int]) -> torch.Tensor:
    """(H, W) float: how much of each pixel of a ``size`` (H, W) grid the box ``x0, y0, x1, y1``
    (in that grid's pixels) covers.

    Example::

        >>> box_mask([0.5, 0, 2, 1], (2, 3)).tolist()
        [[0.5, 1.0, 0.0], [0.0, 0.0, 0.0]]
    """
    h, w = size
    x0, y0, x1, y1 = (float(v) for v in box)
    xs = torch.arange(w, dtype=torch.float32)
    ys = torch.arange(h, dtype=torch.float32)
    cx = (torch.minimum(xs + 1, torch.tensor(x1)) - torch.maximum(xs, torch.tensor(x0))).clamp(0, 1)
    cy = (torch.minimum(ys + 1, torch.tensor(y1)) - torch.maximum(ys, torch.tensor(y0))).clamp(0, 1)
    return cy[:, None] * cx[None, :]


def mask_from_png(data: bytes, geometry: Geometry) -> torch.Tensor:
    """A mask PNG of the image's size -> (H, W) float weights at the input size (the share of
    each input pixel covered by mask pixels that are >= 128 in grey). The size is checked from the
    header, before any pixel is decoded: a mask of another size is 422, a file over
    :data:`MAX_MASK_PIXELS` 413, anything that is not a PNG 422."""
    from ..images import ImageError, decode_image

    w, h = geometry.size

    def same_size(mw: int, mh: int) -> None:
        if (mw, mh) != (w, h):
            raise OptionError(f"invalid value for region: the mask is {mw}x{mh} pixels, the image "
                              f"{w}x{h} (a mask PNG of the image's size)")

    try:
        img = decode_image(data, max_pixels=MAX_MASK_PIXELS, formats=("PNG",),
                           before_load=same_size)
    except ImageError as exc:
        err = from_image_error(exc)
        if err.code == 413:
            raise RequestError(f"region mask: {err.message}", 413, err.type) from None
        raise OptionError(f"invalid value for region: {err.message}") from None
    inside = (np.asarray(img.convert("L")) >= 128).astype(np.float32)
    img.close()
    hin, win = geometry.input
    small = Image.fromarray(inside, mode="F").resize((win, hin), Image.BOX)
    return torch.from_numpy(np.asarray(small, dtype=np.float32).copy())


def nearest_resize(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A class-index mask (H, W) resized to ``size`` (W, H) by nearest neighbour (pixel centres).

    Example::

        >>> nearest_resize(np.array([[0, 1], [2, 3]]), (4, 2)).tolist()
        [[0, 0, 1, 1], [2, 2, 3, 3]]
    """
    h, w = mask.shape
    ow, oh = int(size[0]), int(size[1])
    if (ow, oh) == (w, h):
        return mask
    rows = np.minimum(((np.arange(oh) + 0.5) * h / oh).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(ow) + 0.5) * w / ow).astype(np.int64), w - 1)
    return mask[rows[:, None], cols[None, :]]


def mask_png(mask: np.ndarray) -> bytes:
    """PNG of a class-index mask: 8-bit grey for indices < 256, else 16-bit."""
    from ..render import png_bytes

    if int(mask.max(initial=0)) < 256:
        img = Image.fromarray(mask.astype(np.uint8), mode="L")
    else:
        img = Image.fromarray(mask.astype(np.uint16))
    return png_bytes(img)


class Segmentation(Task):
    """(B, C, H, W) per-pixel logits (see the module docstring)."""

    name = "segmentation"
    option_keys = ("target", "region")
    config_keys = ("background",)
    binary_options = ("region",)
    hf_auto_class = "AutoModelForSemanticSegmentation"

    def __init__(self, labels: Sequence[str] = (), settings: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__(labels, settings)
        bg = self.settings.get("background")
        if bg is not None and (isinstance(bg, bool) or not isinstance(bg, int) or bg < 0
                               or (self.labels and bg >= len(self.labels))):
            raise TaskError(f"invalid value for handler.background: {short_repr(bg)} (a class "
                            f"index 0..{len(self.labels) - 1 if self.labels else 'C-1'}, or unset)")
        #: the class not explained by default (None: every class is)
        self.background: Optional[int] = bg

    # -- engine side --------------------------------------------------------------------------
    def count_labels(self, model: Any, raw: Any) -> int:
        """Channels of the per-pixel logits; the model is made to return them at the input size
        from now on (:func:`camserve.sources.ensure_dense`)."""
        from ..sources import dense_of, ensure_dense

        try:
            n = int(dense_of(raw).shape[1])
        except TypeError as exc:
            raise TaskError(str(exc)) from None
        ensure_dense(model)
        return n

    def output(self, raw: Any) -> torch.Tensor:
        from ..sources import dense_of

        try:
            return dense_of(raw)
        except TypeError as exc:
            raise TaskError(f"the {self.name} task needs per-pixel logits (B, classes, H, W): "
                            f"{exc}") from None

    def scores(self, out: torch.Tensor, targets: TargetBatch) -> torch.Tensor:
        """``sum_hw out[r, index[r, k]] * region[r, k]`` (R, K)."""
        if targets.region is None:
            raise TaskError("invalid value for targets: segmentation targets need a region")
        idx = targets.index.to(out.device)
        r, k = idx.shape
        sel = out.gather(1, idx[:, :, None, None].expand(r, k, *out.shape[-2:]))
        return (sel * targets.region.to(device=out.device, dtype=out.dtype)).sum(dim=(-2, -1))

    def probability(self, out: torch.Tensor, targets: TargetBatch) -> torch.Tensor:
        """Each class's mean softmax probability over its region (R, K)."""
        assert targets.region is not None
        probs = torch.softmax(out.detach().float(), dim=1)
        idx = targets.index.to(out.device)
        r, k = idx.shape
        sel = probs.gather(1, idx[:, :, None, None].expand(r, k, *out.shape[-2:]))
        region = targets.region.to(device=out.device, dtype=sel.dtype)
        return (sel * region).sum(dim=(-2, -1)) / region.sum(dim=(-2, -1)).clamp_min(1e-12)

    def _not_background(self, counts: torch.Tensor) -> torch.Tensor:
        """Per-class pixel counts (N, C) with the background class ranked last."""
        if self.background is None or self.background >= counts.shape[1]:
            return counts
        keep = torch.arange(counts.shape[1], device=counts.device) != self.background
        return torch.where(keep, counts, torch.full_like(counts, -1))

    def graph_inputs(self, input_size: tuple[int, int]) -> tuple[GraphInput, ...]:
        return (GraphInput("target", torch.int64, (), "class", -1,
                           "int64 (N,) or (1,): the class per row; negative = the class with the "
                           "largest predicted share (background excluded); optional, default [-1]"),
                GraphInput("region", torch.float32, tuple(int(s) for s in input_size), "region",
                           -1, REGION_INPUT_DOC))

    def graph_targets(self, out: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> TargetBatch:
        """``target`` (negative: the largest predicted class but the background) over ``region``
        (negative entries: the predicted mask of that class)."""
        pred = out.argmax(dim=1)  # (N, H, W)
        classes = torch.arange(out.shape[1], device=out.device)
        counts = (pred[:, None] == classes[None, :, None, None]).sum(dim=(-2, -1))
        top = self._not_background(counts).argmax(dim=1)
        target = inputs["target"]
        t = torch.where(target < 0, top, target.to(top.dtype))
        own = (pred == t[:, None, None]).to(out.dtype)
        region = inputs["region"].to(out.dtype)
        return TargetBatch(t[:, None], None, region=torch.where(region < 0, own, region)[:, None])

    def _defaults(self, out: torch.Tensor, target: Optional[torch.Tensor] = None,
                  region: Optional[torch.Tensor] = None) -> TargetBatch:
        n = out.shape[0]
        inputs = {"target": target if target is not None else torch.full((n,), -1, dtype=torch.long,
                                                                          device=out.device),
                  "region": region if region is not None else torch.full((1, 1, 1), -1.0,
                                                                         device=out.device)}
        tb = self.graph_targets(out, inputs)
        return replace(tb, count=(1,) * n)

    def default_targets(self, out: torch.Tensor) -> TargetBatch:
        """Each row's largest predicted class (but the background) over its predicted mask."""
        return self._defaults(out.detach())

    def as_targets(self, value: Any, out: torch.Tensor) -> TargetBatch:
        """None, a TargetBatch, or classes in the classic forms (an int, B ints, a LongTensor (B,)
        or (B, K); -1: the default class), each over its predicted mask."""
        if value is None or isinstance(value, TargetBatch):
            return super().as_targets(value, out)
        t = class_index(value, out.shape[0], out.shape[1], out.device)
        parts = [self._defaults(out.detach(), t[:, j]) for j in range(t.shape[1])]
        return TargetBatch(torch.cat([p.index for p in parts], dim=1), (t.shape[1],) * t.shape[0],
                           region=torch.cat([p.region for p in parts], dim=1))  # type: ignore[misc]

    def probe_score(self, out: Any) -> torch.Tensor:
        dense = self.output(out)[:1]
        return self.scores(dense, self.default_targets(dense))[0, 0]

    def shares(self, out_row: torch.Tensor) -> list[tuple[int, float]]:
        """The predicted classes of one row (C, H, W) with their pixel share, largest first (ties:
        lower index first)."""
        pred = out_row.argmax(dim=0).flatten()
        counts = torch.bincount(pred, minlength=out_row.shape[0]).tolist()
        total = max(1, int(pred.numel()))
        return sorted(((c, n / total) for c, n in enumerate(counts) if n),
                      key=lambda p: (-p[1], p[0]))

    def classes(self, out_row: torch.Tensor) -> list[dict[str, Any]]:
        """The predicted classes of one row as answers list them: ``{"index", "label", "share"}``,
        largest share first."""
        return [{"index": c, "label": self.labels[c] if c < len(self.labels) else str(c),
                 "share": round_score(s)} for c, s in self.shares(out_row)]

    # -- serving ------------------------------------------------------------------------------
    def parse_options(self, options: Mapping[str, Any], *, max_targets: int) -> SegOptions:
        try:
            targets = parse_targets(options.get("target"), self.labels, max_targets=max_targets)
        except TargetError as exc:
            raise OptionError(str(exc)) from None
        return SegOptions(targets, parse_region(options.get("region")), limit=max_targets)

    def max_targets(self, parsed: SegOptions) -> Optional[int]:  # type: ignore[override]
        if parsed.targets:
            return len(parsed.targets)
        return 1 if parsed.region is not None else None

    def answer_maps(self, parsed: SegOptions) -> int:
        return 1

    def bind(self, parsed: SegOptions, geometry: Geometry) -> SegOptions:
        """The region as weights at the input size: a box clipped to the image (422 when nothing
        is left), a mask PNG decoded (it must have the image's size)."""
        region = parsed.region
        if region is None:
            return parsed
        if region.png is not None:
            return replace(parsed, mask=mask_from_png(region.png, geometry))
        assert region.box is not None
        w, h = geometry.size
        x0, y0, x1, y1 = region.box
        clipped = (max(x0, 0.0), max(y0, 0.0), min(x1, float(w)), min(y1, float(h)))
        if not (clipped[0] < clipped[2] and clipped[1] < clipped[3]):
            raise OptionError(f"invalid value for region: the box {short_repr(list(region.box))} "
                              f"lies outside the {w}x{h} image")
        box = tuple(geometry.box_to_input(clipped))
        return replace(parsed, mask=box_mask(box, geometry.input), box=box)  # type: ignore[arg-type]

    def request_targets(self, out: torch.Tensor, parsed: Sequence[SegOptions],
                        geometry: Sequence[Geometry], topk: Sequence[int]) -> TargetBatch:
        pred = out.argmax(dim=1)  # (R, H, W)
        lists: list[list[int]] = []
        given: list[Optional[torch.Tensor]] = []
        for r, p in enumerate(parsed):
            mask = None if p.mask is None else p.mask.to(out.device)
            if p.targets:
                classes = list(p.targets)
            elif mask is not None:  # the class predicted most inside the region
                weight = torch.zeros(out.shape[1], dtype=torch.float32, device=out.device)
                weight.index_add_(0, pred[r].flatten(), mask.flatten().float())
                classes = [int(self._not_background(weight[None])[0].argmax())]
            else:
                ranked = [c for c, _ in self.shares(out[r]) if c != self.background]
                classes = ranked[:min(topk[r], p.limit)]
            lists.append(classes)
            given.append(mask)
        tb = TargetBatch.of_classes(lists, out.device)
        r, k = tb.index.shape
        region = torch.empty((r, k, *out.shape[-2:]), dtype=torch.float32, device=out.device)
        box = torch.full((r, k, 4), float("nan"), device=out.device)
        for i in range(r):
            if given[i] is not None:
                region[i] = given[i]
                if parsed[i].box is not None:
                    box[i] = torch.tensor(parsed[i].box, device=out.device)
            else:
                region[i] = (pred[i][None] == tb.index[i][:, None, None]).float()
        return replace(tb, region=region, box=box)

    def shown(self, out_row: torch.Tensor, targets: TargetBatch, r: int,
              geometry: Geometry) -> list[Shown]:
        """Each class with its mean probability over its region (and the region's box)."""
        assert targets.count is not None
        row = targets.select(torch.tensor([r]))
        scores = self.probability(out_row[None], row)[0].tolist()
        shown = []
        for k in range(targets.count[r]):
            c = int(targets.index[r, k])
            score = float(scores[k])
            box = None
            if targets.box is not None and not bool(torch.isnan(targets.box[r, k]).any()):
                box = tuple(geometry.box_to_image(targets.box[r, k].tolist()))
            label = self.labels[c] if c < len(self.labels) else str(c)
            shown.append(Shown(c, label, score, box))  # type: ignore[arg-type]
        return shown

    def answer(self, out_row: torch.Tensor, parsed: SegOptions, topk: int, geometry: Geometry,
               explanations: Optional[list[dict[str, Any]]]) -> dict[str, Any]:
        from ..render import b64

        size = geometry.render_size
        pred = out_row.argmax(dim=0).cpu().numpy()
        seg: dict[str, Any] = {
            "mask": b64(mask_png(nearest_resize(pred, size))),
            "width": int(geometry.size[0]), "height": int(geometry.size[1]),
            "classes": self.classes(out_row)}
        if tuple(size) != tuple(geometry.size):
            seg.update(scaled=True, mask_width=int(size[0]), mask_height=int(size[1]))
        body: dict[str, Any] = {"segmentation": seg}
        if explanations is not None:
            body["explanations"] = explanations
        return body

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "background": self.background}

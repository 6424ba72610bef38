"""Batched explanation in stages with plain data between them.

1. :func:`batch_cams` — one pass of the model's backend (:mod:`camserve.backends`) over the whole
   batch; the explain rows' targets come from
   their task (:meth:`camserve.tasks.Task.request_targets`: what each request asked for, or the
   task's default, read from the same forward's output) as one
   :class:`camserve.tasks.TargetBatch`; gradients only for the explain rows, each row by its own
   method (rows sharing a gradient method share the backward) -> :class:`BatchCams`;
2. :func:`render_row` — one row's :class:`camserve.records.Explanation` records, complete (label
   and score as the task shows them, :class:`camserve.tasks.Shown`), with the outputs it asked for
   (bbox, heatmap PNG, overlay PNG — with the target's box drawn where the task has one — raw
   CAM). Its uint8
   maps are made one at a time (:func:`row_maps`, small maps a few at a time) at the size its
   :class:`MapPlan` says, so memory does not grow with the batch, the targets or the image.

The work budget, before any of it: :func:`plan_maps` turns a request's options and image size
into a :class:`MapPlan` — maps at a capped size (long side at most ``max_map_side``), PNGs at the
original size when the work fits the budget, else at the capped size (``scaled``) — or refuses
it with 413 ``WorkTooLarge`` saying what to reduce. Work is counted in megapixel-maps: for each
target, the pixels of each map output (heatmap, overlay, bbox) at the size it is made at, the
overlay three times (it is RGB). The raw
CAM is at the target layer's resolution and costs nothing here (the response size bounds it).

Example::

    >>> from camserve.options import RequestOptions, ServingLimits
    >>> lim = ServingLimits(max_map_side=2048, max_row_work=192, max_batch_work=512)
    >>> o = RequestOptions(True, (1, 2, 3), 1, "gradcam", ("heatmap", "overlay", "bbox"), maps=3)
    >>> p = plan_maps(o, (6000, 6000), lim)
    >>> p.map_size, p.render_size, p.scaled, round(p.work / 1e6, 1)
    ((2048, 2048), (2048, 2048), True, 62.9)
    >>> plan_maps(o, (640, 480), lim).scaled
    False
    >>> many = RequestOptions(True, tuple(range(12)), 1, "gradcam", o.outputs, maps=12)
    >>> plan_maps(many, (6000, 6000), lim)
    Traceback (most recent call last):
    ...
    camserve.errors.WorkTooLarge: work too large: 12 targets x (heatmap + 3 x overlay + bbox) x 2048x2048 maps = 251.7 megapixel-maps exceeds the limit of 192 per request (handler.max_row_work); ask for fewer targets (option 'target') or fewer outputs (option 'outputs': drop overlay or heatmap or bbox)
"""
from __future__ import annotations

import itertools
import json
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .engine import CamEngine, heatmaps_at_sizes
from .methods import MethodSpec, get_method
from .errors import RequestError, ResponseTooLarge, WorkTooLarge
from .options import RequestOptions, ServingLimits
from .records import Explanation
from .tasks import Geometry, Shown, TargetBatch, Task
from .render import (OutputTooLarge, b64, bbox_from_heatmap, capped_size, heatmap_png,
                     overlay_png, resize_map, scale_box)

if TYPE_CHECKING:
    from .backends import Backend

MAP_OUTPUTS = frozenset({"heatmap", "overlay", "bbox"})
PNG_OUTPUTS = ("heatmap", "overlay")
#: Work per map pixel of each output: the overlay is RGB (three bytes a pixel, and the image it is
#: drawn on is kept until it is drawn), the heatmap and the bbox's map one byte.
OUTPUT_WEIGHTS = {"heatmap": 1, "overlay": 3, "bbox": 1}
#: Map pixels made in one call of :func:`camserve.engine.heatmaps_at_sizes` (small maps are
#: made a few at a time, a map larger than this alone).
CHUNK_PIXELS = 1 << 22
MEGA = 1_000_000


def work_too_large(message: str) -> RequestError:
    """A request over the work budget: 413 ``WorkTooLarge``."""
    return WorkTooLarge(message)


@dataclass(frozen=True)
class MapPlan:
    """How one row's maps are made: ``size`` the image (W, H), ``map_size`` the maps (W, H, long
    side capped), ``render_size`` the heatmap/overlay PNGs (W, H: the image size, or the map size
    when the budget does not allow it), ``work`` in pixels (megapixel-maps x 1e6)."""

    size: tuple[int, int]
    map_size: tuple[int, int]
    render_size: tuple[int, int]
    work: int = 0

    @property
    def scaled(self) -> bool:
        """The PNGs are smaller than the image (the answer says so)."""
        return self.render_size != self.size

    @classmethod
    def exact(cls, size: tuple[int, int]) -> "MapPlan":
        """Everything at the image size (no cap)."""
        return cls(tuple(size), tuple(size), tuple(size))  # type: ignore[arg-type]


def _mp(pixels: float) -> str:
    v = pixels / MEGA
    return f"{v:.1f}" if v >= 1 else f"{v:.3f}"


def plan_maps(options: RequestOptions, size: tuple[int, int], limits: ServingLimits,
              available: Optional[int] = None) -> MapPlan:
    """The :class:`MapPlan` of a request of image ``size`` (W, H) under ``limits``, or 413
    ``WorkTooLarge``; ``available``: pixels of work left in the batch (default: no batch limit).

    With T targets, P the weights of the PNG outputs asked for (heatmap 1, overlay 3: see
    :data:`OUTPUT_WEIGHTS`), B = 1 when a bbox is asked for, maps of ``m`` pixels (the size capped
    to ``max_map_side``), an image of ``n`` pixels and E answer maps (``options.answer_maps``: a
    segmentation mask, made whether the request explains or not): at the original size the work
    is ``T x (P x n + B x m) + E x n``, at the capped size ``T x (P + B) x m + E x m``. The first
    that fits ``max_row_work`` (and what is left of ``max_batch_work``) is chosen.
    """
    w, h = int(size[0]), int(size[1])
    cap = capped_size((w, h), limits.max_map_side)
    outs = [o for o in ("heatmap", "overlay", "bbox") if o in options.outputs]
    t = max(1, options.maps) if options.explain and outs else 0
    extra = max(0, options.answer_maps)
    if not t and not extra:
        return MapPlan((w, h), cap, (w, h), 0)
    n_png = sum(OUTPUT_WEIGHTS[o] for o in outs if o in PNG_OUTPUTS)
    n_box = int("bbox" in outs)
    m = cap[0] * cap[1]
    full = t * (n_png * w * h + n_box * m) + extra * w * h
    capped = t * (n_png + n_box) * m + extra * m
    row = limits.max_row_work * MEGA
    avail = row if available is None else min(row, available)
    if full <= avail:
        return MapPlan((w, h), cap, (w, h), full)
    if capped <= avail:
        return MapPlan((w, h), cap, cap, capped)
    weighted = " + ".join(o if OUTPUT_WEIGHTS[o] == 1 else f"{OUTPUT_WEIGHTS[o]} x {o}"
                          for o in outs)
    what = (f"{t} target{'s' if t > 1 else ''} x ({weighted}) x {cap[0]}x{cap[1]} maps" if t else "")
    if extra:
        what += f"{' + ' if what else ''}{extra} answer map{'s' if extra > 1 else ''} (a mask) of " \
                f"{cap[0]}x{cap[1]}"
    what += f" = {_mp(capped)} megapixel-maps"
    reduce = ("ask for fewer targets (option 'target') or fewer outputs (option 'outputs': drop "
              f"{' or '.join([o for o in ('overlay', 'heatmap', 'bbox') if o in outs])})"
              if t else "send a smaller image")
    if capped > row:
        raise work_too_large(f"work too large: {what} exceeds the limit of "
                             f"{limits.max_row_work} per request (handler.max_row_work); "
                             f"{reduce}")
    raise work_too_large(f"work too large for this batch: {what}, but only "
                         f"{_mp(max(0, avail))} of the batch's {limits.max_batch_work} "
                         f"(handler.max_batch_work) are left after the requests batched with "
                         f"it; send it again, or {reduce}")


def plan_compute(options: RequestOptions, engine: Any, limits: ServingLimits,
                 allowed: Sequence[str], available: Optional[float] = None) -> float:
    """The method work of an explaining request in forwards at the model's input size
    (:meth:`camserve.methods.MethodSpec.cost` on the layer of ``engine`` (a
    :class:`~camserve.engine.CamEngine` or a :class:`~camserve.backends.Backend`) for ``options.maps`` targets,
    :meth:`camserve.methods.Cost.units` with the engine's suffix share), or 413 ``WorkTooLarge``
    over ``max_row_forwards`` (or what ``available`` of ``max_batch_forwards`` is left), naming
    the ``allowed`` methods that fit, and a ``max_channels`` that fits where the method has it.

    Example::

        >>> import torch, torchvision
        >>> eng = CamEngine(torchvision.models.resnet18(num_classes=3).eval(), "layer4")
        >>> _ = eng(torch.rand(1, 3, 64, 64))
        >>> o = RequestOptions(True, None, 1, "scorecam", ("heatmap",))
        >>> plan_compute(o, eng, ServingLimits(), ("gradcam", "scorecam"))
        Traceback (most recent call last):
        ...
        camserve.errors.WorkTooLarge: work too large: method scorecam costs 512 forwards per request, over the limit of 64 (handler.max_row_forwards); use a cheaper method (gradcam) or option max_channels <= 64
    """
    if not options.explain:
        return 0.0
    spec = options.spec
    assert spec is not None
    size = engine.layer_size
    if size is None:
        return 0.0
    share = engine.suffix_share
    k = max(1, options.maps)
    units = spec.cost(size, k).units(share)
    row = float(limits.max_row_forwards)
    avail = row if available is None else min(row, available)
    if units <= avail:
        return units
    cheaper = [m for m in allowed if get_method(m).spec().cost(size, k).units(share) <= avail]
    hints = [f"use a cheaper method ({', '.join(cheaper)})"] if cheaper else []
    if "max_channels" in spec.method.option_names:
        per = units / max(1, min(size.channels, spec.get("max_channels") or size.channels))
        fit = int(avail // per) if per > 0 else 0
        if fit >= 1:
            hints.append(f"option max_channels <= {fit}")
    if spec.get("aug_smooth"):
        hints.append("drop aug_smooth")
    what = f"method {spec} costs {units:.0f} forwards per request"
    fix = "; " + " or ".join(hints) if hints else ""
    if units > row:
        raise work_too_large(f"work too large: {what}, over the limit of {limits.max_row_forwards} "
                             f"(handler.max_row_forwards){fix}")
    raise work_too_large(f"work too large for this batch: {what}, but only {max(0.0, avail):.0f} "
                         f"of the batch's {limits.max_batch_forwards} (handler.max_batch_forwards) "
                         f"are left; send it again{fix}")


def drop_hint(options: RequestOptions) -> list[str]:
    """What a request could drop to make its answer smaller."""
    drop = [o for o in ("overlay", "raw", "heatmap") if o in options.outputs]
    if options.targets and len(options.targets) > 1:
        drop.append("targets")
    return drop


@dataclass(frozen=True)
class BatchCams:
    """CAMs of the explain rows: ``cams`` (R, K, h, w) raw (or R tensors (K, h, w) when rows
    of input- and layer-resolution methods share the batch), ``targets`` their
    :class:`camserve.tasks.TargetBatch` (``count`` real targets per row), ``output`` the task's
    output of the whole batch (detached), the target ``layer``."""

    cams: Any
    targets: TargetBatch
    output: Any
    layer: str

    @property
    def logits(self) -> torch.Tensor:
        """The output when it is a tensor (classification, multilabel)."""
        return self.output


@dataclass(frozen=True)
class CamRequest:
    """What the explain rows of a batch ask a backend for: each row's ``options`` (its method, and
    the task's parsed options its targets come from) and ``geometry``."""

    options: tuple[RequestOptions, ...]
    geometry: tuple[Geometry, ...]

    @property
    def methods(self) -> tuple[str, ...]:
        """One method per explain row."""
        return tuple(o.method for o in self.options)

    @property
    def specs(self) -> tuple[MethodSpec, ...]:
        """One method with its options per explain row."""
        return tuple(o.spec or get_method(o.method).spec() for o in self.options)

    def part(self, rows: Sequence[int]) -> "CamRequest":
        """The request of some of the rows (indices into :attr:`options`)."""
        return CamRequest(tuple(self.options[j] for j in rows), tuple(self.geometry[j] for j in rows))

    def targets(self, task: Task, out: Any) -> TargetBatch:
        """The rows' targets from their task output ``out`` (detached, explain rows only)."""
        return task.request_targets(out, [o.task for o in self.options], self.geometry,
                                    [o.topk for o in self.options])

    def known_targets(self, task: Task) -> Optional[TargetBatch]:
        """The rows' targets as far as they are known before the forward
        (:meth:`camserve.tasks.Task.known_targets`: ``-1`` for a row's default target)."""
        return task.known_targets([o.task for o in self.options], self.geometry,
                                  [o.topk for o in self.options])


def batch_cams(backend: "Backend", x: torch.Tensor, rows: Sequence[int],
               options: Sequence[RequestOptions], geometry: Sequence[Geometry]) -> BatchCams:
    """One backend pass over batch ``x`` explaining ``rows`` (their ``options`` and image
    ``geometry``): targets from the task, one method per row (:class:`camserve.backends.Backend`:
    the PyTorch engine or an onnxruntime session)."""
    return backend.explain(x, list(rows), CamRequest(tuple(options), tuple(geometry)))


def row_maps(cams: torch.Tensor, map_size: tuple[int, int],
             chunk_pixels: int = CHUNK_PIXELS) -> Iterator[np.ndarray]:
    """uint8 maps of one row's CAMs ``cams`` (K, h, w) at ``map_size`` (W, H), made lazily, as
    many per call of :func:`camserve.engine.heatmaps_at_sizes` as fit ``chunk_pixels`` (at least
    one): at most one chunk of float maps exists at a time."""
    w, h = int(map_size[0]), int(map_size[1])
    per = max(1, chunk_pixels // max(1, w * h))
    for i in range(0, int(cams.shape[0]), per):
        part = cams[i:i + per]
        with one_thread(part.device):
            maps = heatmaps_at_sizes(part, [(h, w)] * int(part.shape[0]))
        yield from maps


@contextmanager
def one_thread(device: torch.device) -> Iterator[None]:
    """Inside the block, this thread's CPU torch ops run on one intra-op thread (restored after).

    The maps' resize, normalisation and rounding are a handful of memory-bound elementwise ops;
    spread over a worker's intra-op threads they gain little on a quiet machine, and on a busy
    one every parallel region waits for its slowest thread (``round_`` of one 96×96 map measured
    at 0.24 ms on 2 threads against 4 µs on one; 2.3 ms against 0.13 ms for a 640×480 map).
    """
    n = torch.get_num_threads()
    if device.type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _raw(cam: torch.Tensor) -> dict:
    arr = cam.float().cpu().numpy()
    return {"shape": [int(arr.shape[0]), int(arr.shape[1])], "data": arr.tolist()}


class _ByteBudget:
    """Bytes of an answer so far against ``limit`` (None: unlimited); over it, 413
    ``ResponseTooLarge`` naming what to drop — raised as soon as it is known, so an answer that
    cannot be sent is never finished."""

    def __init__(self, limit: Optional[int], options: RequestOptions) -> None:
        self.limit = limit
        self.used = 0
        self.options = options

    def _over(self, size: int) -> ResponseTooLarge:
        return ResponseTooLarge(size, int(self.limit or 0), drop_hint(self.options))

    def add(self, n: int) -> None:
        self.used += n
        if self.limit is not None and self.used > self.limit:
            raise self._over(self.used)

    def png_b64(self, encode: Callable[[Optional[int]], bytes]) -> str:
        """base64 of ``encode(max_png_bytes)``, the PNG stopped once its text would not fit."""
        cap = None if self.limit is None else max(0, (self.limit - self.used) * 3 // 4)
        try:
            data = encode(cap)
        except OutputTooLarge as exc:
            raise self._over(self.used + 4 * exc.size // 3) from None
        text = b64(data)
        del data
        self.add(len(text))
        return text


def render_row(image: Optional[Image.Image], options: RequestOptions, cams: torch.Tensor,
               shown: Sequence[Shown], layer: str, *, plan: Optional[MapPlan] = None,
               max_bytes: Optional[int] = None) -> list[Explanation]:
    """One row's explanations: ``cams`` (K, h, w) raw, ``shown`` how each target is shown (class,
    label, score, and a box in original pixels that the overlay draws); ``plan`` the sizes
    (default: everything at ``image``'s size); ``image`` the picture an overlay is drawn on (any
    size: it is resized to the PNG size; needed only for ``overlay``). Maps are made one at a time
    and dropped after use; the bbox is in original pixels. ``max_bytes``: the answer's byte limit;
    rendering stops with 413 ``ResponseTooLarge`` as soon as the images pass it."""
    if plan is None:
        if image is None:
            raise ValueError("invalid value for plan: needed when there is no image")
        plan = MapPlan.exact(image.size)
    outs = options.outputs
    if "overlay" in outs and image is None:
        raise ValueError("invalid value for image: an overlay needs the image")
    need = bool(MAP_OUTPUTS.intersection(outs))
    maps: Iterator[Optional[np.ndarray]] = (row_maps(cams, plan.map_size) if need
                                            else itertools.repeat(None))
    budget = _ByteBudget(max_bytes, options)
    records = []
    inside = in_box(options)
    for cam, show, hm in zip(cams, shown, maps):
        bbox = heat = over = raw = None
        if hm is not None and inside and show.box is not None:
            hm = box_heatmap(cam, plan.map_size, [v * plan.map_size[i % 2] / plan.size[i % 2]
                                                  for i, v in enumerate(show.box)])
        if hm is not None:
            if "bbox" in outs:
                bbox = scale_box(bbox_from_heatmap(hm), plan.map_size, plan.size)
            if "heatmap" in outs or "overlay" in outs:
                big = resize_map(hm, plan.render_size)
                if "heatmap" in outs:
                    heat = budget.png_b64(lambda cap: heatmap_png(big, cap))
                if "overlay" in outs:
                    box = None if show.box is None else [
                        v * plan.render_size[i % 2] / plan.size[i % 2]
                        for i, v in enumerate(show.box)]
                    over = budget.png_b64(lambda cap: overlay_png(image, big, max_bytes=cap,
                                                                  box=box))
                del big
        del hm
        if "raw" in outs:
            raw = _raw(cam)
            budget.add(len(json.dumps(raw["data"], separators=(",", ":"))))
        records.append(Explanation(
            target=show.index, label=show.label, score=show.score, method=options.method,
            layer=layer, width=plan.size[0], height=plan.size[1], bbox=bbox, heatmap=heat,
            overlay=over, raw=raw, with_bbox="bbox" in outs))
    return records


def in_box(options: RequestOptions) -> bool:
    """A row's maps of targets shown with a box are renormalised inside it: when the request
    asks (its task options' ``box_normalize``), and always for a gradient-free method (its map
    is the same for every target)."""
    from .methods import get_method

    return bool(getattr(options.task, "box_normalize", False)) or \
        not get_method(options.method).gradients


def box_heatmap(cam: torch.Tensor, map_size: tuple[int, int], box: Sequence[float]) -> np.ndarray:
    """uint8 map (H, W) of ``cam`` (h, w) at ``map_size`` (W, H), min-max normalised inside
    ``box`` (``x0, y0, x1, y1`` in map pixels) and zero outside it (pytorch-grad-cam's
    ``renormalize_cam_in_bounding_boxes`` for one box).

    Example::

        >>> m = box_heatmap(torch.arange(16.0).reshape(4, 4), (4, 4), (0, 0, 2, 2))
        >>> m[:2, :2].tolist(), int(m[3, 3])
        ([[0, 51], [204, 255]], 0)
    """
    from .engine import normalize_maps, to_uint8

    w, h = int(map_size[0]), int(map_size[1])
    full = normalize_maps(cam[None].float(), (h, w))[0]
    x0, y0 = max(0, int(box[0])), max(0, int(box[1]))
    x1, y1 = min(w, max(x0 + 1, int(round(box[2])))), min(h, max(y0 + 1, int(round(box[3]))))
    out = torch.zeros_like(full)
    if x0 < w and y0 < h:
        out[y0:y1, x0:x1] = normalize_maps(full[None, y0:y1, x0:x1])[0]
    return to_uint8(out).cpu().numpy()


def explanation_json(record: Explanation, plan: MapPlan) -> dict[str, Any]:
    """The record's JSON; when the PNGs are smaller than the image, ``"scaled": true`` and their
    ``map_width`` / ``map_height`` are added (the bbox stays in original pixels)."""
    out = record.to_json()
    if plan.scaled and (record.heatmap is not None or record.overlay is not None):
        out.update(scaled=True, map_width=int(plan.render_size[0]),
                   map_height=int(plan.render_size[1]))
    return out

"""Serving core: a batch of request rows -> one answer per row, with the batch's stats.

Everything a model server needs except the server and the model runtime: the batches run on a
:class:`camserve.backends.Backend` (the PyTorch engine or an onnxruntime session over the
exported CAM graph, ``handler.backend``), which this module never tells apart. The TorchServe
handler (``handler/gradcam_handler.py``) and the KServe adapter are thin layers over
:class:`CamService`,
and this module never imports TorchServe. The stages live in their own modules with plain data
between them: :mod:`camserve.envelopes` (row -> :class:`RawRequest`), :mod:`camserve.options`
(-> :class:`RequestOptions`), :mod:`camserve.images` (decode, preprocess), :mod:`camserve.explain`
(target table -> batch CAMs -> :class:`camserve.records.Explanation` records).

:meth:`CamService.handle_batch` is two public stages, for a server that runs them apart (the
KServe predictor times them as its own stages and batches prepared requests of several callers):
:meth:`CamService.prepare` (envelope, options, work budget, decoding; rows may also be
:class:`camserve.envelopes.RawRequest` records) and :meth:`CamService.run_prepared` (the batched
pass and the rendering).

Each row is its own transaction: any exception while parsing, decoding, explaining or rendering
one row becomes that row's answer (400/413/422, or 500 ``InternalError`` with a short error id
that the log carries next to the traceback) and its batch-mates get their 200. When the batched
forward itself fails, the rows are retried one by one so the failure stays with the row that
causes it. No answer is larger than ``max_response_size``: a row whose JSON would be is answered
413 ``ResponseTooLarge``, naming what to drop (rendering stops as soon as that is known).

Work is budgeted before any heavy work (:func:`camserve.explain.plan_maps`): from the pixel count
in the image header (read before the pixels are decoded) and the request's targets and outputs,
each row gets a :class:`camserve.explain.MapPlan` within ``max_row_work`` and what the batch's
earlier rows left of ``max_batch_work``, or 413 ``WorkTooLarge``. A decoded image is kept only
when an overlay is drawn on it, and then at the size the overlay is rendered at.

Example::

    >>> import io
    >>> from PIL import Image
    >>> from camserve.models import ModelSpec, load_model
    >>> spec = ModelSpec.from_config({"arch": "torchvision.models.resnet18", "num_classes": 4,
    ...                               "target_layer": "layer4", "input_size": 64})
    >>> svc = CamService(load_model(spec))
    >>> buf = io.BytesIO(); Image.new("RGB", (40, 30), "red").save(buf, "PNG")
    >>> out = svc.handle_batch([{"data": buf.getvalue(), "explain": "true"}, {"body": b"?"}])
    >>> [r.status for r in out.results], out.stats.error_rows
    ([200, 400], 1)
    >>> out.results[0].body["explanations"][0]["width"]
    40
"""
from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from PIL import Image

from .backends import Backend, TorchBackend, load_backend
from .envelopes import RawRequest, extract_request
from .errors import InternalError, InvalidImage, RequestError, ResponseTooLarge, from_image_error
from .explain import (MEGA, BatchCams, MapPlan, batch_cams, drop_hint, explanation_json,
                      one_thread, plan_compute, plan_maps, render_row)
from .images import ImageError, decode_image, preprocess
from .layers import LayerError
from .methods import get_method
from .models import ConfigError, LoadedModel, ModelSpec, spec_of_dir
from .options import MAX_TARGETS, RequestOptions, ServingLimits, option_keys, parse_options
from .parsing import short_repr
from .tasks import Geometry

log = logging.getLogger(__name__)


@dataclass
class RowResult:
    """The answer to one request: HTTP ``status``, its reason ``phrase`` and the JSON ``body``;
    ``text`` is the body as compact JSON (ASCII, so its length is its size in bytes)."""

    status: int
    body: dict[str, Any]
    phrase: str = "OK"
    text: str = ""

    def __post_init__(self) -> None:
        if not self.text:
            self.text = json.dumps(self.body, separators=(",", ":"), allow_nan=False)

    @classmethod
    def error(cls, exc: RequestError) -> "RowResult":
        """The answer for a request error."""
        return cls(exc.code, exc.to_body(), exc.phrase)

    def to_json(self) -> str:
        """The body as compact JSON text."""
        return self.text


@dataclass
class BatchStats:
    """What one batch did, for metrics: rows, explained rows, rows answered with an error (of
    them, internal errors), batched passes that failed and were retried row by row, maps made,
    milliseconds spent."""

    rows: int = 0
    explained_rows: int = 0
    error_rows: int = 0
    internal_errors: int = 0
    failed_batches: int = 0
    maps: int = 0
    cam_ms: float = 0.0
    total_ms: float = 0.0


@dataclass
class BatchOutcome:
    """One :class:`RowResult` per row, in order, and the batch's :class:`BatchStats`."""

    results: list[RowResult]
    stats: BatchStats = field(default_factory=BatchStats)


@dataclass(frozen=True)
class _Row:
    """One image of a request that parsed and decoded: the request's batch index, the input
    tensor, options, map plan, geometry (image size, input size) and the image an overlay is drawn
    on (None when no overlay is asked for). ``part`` 0 is the request's own image; 1, 2, ... its
    companion images (:meth:`camserve.tasks.Task.companions`), forwarded right after it."""

    index: int
    tensor: torch.Tensor
    options: RequestOptions
    plan: MapPlan
    geometry: Geometry
    image: Optional[Image.Image] = None
    part: int = 0


@dataclass
class Prepared:
    """Requests after :meth:`CamService.prepare`, in order: each one's decoded rows (ready for the
    model: its image, then its companion images) or its answer already (an error); ``ms``:
    milliseconds spent preparing them."""

    items: list[Any]
    ms: float = 0.0

    def __len__(self) -> int:
        return len(self.items)

    @property
    def work(self) -> int:
        """The work its rows plan, in pixels (what they take of a batch's ``max_batch_work``)."""
        return sum(row.plan.work for item in self.items if isinstance(item, list) for row in item)

    @classmethod
    def join(cls, parts: Sequence["Prepared"]) -> "Prepared":
        """The requests of several callers as one batch (one model pass), in order."""
        return cls([item for p in parts for item in p.items], sum(p.ms for p in parts))


class _CamView:
    """One explain row's slice of a batch's CAMs: its real targets, their maps, its layer."""

    def __init__(self, cams: BatchCams, slot: int) -> None:
        count = cams.targets.count[slot]
        self.cams = cams.cams[slot][:count]
        self.targets = cams.targets
        self.slot = slot
        self.layer = cams.layer


class _Work:
    """What is left of one batch's work budgets (map pixels, method forwards)."""

    def __init__(self, pixels: int, forwards: float = float("inf")) -> None:
        self.left = pixels
        self.forwards = forwards


_Forward = tuple[Any, Optional[BatchCams], list[int]]


def safe_traceback() -> str:
    """The current exception's frames and its type, with its message escaped and cut (an
    exception message may carry request data; it must not forge log lines)."""
    _, exc, tb = sys.exc_info()
    if exc is None:
        return "no exception"
    frames = "".join(traceback.format_tb(tb))
    return f"Traceback (most recent call last):\n{frames}{type(exc).__name__}: " \
           f"{short_repr(str(exc), 300)}"


def internal_error(what: str) -> RowResult:
    """A 500 answer with a fresh error id; logs the current exception's traceback with it."""
    err = InternalError.new()
    log.error("camserve: internal error %s while %s\n%s", err.error_id, what, safe_traceback())
    return RowResult.error(err)


class CamService:
    """One worker's model backend and limits; :meth:`handle_batch` answers a batch of requests.

    Args:
        source: what runs the batches: a :class:`camserve.backends.Backend` (the PyTorch engine
            or an onnxruntime session, :func:`camserve.backends.load_backend`), or a loaded model
            (:func:`camserve.models.load_model_dir`), served by the PyTorch engine.
        limits: serving budgets (default: :class:`ServingLimits` of the spec).
        threads: the worker's threads (:func:`camserve.backends.worker_threads`): the rows of a
            batch that explain are rendered on as many (default 1: one after the other).
    """

    def __init__(self, source: LoadedModel | Backend, limits: Optional[ServingLimits] = None, *,
                 threads: Optional[int] = None) -> None:
        self.backend = source if isinstance(source, Backend) else TorchBackend(source)
        self.threads = max(1, int(threads or 1))
        self.spec = self.backend.spec
        self.labels: list[str] = list(self.backend.labels)
        self.num_classes = len(self.labels)
        self.device = torch.device(self.backend.device)
        self.limits = limits or ServingLimits.from_spec(self.spec)
        self.task = self.backend.task
        self.warm_up()
        log.info("camserve: serving %s (%s, %d classes, layer %r, input %s) on %s with the %s "
                 "backend", self.spec.arch, self.task.name, self.num_classes, self.layer,
                 self.spec.input_size, self.device, self.backend.name)

    @property
    def layer(self) -> str:
        """The target layer's dotted name."""
        return self.backend.layer

    @property
    def served_methods(self) -> tuple[str, ...]:
        """The methods requests may ask for: those ``handler.methods`` allows that the backend
        runs."""
        return tuple(m for m in self.spec.allowed_methods if m in self.backend.methods)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, *, weights: Optional[str | Path] = None,
                       overrides: Optional[Mapping[str, Any]] = None,
                       device: torch.device | str = "cpu",
                       threads: Optional[int] = None) -> "CamService":
        """Build the service from a model folder (or an extracted archive) with the backend its
        ``handler.backend`` names (:func:`camserve.backends.load_backend`; ``weights`` and
        ``overrides`` as in :func:`camserve.models.load_model_dir`, ``threads`` the worker's: the
        onnxruntime sessions' and the rendering's); the serving limits come from the same ``handler:`` block
        (:meth:`ServingLimits.from_spec`)."""
        return cls(load_backend(spec_of_dir(model_dir, overrides), model_dir, weights=weights,
                                device=device, threads=threads), threads=threads)

    @classmethod
    def from_handler_config(cls, handler: Optional[Mapping[str, Any]], model_dir: str | Path, *,
                            weights: Optional[str | Path] = None,
                            device: torch.device | str = "cpu",
                            threads: Optional[int] = None) -> "CamService":
        """Build the service from an already parsed ``handler:`` block (TorchServe hands the
        handler the archive's config, whatever its file name) and the folder holding the model
        file, weights and labels (or the graph)."""
        spec = ModelSpec.from_config(handler)
        return cls(load_backend(spec, model_dir, weights=weights, device=device, threads=threads),
                   threads=threads)

    def warm_up(self) -> None:
        """One explain pass and one predict pass on a blank input; a target layer that cannot
        give a map is a :class:`ConfigError` naming ``handler.target_layer``."""
        h, w = self.spec.input_size
        x = torch.zeros(1, 3, h, w, device=self.device)
        opts = parse_options({}, self.spec, self.labels, explain=True, limits=self.limits,
                             task=self.task, methods=self.backend.methods)
        try:
            batch_cams(self.backend, x, [0], [opts], [Geometry((w, h), (h, w))])
        except LayerError as exc:
            raise ConfigError(exc.message_for("handler.target_layer")) from None
        except ValueError as exc:
            raise ConfigError(f"invalid value for handler.target_layer: "
                              f"{self.layer!r} ({exc})") from None
        self.backend.predict(x)
        self.backend.measure(x)

    def describe(self) -> dict[str, Any]:
        """What the model serves and which options it takes (TorchServe's customized describe)."""
        return {"arch": self.spec.arch, "num_classes": self.num_classes, "labels": self.labels,
                "target_layer": self.layer, "input_size": list(self.spec.input_size),
                "task": self.task.name, "methods": self.describe_methods(),
                "options": list(option_keys(self.task)),
                "defaults": {"method": self.spec.method,
                             "topk": min(self.spec.topk, self.num_classes),
                             "outputs": list(self.spec.outputs)},
                "max_pixels": self.spec.max_pixels, "max_targets": MAX_TARGETS,
                "max_response_size": self.limits.max_response_size,
                "max_option_length": self.limits.max_option_length,
                "max_map_side": self.limits.max_map_side,
                "max_row_work": self.limits.max_row_work,
                "max_batch_work": self.limits.max_batch_work,
                "max_row_forwards": self.limits.max_row_forwards,
                "max_batch_forwards": self.limits.max_batch_forwards, "device": str(self.device),
                **self.backend.describe()}

    def describe_methods(self) -> list[dict[str, Any]]:
        """The methods this model allows, each with its needs, options and its cost for one
        target on the served layer (``forwards``: the cost in forwards at the input size)."""
        out = []
        size = self.backend.layer_size
        for name in self.served_methods:
            d = get_method(name).describe(size)
            if size is not None:
                d["forwards"] = round(get_method(name).spec().cost(size, 1).units(
                    self.backend.suffix_share), 3)
            out.append(d)
        return out

    # -- one batch ------------------------------------------------------------------------------
    def handle_batch(self, rows: Sequence[Any],
                     force_explain: Optional[Sequence[bool]] = None) -> BatchOutcome:
        """Answer every request of a batch: one :class:`RowResult` per row, in order.

        ``rows``: TorchServe request rows or request records (see :meth:`prepare`).
        ``force_explain``: one boolean per row; True explains that row whatever its options say.
        A bad row gets its own 4xx/413/500 result; the other rows are answered as usual.
        """
        return self.run_prepared(self.prepare(rows, force_explain))

    # -- the stages of a batch, for servers that run and time them apart (camserve.kserve) --------
    def prepare(self, rows: Sequence[Any],
                force_explain: Optional[Sequence[bool]] = None) -> Prepared:
        """Envelope, options, work budget and decoding of each request, before any model work.

        A row is a TorchServe request row, a :class:`camserve.envelopes.RawRequest` record, or the
        :class:`RequestError` a record could not be read with (that row's answer). The rows share
        one ``max_batch_work`` budget; ``force_explain`` as in :meth:`handle_batch`.
        """
        t0 = time.perf_counter()
        forced = [False] * len(rows) if force_explain is None else [bool(f) for f in force_explain]
        if len(forced) != len(rows):
            raise ValueError(f"invalid value for force_explain: {len(forced)} flags for "
                             f"{len(rows)} rows")
        work = _Work(self.limits.max_batch_work * MEGA, float(self.limits.max_batch_forwards))
        items = [self._prepare(i, row, f, len(rows), work)
                 for i, (row, f) in enumerate(zip(rows, forced))]
        return Prepared(items, (time.perf_counter() - t0) * 1000.0)

    def run_prepared(self, prepared: Prepared) -> BatchOutcome:
        """One batched pass over the decoded rows of ``prepared`` (see :meth:`Prepared.join`) and
        every request's answer, in order, rendered."""
        t0 = time.perf_counter()
        items = prepared.items
        stats = BatchStats(rows=len(items))
        results = [item if isinstance(item, RowResult) else None for item in items]
        good = [k for k, item in enumerate(items) if isinstance(item, list)]
        if good:
            for k, res in zip(good, self._serve([items[k] for k in good], stats)):
                results[k] = res
        final = [r if r is not None else internal_error("answering a row") for r in results]
        self._count(final, stats)
        stats.total_ms = prepared.ms + (time.perf_counter() - t0) * 1000.0
        log.info("camserve: batch of %d rows (%d explained, %d rejected) in %.1f ms", stats.rows,
                 stats.explained_rows, stats.error_rows, stats.total_ms)
        return BatchOutcome(final, stats)

    @staticmethod
    def _count(results: Sequence[RowResult], stats: BatchStats) -> None:
        stats.error_rows = sum(r.status != 200 for r in results)
        stats.internal_errors = sum(r.status >= 500 for r in results)

    def _prepare(self, index: int, row: Any, explain: bool, n: int,
                 work: Optional[_Work] = None) -> list[_Row] | RowResult:
        """Envelope, options, work budget, image (and the task's companion images) -> the
        request's :class:`_Row` list, or its error answer. The budget is checked from the
        header's size before decoding, and spent from the decoded size."""
        work = work or _Work(self.limits.max_batch_work * MEGA)
        try:
            if isinstance(row, RequestError):  # a record that could not be read: its answer
                raise row
            raw = row if isinstance(row, RawRequest) else extract_request(row)
            opts = parse_options(raw.options, self.spec, self.labels, explain=explain,
                                 limits=self.limits, task=self.task, methods=self.backend.methods)
            if opts.explain and opts.spec is not None:
                self.backend.check(opts.spec)
            # 413 for the method's work, then from the header's size, before any pixel is decoded
            forwards = plan_compute(opts, self.backend, self.limits, self.served_methods,
                                    work.forwards)
            left = work.left
            rows = [self._image(index, raw.data, opts, work)]
            for part, (name, data) in enumerate(self.task.companions(rows[0].options.task), 1):
                companion = replace(opts, task=self.task.companion_options(opts.task, part - 1))
                try:
                    rows.append(self._image(index, data, companion, work, part))
                except RequestError as exc:
                    work.left = left
                    raise RequestError(f"{name}: {exc.message}", exc.code, exc.type) from None
            work.forwards -= forwards
            return rows
        except RequestError as exc:
            log.info("camserve: request %d of a batch of %d rejected: %s %s: %s", index, n,
                     exc.code, exc.type, exc.message)
            return RowResult.error(exc)
        except Exception:
            return internal_error(f"preparing request {index} of a batch of {n}")

    def _image(self, index: int, data: bytes, opts: RequestOptions, work: _Work,
               part: int = 0) -> _Row:
        """One image of a request -> its :class:`_Row` (the task's options bound to its size)."""
        # 413 from the header's size, before any pixel is decoded
        budget = ((lambda w, h: plan_maps(opts, (w, h), self.limits, work.left))
                  if opts.explain or opts.answer_maps else None)
        img = self._decode(data, budget)
        plan = plan_maps(opts, img.size, self.limits, work.left)
        geometry = Geometry(img.size, tuple(self.spec.input_size),  # type: ignore[arg-type]
                            plan.render_size)
        opts = replace(opts, task=self.task.bind(opts.task, geometry))
        work.left -= plan.work
        with one_thread(torch.device("cpu")):  # a few small ops: see one_thread
            x = preprocess(img, self.spec.input_size, self.spec.mean, self.spec.std,
                           interpolation=self.spec.interpolation)
        keep = None
        if opts.explain and "overlay" in opts.outputs:
            keep = img if not plan.scaled else img.resize(plan.render_size, Image.BILINEAR)
        del img
        return _Row(index, x, opts, plan, geometry, keep, part)

    def _decode(self, data: bytes,
                before_load: Optional[Callable[[int, int], None]] = None) -> Image.Image:
        """Image bytes -> RGB image; any decoder failure is this row's 400 (or 413).
        ``before_load``: see :func:`camserve.images.decode_image` (its RequestError passes)."""
        try:
            return decode_image(data, max_pixels=self.spec.max_pixels, formats=self.spec.formats,
                                before_load=before_load)
        except ImageError as exc:
            raise from_image_error(exc) from None
        except RequestError:
            raise
        except Exception as exc:  # a decoder bug on crafted data (MemoryError included)
            raise InvalidImage(f"not an image: the decoder failed ({type(exc).__name__}; "
                               f"{len(data)} bytes)") from None

    def _serve(self, requests: list[list[_Row]], stats: BatchStats) -> list[RowResult]:
        """Answer decoded requests (each its rows: its image, its companions) with one batched
        pass; should that pass fail, request by request. One answer per request, in order."""
        try:
            return self._run(requests, stats)
        except Exception:
            stats.failed_batches += 1
            if len(requests) == 1:
                return [internal_error("running a batch of 1 request")]
            log.warning("camserve: batched pass over %d requests failed; retrying one by one\n%s",
                        len(requests), safe_traceback())
        out = []
        for rows in requests:
            try:
                out.extend(self._run([rows], stats))
            except Exception:
                out.append(internal_error(f"running request {rows[0].index} alone"))
        return out

    def _forward(self, rows: list[_Row], stats: BatchStats) -> _Forward:
        """One forward over ``rows``: logits, and the CAMs of the rows that explain."""
        x = torch.stack([r.tensor for r in rows])
        x = x.pin_memory().to(self.device, non_blocking=True) if self.device.type == "cuda" \
            else x.to(self.device)
        explain = [j for j, r in enumerate(rows) if r.options.explain]
        if not explain:
            return self.backend.predict(x), None, explain
        t_cam = time.perf_counter()
        cams = batch_cams(self.backend, x, explain, [rows[j].options for j in explain],
                          [rows[j].geometry for j in explain])
        stats.cam_ms += (time.perf_counter() - t_cam) * 1000.0
        return cams.output, cams, explain

    def _run(self, requests: list[list[_Row]], stats: BatchStats) -> list[RowResult]:
        """One batched pass over the requests' rows; rendering failures stay with their request."""
        rows = [row for req in requests for row in req]
        output, cams, explain = self._forward(rows, stats)
        output = self.task.to_host(output)
        views: dict[int, _CamView] = {}
        if cams is not None:
            views = {j: _CamView(cams, p) for p, j in enumerate(explain)}
            stats.explained_rows += len(explain)
            stats.maps += sum(cams.targets.count)
        bounds: list[range] = []
        for req in requests:
            start = bounds[-1].stop if bounds else 0
            bounds.append(range(start, start + len(req)))

        def answer(k: int) -> RowResult:
            req, at = requests[k], bounds[k]
            try:
                return self._answer(req, [self.task.row(output, j) for j in at],
                                    [views.get(j) for j in at])
            except RequestError as exc:
                return RowResult.error(exc)
            except Exception:
                return internal_error(f"rendering request {req[0].index}")

        if self.threads <= 1 or len(views) < 2:
            return [answer(k) for k in range(len(requests))]
        # requests render independently (PNG encoding, the bbox's labelling and image resizing
        # release the GIL): on the worker's threads, answers in request order
        with ThreadPoolExecutor(min(self.threads, len(requests)),
                                thread_name_prefix="camserve-render") as pool:
            return list(pool.map(answer, range(len(requests))))

    def _answer(self, req: list[_Row], out_rows: list[Any],
                views: list[Optional["_CamView"]]) -> RowResult:
        """One request's 200 answer (the task's predictions, and explanations when it explains,
        its companion images' after its own), size-checked."""
        row = req[0]
        explanations: Optional[list[dict[str, Any]]] = None
        for member, out_row, view in zip(req, out_rows, views):
            if view is None:
                continue
            shown = self.task.shown(out_row, view.targets, view.slot, member.geometry)
            records = render_row(member.image, member.options, view.cams, shown, view.layer,
                                 plan=member.plan, max_bytes=self.limits.max_response_size)
            explanations = (explanations or []) + [explanation_json(e, member.plan)
                                                   for e in records]
        body = self.task.answer(self.task.join(out_rows[0], out_rows[1:]), row.options.task,
                                row.options.topk, row.geometry, explanations)
        return self._sized(RowResult(200, body), row.options)

    def _sized(self, result: RowResult, options: RequestOptions) -> RowResult:
        """``result``, or 413 ``ResponseTooLarge`` when its JSON exceeds the response limit."""
        limit = self.limits.max_response_size
        if len(result.text) <= limit:
            return result
        err = ResponseTooLarge(len(result.text), limit, drop_hint(options))
        log.info("camserve: answer refused: %s", err.message)
        return RowResult.error(err)

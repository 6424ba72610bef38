"""The KServe model: KServe's stage hooks over the serving core, one plain class.

:class:`CamModel` is a ``kserve.Model`` whose hooks each do one stage of a request, so KServe's
per-stage latency histograms (``request_preprocess_seconds``, ``request_predict_seconds`` /
``request_explain_seconds``, ``request_postprocess_seconds``) time what their names say:

* **preprocess**: the body -> the core's request records (:mod:`camserve.kserve.wire`) -> options,
  work budget and decoded, resized images (:meth:`camserve.serving.CamService.prepare`), on a pool
  of ``prepare_threads`` threads; a bad image or option already has its answer here. The work
  that prepared requests hold until answered is bounded (:class:`~camserve.kserve.batcher.WorkGate`,
  twice ``max_batch_work``): a request waits for room before it is prepared;
* **predict** / **explain**: the batched model pass: the prepared request joins those of concurrent
  requests (:class:`camserve.kserve.batcher.MicroBatcher`) in one
  :meth:`camserve.serving.CamService.run_prepared` call on the model thread (forward, gradients,
  CAMs and the rendering of each row's maps, which the core does inside its batch call);
* **postprocess**: the answer: v1 ``{"predictions": [...]}`` or the v2 response with its status.

``:explain`` explains every image; on ``:predict`` and v2 the ``explain`` option decides. Metrics
beside KServe's: ``camserve_kserve_rows_total`` (by outcome) and ``camserve_kserve_batch_rows``
(rows per model call). The device: ``CAMSERVE_DEVICE`` when set, else CUDA when present. The
manual: ``docs/kserve.md``.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from . import import_kserve

import_kserve()

from kserve import Model  # noqa: E402
from kserve.model import InferenceVerb  # noqa: E402
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse  # noqa: E402
from prometheus_client import REGISTRY, Counter, Histogram  # noqa: E402

from ..backends import worker_threads  # noqa: E402
from ..errors import RequestError  # noqa: E402
from ..explain import MEGA  # noqa: E402
from ..serving import CamService, Prepared, RowResult  # noqa: E402
from .batcher import DEFAULT_PREPARE_THREADS, MicroBatcher, WorkGate  # noqa: E402
from .server import (AnswerError, V2Body, grpc_invalid_input, install, kserve_app,  # noqa: E402
                     v2_rest_body)
from .wire import (DEFAULT_MAX_INSTANCES, RESULT_OUTPUT, WireRequest, overall_status,  # noqa: E402
                   read_infer_request, read_v1, read_v2)

log = logging.getLogger(__name__)


def default_device() -> str:
    """``CAMSERVE_DEVICE`` when set, else ``cuda`` when CUDA is present, else ``cpu``."""
    import torch

    return os.environ.get("CAMSERVE_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def _metrics() -> tuple[Any, Any]:
    """camserve's two metrics, registered once per process."""
    names = getattr(REGISTRY, "_names_to_collectors", {})
    if "camserve_kserve_rows_total" in names:
        return names["camserve_kserve_rows_total"], names["camserve_kserve_batch_rows"]
    rows = Counter("camserve_kserve_rows", "Images answered by the camserve KServe predictor",
                   ["model_name", "outcome"])
    batch = Histogram("camserve_kserve_batch_rows", "Rows per model call (after batching)",
                      ["model_name"], buckets=(1, 2, 4, 8, 16, 32, 64, 128))
    return rows, batch


@dataclass
class Held:
    """The work (pixels) a request holds of the model's :class:`WorkGate`."""

    work: int = 0


@dataclass(frozen=True)
class Incoming:
    """A request body as the preprocess stage gets it, with whether its route explains and, when
    it came through KServe's call, what it holds of the work gate (given back when answered)."""

    body: Any
    explain: bool = False
    held: Optional[Held] = None


@dataclass
class Staged:
    """A request after preprocess: what it asked (its :class:`WireRequest`) and its prepared
    rows (decoded, or answered already)."""

    wire: WireRequest
    prepared: Prepared


@dataclass
class Answered:
    """A request after its model pass: one answer per image, in order."""

    wire: WireRequest
    results: list[RowResult]


class CamModel(Model):
    """A KServe model answering v1 predict/explain and v2 infer with camserve's core.

    Args:
        name: the model's name in the routes.
        model_dir: the model folder (``model-config.yaml``, weights, labels).
        device: torch device (default: :func:`default_device`).
        max_batch_size: rows of concurrent requests gathered into one model call.
        max_batch_delay_ms: how long a batch waits for more requests after its first.
        max_instances: images allowed in one request.
        prepare_threads: threads decoding and preparing requests (beside the model thread).
        backend: ``torch`` or ``onnxruntime`` (default: the folder's ``handler.backend``).
        workers: server processes, each with its own copy of the model: each gets its share of
            the cores for torch's threads and the onnxruntime sessions'
            (:func:`camserve.backends.worker_threads`).
        ui: serve the viewer page ``GET /`` (:mod:`camserve.kserve.viewer`).
    """

    def __init__(self, name: str, model_dir: str | Path, device: Optional[str] = None,
                 max_batch_size: int = 8, max_batch_delay_ms: float = 5.0,
                 max_instances: int = DEFAULT_MAX_INSTANCES,
                 prepare_threads: int = DEFAULT_PREPARE_THREADS,
                 backend: Optional[str] = None, workers: int = 1, ui: bool = False) -> None:
        super().__init__(name)
        self.ui = ui
        self.model_dir = Path(model_dir)
        self.device = device or default_device()
        self.backend = backend
        self.threads = worker_threads(workers)
        self.max_instances = max_instances
        self.max_batch_size = max_batch_size
        self.max_batch_delay_ms = max_batch_delay_ms
        self.prepare_threads = prepare_threads
        self.service: Optional[CamService] = None
        self._start_local()

    def _start_local(self) -> None:
        """What each process builds for itself (not pickled)."""
        self._rows_metric, self._batch_metric = _metrics()
        self.batcher: MicroBatcher[Prepared, list[RowResult]] = MicroBatcher(
            self._run, self.max_batch_size, self.max_batch_delay_ms / 1000.0)
        self._prepare_pool = concurrent.futures.ThreadPoolExecutor(
            self.prepare_threads, thread_name_prefix="camserve-prepare")
        self.gate = WorkGate(0)  # sized when the model loads
        self._load_lock = threading.Lock()
        self._load_error: Optional[BaseException] = None

    # -- loading ---------------------------------------------------------------------------------
    def load(self) -> bool:
        """Load the model folder (once; a second call waits for a load under way)."""
        install(kserve_app(), self)
        with self._load_lock:
            if self.service is None:
                import torch

                torch.set_num_threads(self.threads)  # this process's share, not every core
                service = CamService.from_model_dir(self.model_dir, device=self.device,
                                                    overrides={"backend": self.backend},
                                                    threads=self.threads)
                self.batcher.max_work = service.limits.max_batch_work * MEGA
                # prepared requests waiting for the model hold at most about one more batch
                self.gate.capacity = 2 * self.batcher.max_work
                self.service = service
        self.ready = True
        return self.ready

    def _load_in_background(self) -> None:
        try:
            self.load()
        except BaseException as exc:  # reported by the first request, and logged here
            self._load_error = exc
            log.exception("camserve: loading %s failed", self.model_dir)

    def _loaded(self) -> CamService:
        if self.service is None:
            if self._load_error is not None:
                raise RuntimeError(f"model {self.name!r} failed to load: "
                                   f"{self._load_error}") from None
            self.load()  # waits for a load under way
        assert self.service is not None  # load() set it or raised
        return self.service

    # KServe's multi-process REST server (--workers > 1) spawns processes and pickles the
    # registered models: each process loads its own copy of the model.
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for key in ("service", "batcher", "gate", "_rows_metric", "_batch_metric",
                    "_prepare_pool", "_load_lock", "_load_error"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Unpickling must be quick: KServe kills a process that does not answer its 5 s
        # liveness ping, and the ping thread starts only after unpickling. The model loads
        # on a thread; a request that comes first waits for it.
        self.__dict__.update(state)
        self.service = None
        self._start_local()
        install(kserve_app(), self)
        threading.Thread(target=self._load_in_background, name="camserve-load",
                         daemon=True).start()

    # -- KServe's call and its stages ------------------------------------------------------------
    async def __call__(self, body: Any, headers: Optional[dict[str, str]] = None,
                       verb: InferenceVerb = InferenceVerb.PREDICT) -> Any:
        # KServe 0.21's Model.__call__ tells only predict/explain which route was called; the
        # preprocess stage needs it (an image to explain is budgeted, and kept for an overlay),
        # so it travels with the body, and so does the work the request holds, given back here
        # however the call ends.
        held = Held()
        try:
            return await super().__call__(Incoming(body, verb is InferenceVerb.EXPLAIN, held),
                                          headers, verb)
        finally:
            self.gate.give_back(held.work)
            held.work = 0

    def validate(self, payload: Any) -> Any:
        # KServe 0.21 checks the preprocessed payload as a v1/v2 body; camserve's preprocess has
        # read and checked the body already (the payload is a Staged request).
        return payload

    async def preprocess(self, payload: Any, headers: Optional[dict[str, str]] = None) -> Staged:
        """The body -> records -> prepared rows (options, budget, decoded images); a request
        coming through KServe's call first reserves the most work it may take of the gate, and
        keeps what it took."""
        incoming = payload if isinstance(payload, Incoming) else Incoming(payload)
        loop = asyncio.get_running_loop()
        held = incoming.held
        if held is not None:
            service = self.service or await loop.run_in_executor(self._prepare_pool, self._loaded)
            most = service.limits.max_batch_work * MEGA
            await self.gate.reserve(most)
            held.work += most
        staged = await loop.run_in_executor(self._prepare_pool, self._prepare, incoming)
        if held is not None:
            self.gate.give_back(held.work - staged.prepared.work)
            held.work = staged.prepared.work
        return staged

    def _prepare(self, incoming: Incoming) -> Staged:
        wire = self._read(incoming.body)
        prepared = self._loaded().prepare(list(wire.records),
                                          [incoming.explain] * len(wire.records))
        return Staged(wire, prepared)

    def _read(self, body: Any) -> WireRequest:
        """The request's records; a request with nothing to answer is answered here."""
        try:
            if isinstance(body, V2Body):
                return read_v2(body.data, self.max_instances)
            if isinstance(body, InferRequest):
                return read_infer_request(body, self.max_instances)
            return read_v1(body, self.max_instances)
        except RequestError as exc:
            if isinstance(body, InferRequest) and body.from_grpc:
                raise grpc_invalid_input(exc.to_body()) from None
            raise AnswerError.of(exc) from None

    async def predict(self, payload: Staged, headers: Optional[dict[str, str]] = None,
                      response_headers: Optional[dict[str, str]] = None) -> Answered:
        """The batched model pass over this request's rows and those of concurrent requests."""
        prepared = payload.prepared
        results = await self.batcher.submit(prepared, rows=len(prepared), work=prepared.work)
        return Answered(payload.wire, results)

    async def explain(self, payload: Staged, headers: Optional[dict[str, str]] = None) -> Answered:
        """As :meth:`predict` (preprocess already made every image one to explain)."""
        return await self.predict(payload, headers)

    def _run(self, parts: list[Prepared]) -> list[list[RowResult]]:
        """One model call over the prepared requests of a batch; their answers, split back."""
        outcome = self._loaded().run_prepared(Prepared.join(parts))
        results = outcome.results
        self._batch_metric.labels(model_name=self.name).observe(outcome.stats.rows)
        errors = outcome.stats.error_rows
        self._rows_metric.labels(model_name=self.name, outcome="ok").inc(len(results) - errors)
        if errors:
            self._rows_metric.labels(model_name=self.name, outcome="error").inc(errors)
        split, at = [], 0
        for part in parts:
            split.append(results[at:at + len(part)])
            at += len(part)
        return split

    async def postprocess(self, result: Answered, headers: Optional[dict[str, str]] = None,
                          response_headers: Optional[dict[str, str]] = None) -> Any:
        """The answer body; a request where every image failed goes out with the first failed
        image's code (over gRPC, which has no per-call status, it succeeds)."""
        results, wire = result.results, result.wire
        status = overall_status([r.status for r in results])
        if wire.protocol == "v1":
            body: Any = {"predictions": [r.body for r in results]}
        else:
            out = InferOutput(name=RESULT_OUTPUT, shape=[len(results)], datatype="BYTES",
                              data=[r.to_json() for r in results])
            response = InferResponse(response_id=wire.request_id or str(uuid.uuid4()),
                                     model_name=self.name, infer_outputs=[out],
                                     from_grpc=wire.grpc)
            if wire.grpc:
                return response
            body = v2_rest_body(response)
        if status != 200:
            raise AnswerError(status, body)
        return body

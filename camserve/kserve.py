"""camserve on KServe: a native predictor (a ``kserve.Model``) over the same serving core.

``python -m camserve.kserve MODEL_DIR`` (console script ``camserve-kserve``) serves one model
folder with KServe's ``ModelServer`` (``pip install 'camserve[kserve]'``, KServe 0.21.0):

* v1 ``POST /v1/models/NAME:predict`` and ``POST /v1/models/NAME:explain`` with
  ``{"instances": [{"data": "<base64>", ...options}, ...]}``; the answer is
  ``{"predictions": [one element per instance, in order]}``, each element exactly the JSON the
  TorchServe handler returns for that image, or the handler's error body
  ``{"code", "type", "message"}`` for an instance that failed. ``:explain`` explains every instance.
* v2 ``POST /v2/models/NAME/infer`` with one BYTES input named ``data`` (shape [N], base64 text
  over REST, raw bytes over gRPC) and the options as request ``parameters`` (``explain`` among
  them; KServe has no v2 explain route). Parameters apply to every element. The answer has one
  BYTES output named ``result`` of shape [N], each element the JSON text of that image's answer
  (or its error body).
* Status: 200 when at least one instance succeeded, else the first failed instance's code (the
  body keeps its shape). A request that has no instances to answer at all (no ``instances`` list,
  no ``data`` input) gets the error body alone with its code. gRPC has no per-call HTTP status:
  a v2 call over gRPC succeeds with every element's answer or error body, and a request with
  nothing to answer fails with INVALID_ARGUMENT (the error body as details).
* Readiness and liveness are KServe's (``GET /v1/models/NAME``, ``/v2/health/ready``,
  ``/v2/health/live``, ``/v2/models/NAME/ready``); Prometheus metrics on ``GET /metrics``:
  KServe's per-stage latency histograms plus ``camserve_kserve_rows_total`` (by outcome) and
  ``camserve_kserve_batch_rows`` (rows per model call).

Every instance is handed to the core as the KServe body of one image — ``{"instances": [item]}``
or ``{"inputs": [<data element>], "parameters": ...}`` — which is what the TorchServe handler
parses when the same body reaches it, so options, errors and explanation JSON are the core's own;
this module only splits requests into instances and joins the answers.

KServe 0.21's Python server has no request batching of its own (its ``batcher`` is the
InferenceService's agent sidecar, v1 only). Concurrent requests are therefore gathered here:
instances arriving within ``--max-batch-delay`` ms, up to ``--max-batch-size`` rows, go through
one ``handle_batch`` call (one forward pass) on one model thread.

The device comes from the environment: ``CAMSERVE_DEVICE`` when set, else CUDA when present.

Example::

    >>> from camserve.kserve import rows_from_v1, overall_status
    >>> rows_from_v1({"instances": [{"data": "aGk=", "topk": 2}]})
    [{'body': {'instances': [{'data': 'aGk=', 'topk': 2}]}}]
    >>> overall_status([400, 200]), overall_status([422, 413])
    (200, 422)
"""
from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import logging
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
import threading
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

from .parsing import short_repr

if TYPE_CHECKING:  # torch and the core load when the model does (see CamModel.__setstate__)
    from .serving import BatchStats, CamService, RowResult

log = logging.getLogger(__name__)

DEFAULT_MAX_INSTANCES = 64
DATA_INPUT = "data"
RESULT_OUTPUT = "result"


# -- the one door into the core ---------------------------------------------------------------------
def _build_service(model_dir: Path, device: str) -> CamService:
    """The serving core for a model folder (its ``model-config.yaml`` ``handler:`` block)."""
    from .serving import CamService

    return CamService.from_model_dir(model_dir, device=device)


def _run_rows(service: CamService, rows: Sequence[Any],
              explain_flags: Sequence[bool]) -> tuple[list[RowResult], BatchStats]:
    """Answer ``rows`` (TorchServe-style request rows) in one core call; one result per row."""
    out = service.handle_batch(rows, list(explain_flags))
    return out.results, out.stats


# -- requests -> rows, answers -> bodies -------------------------------------------------------------
class AnswerError(Exception):
    """A finished answer that goes out with a non-200 ``status`` (the JSON ``body`` as it is)."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body


def _request_error(message: str, code: int = 400, type: str = "InvalidRequest") -> AnswerError:
    from .errors import RequestError

    return AnswerError(code, RequestError(message, code, type).to_body())



def _check_count(n: int, limit: int, what: str) -> None:
    if n == 0:
        raise _request_error(f"invalid value for {what}: empty (send at least one image)")
    if n > limit:
        raise _request_error(f"invalid value for {what}: {n} images in one request (at most "
                             f"{limit}; split the request)", 413, "WorkTooLarge")


def rows_from_v1(payload: Any, max_instances: int = DEFAULT_MAX_INSTANCES) -> list[dict[str, Any]]:
    """One core row per v1 instance: the KServe v1 body of that instance alone.

    ``payload`` is the decoded JSON object (or its bytes when the request was not sent as
    ``application/json``). Raises :class:`AnswerError` (400/413) when there is no list of
    instances to answer.
    """
    if isinstance(payload, (bytes, bytearray, str)):
        try:
            payload = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _request_error(f"invalid JSON body: {exc}") from None
    if not isinstance(payload, Mapping) or "instances" not in payload:
        keys = ", ".join(map(str, payload))[:100] if isinstance(payload, Mapping) else \
            type(payload).__name__
        raise _request_error(f"missing field 'instances' (a list of {{\"data\": \"<base64>\", "
                             f"...options}} objects); sent: {keys or 'none'}")
    instances = payload["instances"]
    if not isinstance(instances, list):
        raise _request_error(f"invalid value for instances: expected a list, got "
                             f"{type(instances).__name__}")
    _check_count(len(instances), max_instances, "instances")
    return [{"body": {"instances": [item]}} for item in instances]


def _v2_parameters(params: Any) -> dict[str, Any]:
    if params is None:
        return {}
    if isinstance(params, Mapping):
        return {str(k): _grpc_value(v) for k, v in params.items()}
    raise _request_error(f"invalid value for parameters: expected an object, got "
                         f"{type(params).__name__}", 422, "InvalidOption")


def _grpc_value(value: Any) -> Any:
    """A gRPC ``InferParameter`` as its plain value (REST values pass through)."""
    field = getattr(value, "WhichOneof", None)
    if field is not None:
        which = value.WhichOneof("parameter_choice")
        return getattr(value, which) if which else None
    return value


def rows_from_v2(request: Any, max_instances: int = DEFAULT_MAX_INSTANCES) -> list[dict[str, Any]]:
    """One core row per element of the BYTES input ``data`` of a KServe ``InferRequest``, each
    the v2 body of that element alone with the request's ``parameters``."""
    inputs = list(request.inputs or [])
    names = [i.name for i in inputs]
    if names != [DATA_INPUT]:
        raise _request_error(f"invalid value for inputs: expected exactly one input named "
                             f"'{DATA_INPUT}' (BYTES, one base64 image per element), got "
                             f"{short_repr(names)}")
    inp = inputs[0]
    if inp.datatype != "BYTES":
        raise _request_error(f"invalid value for inputs[0].datatype: {short_repr(inp.datatype)} "
                             f"(allowed: BYTES)")
    data = inp.data
    if hasattr(data, "tolist"):
        data = data.tolist()
    if not isinstance(data, list):
        raise _request_error(f"invalid value for inputs[0].data: expected a list, got "
                             f"{type(data).__name__}")
    if data and isinstance(data[0], list):  # shape [N, 1] sent nested
        data = [x for part in data for x in (part if isinstance(part, list) else [part])]
    _check_count(len(data), max_instances, "inputs[0].data")
    params = _v2_parameters(request.parameters)
    return [{"body": {"inputs": [{"name": DATA_INPUT, "datatype": "BYTES", "data": [item]}],
                      "parameters": params}} for item in data]


def overall_status(statuses: Sequence[int]) -> int:
    """200 when any instance succeeded, else the first failed instance's code."""
    if not statuses or any(s == 200 for s in statuses):
        return 200
    return statuses[0]


# -- batching across concurrent requests ---------------------------------------------------------------
@dataclass
class _Job:
    rows: list[Any]
    flags: list[bool]
    future: "asyncio.Future[list[RowResult]]"


class MicroBatcher:
    """Gathers the rows of concurrent requests into one ``run(rows, flags)`` call.

    A batch closes when it holds ``max_rows`` rows or ``max_delay_s`` after its first request
    arrived; one request is never split. ``run`` executes on a single worker thread (the model is
    used by one thread at a time).
    """

    def __init__(self, run: Callable[[list[Any], list[bool]], list[RowResult]], max_rows: int,
                 max_delay_s: float) -> None:
        if max_rows < 1:
            raise ValueError(f"invalid value for max_rows: {max_rows} (at least 1)")
        self.run = run
        self.max_rows = max_rows
        self.max_delay_s = max(0.0, max_delay_s)
        self._queue: Optional[asyncio.Queue[_Job]] = None
        self._task: Optional[asyncio.Task[None]] = None
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None

    async def submit(self, rows: list[Any], flags: list[bool]) -> list[RowResult]:
        """The results of ``rows``, in order, once their batch has run."""
        loop = asyncio.get_running_loop()
        if self._queue is None or self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._executor = self._executor or concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="camserve-model")
            self._task = loop.create_task(self._loop())
        job = _Job(rows, flags, loop.create_future())
        await self._queue.put(job)
        return await job.future

    async def _collect(self, queue: "asyncio.Queue[_Job]") -> list[_Job]:
        loop = asyncio.get_running_loop()
        jobs = [await queue.get()]
        n = len(jobs[0].rows)
        deadline = loop.time() + self.max_delay_s
        while n < self.max_rows:
            if not queue.empty():
                job = queue.get_nowait()
            else:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    job = await asyncio.wait_for(queue.get(), left)
                except asyncio.TimeoutError:
                    break
            jobs.append(job)
            n += len(job.rows)
        return jobs

    async def _loop(self) -> None:
        assert self._queue is not None
        queue = self._queue
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect(queue)
            rows = [r for j in jobs for r in j.rows]
            flags = [f for j in jobs for f in j.flags]
            try:
                results = await loop.run_in_executor(self._executor, self.run, rows, flags)
            except Exception as exc:  # an internal error: every waiting request learns of it
                log.exception("camserve: batch of %d rows failed", len(rows))
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(exc)
                continue
            at = 0
            for j in jobs:
                if not j.future.done():
                    j.future.set_result(results[at:at + len(j.rows)])
                at += len(j.rows)


# -- the KServe model ----------------------------------------------------------------------------------
def default_device() -> str:
    """``CAMSERVE_DEVICE`` when set, else ``cuda`` when CUDA is present, else ``cpu``."""
    import torch

    return os.environ.get("CAMSERVE_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def _metrics() -> tuple[Any, Any]:
    from prometheus_client import REGISTRY, Counter, Histogram

    names = getattr(REGISTRY, "_names_to_collectors", {})
    if "camserve_kserve_rows_total" in names:
        return names["camserve_kserve_rows_total"], names["camserve_kserve_batch_rows"]
    rows = Counter("camserve_kserve_rows", "Images answered by the camserve KServe predictor",
                   ["model_name", "outcome"])
    batch = Histogram("camserve_kserve_batch_rows", "Rows per model call (after batching)",
                      ["model_name"], buckets=(1, 2, 4, 8, 16, 32, 64, 128))
    return rows, batch


def _import_kserve() -> None:
    """Import kserve with an empty command line: ``kserve.model_server`` parses ``sys.argv`` when
    imported, and ours is not meant for it."""
    if "kserve.model_server" in sys.modules:
        return
    saved, sys.argv = sys.argv, sys.argv[:1]
    try:
        import kserve  # noqa: F401
    finally:
        sys.argv = saved


def _make_model_class() -> type:
    if "CamModel" in globals():
        return globals()["CamModel"]
    _import_kserve()
    from kserve import Model
    from kserve.errors import InvalidInput
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
    from kserve.protocol.rest.v2_datamodels import InferenceResponse as InferenceResponse_

    class CamModel(Model):
        """A KServe model answering v1 predict/explain and v2 infer with camserve's core."""

        def __init__(self, name: str, model_dir: str | Path, device: Optional[str] = None,
                     max_batch_size: int = 8, max_batch_delay_ms: float = 5.0,
                     max_instances: int = DEFAULT_MAX_INSTANCES) -> None:
            super().__init__(name)
            self.model_dir = Path(model_dir)
            self.device = device or default_device()
            self.max_instances = max_instances
            self.max_batch_size = max_batch_size
            self.max_batch_delay_ms = max_batch_delay_ms
            self.service: Optional[CamService] = None
            self._start_local()

        def _start_local(self) -> None:
            self._rows_metric, self._batch_metric = _metrics()
            self.batcher = MicroBatcher(self._run, self.max_batch_size,
                                        self.max_batch_delay_ms / 1000.0)
            self._load_lock = threading.Lock()
            self._load_error: Optional[BaseException] = None

        def load(self) -> bool:
            _register_answer_handler()
            with self._load_lock:
                if self.service is None:
                    self.service = _build_service(self.model_dir, self.device)
            self.ready = True
            return self.ready

        def _load_in_background(self) -> None:
            try:
                self.load()
            except BaseException as exc:  # reported by the first request, and logged here
                self._load_error = exc
                log.exception("camserve: loading %s failed", self.model_dir)

        # KServe's multi-process REST server (--workers > 1) spawns processes and pickles the
        # registered models: each process loads its own copy of the model.
        def __getstate__(self) -> dict[str, Any]:
            state = self.__dict__.copy()
            for key in ("service", "batcher", "_rows_metric", "_batch_metric", "_load_lock",
                        "_load_error"):
                state.pop(key, None)
            return state

        def __setstate__(self, state: dict[str, Any]) -> None:
            # Unpickling must be quick: KServe kills a process that does not answer its 5 s
            # liveness ping, and the ping thread starts only after unpickling. The model loads
            # on a thread; a request that comes first waits for it.
            self.__dict__.update(state)
            self.service = None
            self._start_local()
            _register_answer_handler()
            threading.Thread(target=self._load_in_background, name="camserve-load",
                             daemon=True).start()

        def _run(self, rows: list[Any], flags: list[bool]) -> list[RowResult]:
            if self.service is None:
                if self._load_error is not None:
                    raise RuntimeError(f"model {self.name!r} failed to load: "
                                       f"{self._load_error}") from None
                self.load()  # waits for a load under way
            assert self.service is not None
            results, stats = _run_rows(self.service, rows, flags)
            self._batch_metric.labels(model_name=self.name).observe(stats.rows)
            ok = sum(1 for r in results if r.status == 200)
            self._rows_metric.labels(model_name=self.name, outcome="ok").inc(ok)
            if len(results) - ok:
                self._rows_metric.labels(model_name=self.name, outcome="error").inc(len(results) - ok)
            return results

        async def _answer(self, payload: Any, explain: bool) -> Any:
            grpc = isinstance(payload, InferRequest) and bool(payload.from_grpc)
            if isinstance(payload, InferRequest):  # v2, REST or gRPC
                try:
                    rows = rows_from_v2(payload, self.max_instances)
                except AnswerError as exc:
                    if grpc:  # gRPC status INVALID_ARGUMENT with the error body as details
                        raise InvalidInput(json.dumps(exc.body)) from None
                    raise
            else:
                rows = rows_from_v1(payload, self.max_instances)
            results = await self.batcher.submit(rows, [explain] * len(rows))
            status = overall_status([r.status for r in results])
            if isinstance(payload, InferRequest):
                out = InferOutput(name=RESULT_OUTPUT, shape=[len(results)], datatype="BYTES",
                                  data=[r.to_json() for r in results])
                response = InferResponse(response_id=payload.id or str(uuid.uuid4()),
                                         model_name=self.name, infer_outputs=[out],
                                         from_grpc=payload.from_grpc)
                if status != 200 and not grpc:  # KServe's own v2 JSON, with our status
                    # (gRPC has no per-call HTTP status: the call succeeds and every element
                    # carries its answer or error body)
                    body, _ = response.to_rest()
                    raise AnswerError(status, InferenceResponse_.model_validate(body).model_dump(
                        mode="json"))
                return response
            body = {"predictions": [r.body for r in results]}
            if status != 200:
                raise AnswerError(status, body)
            return body

        async def predict(self, payload: Any, headers: Optional[dict[str, str]] = None,
                          response_headers: Optional[dict[str, str]] = None) -> Any:
            return await self._answer(payload, explain=False)

        async def explain(self, payload: Any, headers: Optional[dict[str, str]] = None) -> Any:
            return await self._answer(payload, explain=True)

    CamModel.__module__ = __name__
    CamModel.__qualname__ = "CamModel"  # picklable by reference as camserve.kserve.CamModel
    globals()["CamModel"] = CamModel
    return CamModel


def __getattr__(name: str) -> Any:
    if name == "CamModel":  # built on first use: importing camserve.kserve needs no kserve
        return _make_model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- the server ----------------------------------------------------------------------------------------
async def _answer_error_handler(_request: Any, exc: AnswerError) -> Any:
    from fastapi.responses import JSONResponse

    return JSONResponse(status_code=exc.status, content=exc.body)


def _register_answer_handler() -> None:
    """Let KServe's FastAPI app send :class:`AnswerError` answers with their own status (in every
    server process: the app is per process)."""
    _import_kserve()
    from kserve import model_server as ms

    if AnswerError not in ms.app.exception_handlers:
        ms.app.add_exception_handler(AnswerError, _answer_error_handler)


def _loopback_grpc_server_class() -> type:
    """KServe's gRPC server listening on a chosen address (0.21 hard-codes ``[::]``)."""
    from concurrent import futures

    from grpc import aio
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
    from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
    from kserve.protocol.grpc.server import GRPCServer
    from kserve.protocol.grpc.servicer import InferenceServicer

    class AddressGRPCServer(GRPCServer):
        def __init__(self, host: str, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._host = host

        async def start(self, max_workers: int) -> None:  # as GRPCServer.start, with the address
            servicer = InferenceServicer(self._data_plane, self._model_repository_extension)
            self._server = aio.server(
                futures.ThreadPoolExecutor(max_workers=max_workers),
                interceptors=(LoggingInterceptor(), ExceptionToStatusInterceptor()),
                options=[("grpc.max_send_message_length",
                          self._kwargs.get("grpc_max_send_message_length")),
                         ("grpc.max_receive_message_length",
                          self._kwargs.get("grpc_max_receive_message_length"))])
            grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer,
                                                                                self._server)
            host = f"[{self._host}]" if ":" in self._host else self._host
            self._server.add_insecure_port(f"{host}:{self._port}")
            log.info("camserve: gRPC on %s:%s", host, self._port)
            await self._server.start()
            await self._server.wait_for_termination()

    return AddressGRPCServer


def _server_class() -> type:
    _import_kserve()
    from kserve import ModelServer
    from kserve import model_server as ms

    class AddressModelServer(ModelServer):
        """KServe's ModelServer bound to ``host`` (REST and gRPC) instead of all interfaces."""

        def __init__(self, host: str, grpc_port: int, **kwargs: Any) -> None:
            super().__init__(grpc_port=max(grpc_port, 0), enable_grpc=False, **kwargs)
            self.host = host
            self.want_grpc = grpc_port > 0

        async def _serve(self) -> None:
            rest = self._rest_server or self._rest_multiprocess_server._rest_server
            rest.config.host = self.host
            if self.want_grpc:
                self._grpc_server = _loopback_grpc_server_class()(
                    self.host, self.grpc_port, self.dataplane, self.model_repository_extension,
                    kwargs=vars(ms.args), grace_period=self.grace_period)
                self.servers.append(self._grpc_server.start(self.max_threads))
            log.info("camserve: REST on http://%s:%s", self.host, self.http_port)
            await asyncio.gather(*self.servers)

    return AddressModelServer


class LocalPredictor:
    """``python -m camserve.kserve`` as a child process on free loopback ports; a context manager
    (for tests and benchmarks). Waits for readiness; stops the process by its PID on exit."""

    def __init__(self, model_dir: str | Path, name: str = "shapes", args: Sequence[str] = (),
                 log_path: Optional[Path] = None, ready_timeout: float = 180.0,
                 env: Optional[Mapping[str, str]] = None) -> None:
        from .testing.torchserve import free_ports

        self.http_port, self.grpc_port = free_ports(2)
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.name = name
        self.cmd = [sys.executable, "-m", "camserve.kserve", str(model_dir), "--model-name", name,
                    "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port),
                    *args]
        self.log_path = log_path
        self.ready_timeout = ready_timeout
        self.env = {**os.environ, **(env or {})}
        self.proc: Optional[Any] = None

    def __enter__(self) -> "LocalPredictor":
        import subprocess
        import time
        import urllib.request

        out = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT,
                                         env=self.env)
        finally:
            if self.log_path:
                out.close()  # type: ignore[union-attr]
        deadline = time.monotonic() + self.ready_timeout
        while True:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"camserve.kserve exited with {self.proc.returncode} before "
                                   f"getting ready (log: {self.log_path})")
            try:
                with urllib.request.urlopen(f"{self.url}/v1/models/{self.name}", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"camserve.kserve not ready after {self.ready_timeout:.0f} s "
                                   f"(log: {self.log_path})")
            time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """SIGTERM to the PID, SIGKILL after 30 s."""
        import subprocess

        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self.proc = None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="camserve-kserve", description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path, help="model folder (model-config.yaml, weights, labels)")
    ap.add_argument("--model-name", default=None, help="name in the routes (default: folder name)")
    ap.add_argument("--host", default="127.0.0.1",
                    help="address to listen on, REST and gRPC (default 127.0.0.1; containers: 0.0.0.0)")
    ap.add_argument("--http-port", type=int, default=8080)
    ap.add_argument("--grpc-port", type=int, default=8081, help="0 turns gRPC off")
    ap.add_argument("--workers", type=int, default=1, help="REST server processes")
    ap.add_argument("--max-batch-size", type=int, default=8,
                    help="rows gathered from concurrent requests into one model call")
    ap.add_argument("--max-batch-delay", type=float, default=5.0,
                    help="ms to wait for more requests once one has arrived")
    ap.add_argument("--max-instances", type=int, default=DEFAULT_MAX_INSTANCES,
                    help="images allowed in one request")
    return ap


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Serve a model folder with KServe's ModelServer until stopped (SIGTERM/SIGINT)."""
    args = build_parser().parse_args(argv)
    if not (args.model_dir / "model-config.yaml").is_file():
        print(f"error: {str(args.model_dir)!r} is not a model folder (no model-config.yaml)",
              file=sys.stderr)
        return 2
    for flag in ("http_port", "grpc_port"):
        value = getattr(args, flag)
        if not 0 <= value <= 65535 or (flag == "http_port" and value == 0):
            print(f"error: invalid value for --{flag.replace('_', '-')}: {value}", file=sys.stderr)
            return 2
    name = args.model_name or args.model_dir.resolve().name
    model = _make_model_class()(name, args.model_dir, max_batch_size=args.max_batch_size,
                                max_batch_delay_ms=args.max_batch_delay,
                                max_instances=args.max_instances)
    model.load()
    server = _server_class()(args.host, args.grpc_port, http_port=args.http_port,
                             workers=args.workers)
    server.start([model])
    return 0


if __name__ == "__main__":
    sys.exit(main())

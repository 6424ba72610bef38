"""The KServe 0.21 internals camserve overrides, each for a stated reason, and :func:`serve`.

* **Bind address** (:class:`AddressModelServer`, :class:`AddressGRPCServer`): KServe 0.21's
  ``ModelServer`` binds REST to every interface and its ``GRPCServer.start`` hard-codes ``[::]``;
  camserve listens on ``--host`` (127.0.0.1 unless told otherwise) for both.
* **Its own v2 REST route** (:func:`install`): KServe 0.21 validates a v2 body against its pydantic
  ``InferenceRequest`` before any model code runs, so a bad ``parameters`` value is refused with
  FastAPI's 422 ``{"detail": ...}``, which echoes the whole body (images included), while the
  TorchServe handler answers the same body 400; and parameters must be scalars there, so options
  given as JSON lists (targets, boxes, ...) cannot pass. camserve's ``POST
  /v2/models/NAME/infer`` hands the body to the model as it came (:class:`V2Body`), read by
  :func:`camserve.kserve.wire.read_v2` in the model's preprocess stage; requests using KServe's
  binary data extension are still decoded by KServe (``InferRequest.from_bytes``).
* **Answers with their own status** (:class:`AnswerError`): KServe 0.21 answers a model's
  exception 500 (or 400 for its ``InvalidInput``, with its own body); camserve's answers keep
  their status and the handler's error body.
* In the model, being methods of ``kserve.Model`` (:class:`camserve.kserve.model.CamModel`):
  ``__call__`` hands the route's verb to ``preprocess`` (KServe 0.21 tells only predict/explain)
  and gives back the work a request held however the call ends; ``validate`` takes the
  preprocessed request as it is (KServe 0.21 checks it as a v1/v2 body).

Added beside KServe's routes, not overriding any: ``GET /v1/models/NAME/describe`` (what the
model serves and which options it takes, the record TorchServe's describe gives) and the viewer
page ``GET /`` with its files (:mod:`camserve.kserve.viewer`; it replaces KServe's ``/``
liveness answer, ``/v2/health/live`` stays; off with ``--no-ui``).

The model (:class:`camserve.kserve.model.CamModel`) calls :func:`install` when it loads, in
every server process (KServe's ``--workers`` processes each build their own app). Adding a route
is one more ``add_api_route`` in :func:`install`.
"""
from __future__ import annotations

import asyncio
import json
import logging
from concurrent import futures
from dataclasses import dataclass
from typing import Any, Callable

from . import import_kserve

import_kserve()

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, Response  # noqa: E402
from grpc import aio  # noqa: E402
from kserve import Model, ModelServer  # noqa: E402
from kserve import model_server as kserve_model_server  # noqa: E402
from kserve.constants.constants import INFERENCE_CONTENT_LENGTH_HEADER  # noqa: E402
from kserve.errors import InvalidInput, ModelNotReady  # noqa: E402
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc  # noqa: E402
from kserve.protocol.grpc.interceptors import (ExceptionToStatusInterceptor,  # noqa: E402
                                               LoggingInterceptor)
from kserve.protocol.grpc.server import GRPCServer  # noqa: E402
from kserve.protocol.grpc.servicer import InferenceServicer  # noqa: E402
from kserve.protocol.infer_type import InferRequest, InferResponse  # noqa: E402
from kserve.protocol.rest.v2_datamodels import InferenceResponse  # noqa: E402

from ..errors import RequestError  # noqa: E402
from ..parsing import parse_int  # noqa: E402

log = logging.getLogger(__name__)


class AnswerError(Exception):
    """A finished answer that goes out with a non-200 ``status`` (the JSON ``body`` as it is)."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status
        self.body = body

    @classmethod
    def of(cls, exc: RequestError) -> "AnswerError":
        """A request error as its answer: its code, the handler's error body."""
        return cls(exc.code, exc.to_body())


@dataclass(frozen=True)
class V2Body:
    """A v2 REST request body as received (JSON bytes, not yet read)."""

    data: bytes


def v2_rest_body(response: InferResponse) -> dict[str, Any]:
    """A v2 response as KServe's REST route writes it (its pydantic ``InferenceResponse``)."""
    body, _ = response.to_rest()
    return InferenceResponse.model_validate(body).model_dump(mode="json")


async def _answer_error_handler(_request: Request, exc: AnswerError) -> Response:
    return JSONResponse(status_code=exc.status, content=exc.body)


def _v2_infer_route(model: Model) -> Callable[[Request], Any]:
    async def infer(request: Request) -> Response:
        if not model.ready:
            raise ModelNotReady(model.name)
        body = await request.body()
        headers = dict(request.headers)
        length = headers.get(INFERENCE_CONTENT_LENGTH_HEADER)
        payload: Any = V2Body(body)
        if length is not None:  # KServe's binary data extension: decoded as KServe does
            n = parse_int(length)
            if n is None or not 0 <= n <= len(body):
                raise AnswerError.of(RequestError(
                    f"invalid value for header {INFERENCE_CONTENT_LENGTH_HEADER}: expected the "
                    f"length of the JSON part (0..{len(body)})"))
            try:
                payload = InferRequest.from_bytes(body, n, model.name)
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
                raise AnswerError.of(RequestError(
                    f"invalid binary data request: {type(exc).__name__} while reading it (send "
                    f"{{\"inputs\": [...]}} with each input's name, shape, datatype and data "
                    f"or parameters.binary_data_size)")) from None
        response, _ = await model(payload, headers=headers)
        return JSONResponse(response)

    return infer


def _describe_route(model: Model) -> Callable[[], Any]:
    async def describe() -> Response:
        if not model.ready or getattr(model, "service", None) is None:
            raise ModelNotReady(model.name)
        return JSONResponse(model.service.describe())

    return describe


def install(app: FastAPI, model: Model) -> None:
    """camserve's handler and routes on KServe's app (once per process and model): answers with
    their own status, ``POST /v2/models/NAME/infer`` ahead of KServe's route, ``GET
    /v1/models/NAME/describe`` (the TorchServe handler's describe record), and the viewer page
    ``GET /`` unless the model's ``ui`` is off (:mod:`camserve.kserve.viewer`)."""
    if AnswerError not in app.exception_handlers:
        app.add_exception_handler(AnswerError, _answer_error_handler)
    if getattr(model, "ui", False):
        from .viewer import install_viewer

        install_viewer(app, model.name)
    path = f"/v2/models/{model.name}/infer"
    if any(getattr(r, "path", None) == path for r in app.router.routes):
        return
    app.add_api_route(path, _v2_infer_route(model), methods=["POST"])
    app.router.routes.insert(0, app.router.routes.pop())  # matched before KServe's own routes
    app.add_api_route(f"/v1/models/{model.name}/describe", _describe_route(model), methods=["GET"])


def kserve_app() -> FastAPI:
    """The FastAPI app KServe 0.21 serves in this process (``kserve.model_server.app``)."""
    return kserve_model_server.app


def grpc_invalid_input(body: Any) -> InvalidInput:
    """A request with nothing to answer, over gRPC: ``INVALID_ARGUMENT`` with the error body as
    its details (gRPC has no per-call HTTP status)."""
    return InvalidInput(json.dumps(body))


class AddressGRPCServer(GRPCServer):
    """KServe's gRPC server listening on ``host`` (KServe 0.21's ``start`` hard-codes ``[::]``)."""

    def __init__(self, host: str, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._host = host

    async def start(self, max_workers: int) -> None:
        """As KServe 0.21's ``GRPCServer.start``, with the address."""
        servicer = InferenceServicer(self._data_plane, self._model_repository_extension)
        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(LoggingInterceptor(), ExceptionToStatusInterceptor()),
            options=[("grpc.max_send_message_length",
                      self._kwargs.get("grpc_max_send_message_length")),
                     ("grpc.max_receive_message_length",
                      self._kwargs.get("grpc_max_receive_message_length"))])
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
        host = f"[{self._host}]" if ":" in self._host else self._host
        self._server.add_insecure_port(f"{host}:{self._port}")
        log.info("camserve: gRPC on %s:%s", host, self._port)
        await self._server.start()
        await self._server.wait_for_termination()


class AddressModelServer(ModelServer):
    """KServe's ModelServer bound to ``host`` (REST and gRPC) instead of all interfaces; gRPC off
    when ``grpc_port`` is 0."""

    def __init__(self, host: str, grpc_port: int, **kwargs: Any) -> None:
        super().__init__(grpc_port=max(grpc_port, 0), enable_grpc=False, **kwargs)
        self.host = host
        self.want_grpc = grpc_port > 0

    async def _serve(self) -> None:
        """As KServe 0.21's ``ModelServer._serve``, with the address on both servers."""
        rest = self._rest_server or self._rest_multiprocess_server._rest_server
        rest.config.host = self.host
        if self.want_grpc:
            self._grpc_server = AddressGRPCServer(
                self.host, self.grpc_port, self.dataplane, self.model_repository_extension,
                kwargs=vars(kserve_model_server.args), grace_period=self.grace_period)
            self.servers.append(self._grpc_server.start(self.max_threads))
        log.info("camserve: REST on http://%s:%s", self.host, self.http_port)
        await asyncio.gather(*self.servers)


def serve(model: Model, *, host: str, http_port: int, grpc_port: int, workers: int) -> None:
    """Serve ``model`` (loaded) until stopped (SIGTERM/SIGINT)."""
    server = AddressModelServer(host, grpc_port, http_port=http_port, workers=workers)
    server.start([model])

"""TorchServe handler: predictions with Grad-CAM explanations, a thin adapter over camserve.

The archive's ``model-config.yaml`` carries a ``handler:`` block (see :mod:`camserve.models`); the
model file and the serialized state_dict come from the archive (the serialized file is passed to
:func:`camserve.models.load_model_dir` as its ``weights=`` override). All request parsing, batching
and rendering lives in :class:`camserve.serving.CamService`.

A plain class with ``initialize`` and ``handle`` (all TorchServe needs): it does not inherit
``ts.torch_handler.base_handler.BaseHandler``, whose import switches the whole worker process to
TF32 matmuls (``torch.set_float32_matmul_precision("high")``) on Ampere and newer GPUs. TorchServe
0.12's loader requires exactly one class in this module.

The worker's threads are its share of the cores (:func:`camserve.backends.worker_threads` over
the model config's ``maxWorkers``/``minWorkers``, else TorchServe's default of one worker per
core): torch's intra-op threads, and each onnxruntime session's.

Per request (per row of a batch): ``/explanations`` (and the KServe explain routes, which set the
``explain: True`` request header) or the option ``explain=true`` explain; other rows only predict.
Every row gets its own status and JSON body; a bad row never changes its batch-mates' answers nor
the number of answers.

The model description (``GET /models/NAME?customized=true`` on the management API) reaches the
handler as a batch of exactly one row with no parameters and the header ``describe: True`` (the
frontend's batch aggregator never puts a describe job next to another job). An inference request
always carries parameters (a ``body``), or comes as a form (``multipart/form-data``,
``application/x-www-form-urlencoded``): so a client that adds a ``describe`` header to
``/predictions`` gets an ordinary answer per row, never the description.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping, Optional

import torch

from camserve.backends import torchserve_workers, worker_threads
from camserve.errors import InternalError
from camserve.serving import BatchStats, CamService, RowResult, safe_traceback

logger = logging.getLogger(__name__)

FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


def _headers(context: Any, idx: int) -> Mapping[str, Any]:
    try:
        headers = context.get_all_request_header(idx)
    except (AttributeError, IndexError, KeyError, TypeError):
        return {}
    return headers if isinstance(headers, Mapping) else {}


def _header(headers: Mapping[str, Any], name: str) -> Optional[str]:
    """A request-level header by name, case-insensitively (parameter entries are dicts)."""
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == name and isinstance(value, str):
            return value
    return None


def is_management_describe(rows: list[Any], context: Any) -> bool:
    """True only for the management API's describe call (see the module docstring)."""
    if len(rows) != 1 or not isinstance(rows[0], Mapping) or len(rows[0]) != 0:
        return False
    headers = _headers(context, 0)
    if headers.get("describe") != "True":
        return False
    ctype = (_header(headers, "content-type") or "").strip().lower()
    return not ctype.startswith(FORM_TYPES)


def explain_flags(context: Any, n: int) -> list[bool]:
    """TorchServe's ``explain`` request header of each row as a boolean."""
    return [str(_headers(context, i).get("explain", "")).strip().lower() == "true"
            for i in range(n)]


class GradCamHandler:
    """Image classification with per-request Grad-CAM (see the module docstring)."""

    def __init__(self) -> None:
        self.service: Optional[CamService] = None
        self.device = torch.device("cpu")
        self.threads = 1
        self.initialized = False

    def initialize(self, context: Any) -> None:
        """Pick the device and the worker's threads, build the backend from the archive's
        ``handler:`` block (the archive's serialized file: the weights, or the CAM graph for
        ``backend: onnxruntime``), load labels, warm up."""
        props = context.system_properties
        gpu_id = props.get("gpu_id")
        gpu = gpu_id is not None and torch.cuda.is_available()
        if gpu:
            self.device = torch.device(f"cuda:{gpu_id}")
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        config = getattr(context, "model_yaml_config", None) or {}
        self.threads = worker_threads(torchserve_workers(
            config, gpu=gpu, gpus=torch.cuda.device_count() if gpu else 1))
        torch.set_num_threads(self.threads)  # this worker's share, not every core per worker
        model_dir = props.get("model_dir")
        serialized = ((context.manifest or {}).get("model") or {}).get("serializedFile")
        weights = os.path.join(model_dir, serialized) if serialized else None
        self.service = CamService.from_handler_config(config.get("handler"), model_dir,
                                                      weights=weights, device=self.device,
                                                      threads=self.threads)
        self.initialized = True
        logger.info("GradCamHandler ready on %s (%s backend, layer %r, %d classes, batch size %s, "
                    "%d threads)", self.device, self.service.backend.name, self.service.layer,
                    self.service.num_classes, props.get("batch_size"), self.threads)

    def handle(self, data: list[Any], context: Any) -> list[str]:
        """Answer a batch: one JSON text per row, with its own status code and content type."""
        if self.service is None:
            raise RuntimeError("GradCamHandler.handle called before initialize")
        if is_management_describe(data, context):
            return [json.dumps(self.service.describe())]
        try:
            outcome = self.service.handle_batch(data, explain_flags(context, len(data)))
            results, stats = outcome.results, outcome.stats
        except Exception:  # a bug outside the per-row guards: still one answer per row
            err = InternalError.new()
            logger.error("camserve: internal error %s while handling a batch of %d rows\n%s",
                         err.error_id, len(data), safe_traceback())
            results = [RowResult.error(err) for _ in data]
            stats = BatchStats(rows=len(data), error_rows=len(data), internal_errors=len(data),
                               failed_batches=1)
        for i, res in enumerate(results):
            context.set_response_content_type(i, "application/json")
            if res.status != 200:
                context.set_response_status(res.status, res.phrase, i)
        self._metrics(context, stats)
        return [res.to_json() for res in results]

    @staticmethod
    def _metrics(context: Any, stats: BatchStats) -> None:
        metrics = getattr(context, "metrics", None)
        if metrics is None:
            return
        try:
            metrics.add_time("HandlerTime", round(stats.total_ms, 2), None, "ms")
            metrics.add_counter("CamRequestErrors", stats.error_rows)
            metrics.add_counter("CamInternalErrors", stats.internal_errors)
            metrics.add_counter("CamFailedBatches", stats.failed_batches)
            if stats.explained_rows:
                metrics.add_time("CamTime", round(stats.cam_ms, 2), None, "ms")
                metrics.add_counter("CamExplainedRows", stats.explained_rows)
        except Exception:  # metrics must never cost an answer
            logger.warning("camserve: could not record metrics", exc_info=True)

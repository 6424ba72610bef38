"""TorchServe handler: predictions with Grad-CAM explanations, a thin adapter over camserve.

The archive's ``model-config.yaml`` carries a ``handler:`` block (see :mod:`camserve.models`); the
model file and the serialized state_dict come from the archive. All request parsing, batching and
rendering lives in :class:`camserve.serving.CamService`; this module holds exactly one class, as
TorchServe 0.12's loader requires.

Per request (per row of a batch): ``/explanations`` (and the KServe explain routes, which set the
``explain: True`` request header) or the option ``explain=true`` explain; other rows only predict.
A bad request gets its own 4xx status and JSON error body; the rest of the batch is unaffected.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Optional

import torch
from ts.torch_handler.base_handler import BaseHandler

from camserve.serving import CamService

logger = logging.getLogger(__name__)


class GradCamHandler(BaseHandler):
    """Image classification with per-request Grad-CAM (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.service: Optional[CamService] = None

    def initialize(self, context: Any) -> None:
        """Pick the device, build the model from the ``handler:`` block, load labels, warm up."""
        props = context.system_properties
        gpu_id = props.get("gpu_id")
        if gpu_id is not None and torch.cuda.is_available():
            self.device = torch.device(f"cuda:{gpu_id}")
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.map_location = self.device.type
        self.manifest = context.manifest
        model_dir = props.get("model_dir")
        yaml_config = context.model_yaml_config or {}
        weights = None
        serialized = (self.manifest or {}).get("model", {}).get("serializedFile")
        if serialized:
            weights = os.path.join(model_dir, serialized)
        self.service = CamService.from_model_dir(model_dir, yaml_config.get("handler"),
                                                 device=self.device, weights=weights)
        self.model = self.service.model
        self.mapping = dict(enumerate(self.service.labels))
        self.initialized = True
        logger.info("GradCamHandler ready on %s (layer %r, %d classes, batch size %s)",
                    self.device, self.service.engine.layer_name, self.service.num_classes,
                    props.get("batch_size"))

    def handle(self, data: list[Any], context: Any) -> list[str]:
        """Answer a batch: per-row explain flag, targets, method; per-row status and JSON body.

        Unlike :meth:`BaseHandler.handle`, nothing is decided from request 0 for the batch, and the
        CAM path never runs under ``torch.inference_mode()``.
        """
        if self.service is None:
            raise RuntimeError("GradCamHandler.handle called before initialize")
        self.context = context
        if data and context.get_request_header(0, "describe") == "True":
            # GET /models/{name}?customized=true on the management API
            return [json.dumps(self.service.describe())]
        headers = [context.get_request_header(i, "explain") for i in range(len(data))]
        results = self.service.handle_batch(data, headers)
        for i, res in enumerate(results):
            context.set_response_content_type(i, "application/json")
            if res.status != 200:
                context.set_response_status(res.status, res.phrase, i)
        stats = self.service.last_stats
        metrics = context.metrics
        if metrics is not None:
            metrics.add_time("HandlerTime", round(stats.total_ms, 2), None, "ms")
            metrics.add_counter("CamRequestErrors", stats.error_rows)
            if stats.explained_rows:
                metrics.add_time("CamTime", round(stats.cam_ms, 2), None, "ms")
                metrics.add_counter("CamExplainedRows", stats.explained_rows)
        return [res.to_json() for res in results]

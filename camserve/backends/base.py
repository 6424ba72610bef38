"""The backend seam: what the serving core asks of whatever runs a batch.

A :class:`Backend` holds a model ready to serve — its :class:`~camserve.models.ModelSpec`, labels,
task, target layer and the CAM methods it can run — and answers two questions for a batch of
preprocessed inputs ``x`` (B, 3, H, W):

* :meth:`Backend.predict` — the task's output of every row (for classification the logits), with
  no gradient work;
* :meth:`Backend.explain` — the task's output of every row and, for the explain ``rows``, raw CAMs
  for their targets (from the task, :class:`camserve.explain.CamRequest`) by each row's method, as
  :class:`camserve.explain.BatchCams`.

The serving core never knows which backend it has, and the answers do not depend on it (scores
within 1e-4, heatmaps within one grey level): both backends hand raw maps to the same rendering.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Optional, Sequence

import torch

from ..models import ModelSpec
from ..tasks import Task

if TYPE_CHECKING:
    from ..explain import BatchCams, CamRequest
    from ..methods import LayerSize, MethodSpec

#: The CAM graph's file name in a model folder (the onnxruntime backend serves it).
GRAPH_FILE = "model.cam.onnx"


class Backend:
    """What runs a served batch (see the module docstring).

    Attributes: ``spec`` the model's :class:`~camserve.models.ModelSpec` as served, ``labels``,
    ``task``, ``layer`` (the target layer's dotted name), ``methods`` (the CAM methods it runs),
    ``device``.
    """

    name: ClassVar[str] = ""
    spec: ModelSpec
    labels: list[str]
    task: Task
    layer: str
    methods: tuple[str, ...]
    device: torch.device

    def predict(self, x: torch.Tensor) -> Any:
        """The task's output of every row of ``x`` (detached, on :attr:`device`)."""
        raise NotImplementedError

    def explain(self, x: torch.Tensor, rows: Sequence[int], request: "CamRequest") -> "BatchCams":
        """The task's output of every row of ``x`` and the CAMs of ``rows`` (one
        :class:`~camserve.explain.CamRequest` entry per explain row)."""
        raise NotImplementedError

    @property
    def layer_size(self) -> Optional["LayerSize"]:
        """The target layer's size (channels, map) where known: what a method's cost is
        counted on (:func:`camserve.explain.plan_compute`); None: methods cost one pass."""
        return None

    @property
    def suffix_share(self) -> float:
        """The share of a forward's work after the target layer (what a method replaying the
        suffix costs, in forwards)."""
        return 1.0

    def check(self, spec: "MethodSpec") -> None:
        """Refuse a request's method options this backend cannot run (400); default: none."""

    def measure(self, x: torch.Tensor) -> None:
        """Measure what costs are counted on, on the input ``x`` (the service's warm-up)."""

    def describe(self) -> dict[str, Any]:
        """What the service's describe answer says about the backend."""
        return {"backend": self.name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.arch!r}, layer {self.layer!r}, {self.device})"

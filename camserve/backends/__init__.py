"""Backends: what runs a served batch — the PyTorch engine or an onnxruntime session over the
exported CAM graph — behind one seam (:class:`Backend`), chosen by ``handler.backend``.

* :mod:`.base` — :class:`Backend`, the seam the serving core talks to;
* :mod:`.pytorch` — :class:`TorchBackend`: :class:`camserve.CamEngine` over a faster serving copy
  of the model (BatchNorm folded, channels-last on the CPU);
* :mod:`.ort` — ``OnnxBackend``: the folder's ``model.cam.onnx`` in onnxruntime (the ``onnx``
  extra; imported only when chosen);
* :mod:`.threads` — a worker's share of the cores.

:func:`load_backend` is the one front door from a model folder (or an extracted archive). The
manual: the README's serving sections.

Example::

    >>> from camserve.models import ModelSpec
    >>> spec = ModelSpec.from_config({"arch": "torchvision.models.resnet18", "num_classes": 3,
    ...                               "input_size": 64})
    >>> backend = load_backend(spec, ".")
    >>> backend.name, backend.layer, "gradcam" in backend.methods
    ('torch', 'layer4', True)
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..models import ModelSpec, load_model
from .base import GRAPH_FILE, Backend
from .pytorch import TorchBackend
from .threads import torchserve_workers, worker_threads

__all__ = ["Backend", "GRAPH_FILE", "TorchBackend", "graph_path", "load_backend",
           "torchserve_workers", "worker_threads"]


def graph_path(model_dir: str | Path, weights: Optional[str | Path] = None) -> Path:
    """Where the onnxruntime backend finds the graph: ``weights`` when it is an ``.onnx`` file (a
    TorchServe archive's serialized file), else ``model_dir/model.cam.onnx``."""
    if weights is not None and str(weights).endswith(".onnx"):
        return Path(weights)
    return Path(model_dir) / GRAPH_FILE


def load_backend(spec: ModelSpec, model_dir: str | Path = ".", *,
                 weights: Optional[str | Path] = None, device: torch.device | str = "cpu",
                 threads: Optional[int] = None) -> Backend:
    """The backend ``spec.backend`` names, for the model of ``model_dir``: ``torch`` builds the
    model (:func:`camserve.models.load_model`; ``weights`` overrides ``handler.weights``);
    ``onnxruntime`` opens the folder's graph (:func:`graph_path`) and checks the folder's labels
    against it. ``threads``: intra-op threads of onnxruntime's sessions (torch's are the
    process's own, set by the adapter)."""
    if spec.backend == "onnxruntime":
        from .ort import OnnxBackend, check_labels

        backend = OnnxBackend(graph_path(model_dir, weights), spec=spec, device=device,
                              threads=threads)
        check_labels(backend, model_dir)
        return backend
    return TorchBackend(load_model(spec, model_dir, weights=weights, device=device))

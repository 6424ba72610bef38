"""How many threads a serving worker may use: its share of the CPUs, never all of them each.

A server runs several workers side by side (TorchServe's ``minWorkers``/``maxWorkers`` per
model, KServe's ``--workers``); PyTorch and onnxruntime each default to one thread per core in
every process, so N workers on C cores would run N × C busy threads. The adapters give each
worker ``max(1, C // N)`` (:func:`worker_threads`): torch's intra-op threads and each
onnxruntime session's.

Example::

    >>> worker_threads(2, cpus=2), worker_threads(1, cpus=8), worker_threads(16, cpus=4)
    (1, 8, 1)
    >>> torchserve_workers({"minWorkers": 1, "maxWorkers": 2}, gpu=False, cpus=8)
    2
    >>> torchserve_workers({}, gpu=False, cpus=8)  # TorchServe's default: one worker per core
    8
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

from ..onnx.session import available_cpus


def worker_threads(workers: int, cpus: Optional[int] = None) -> int:
    """One worker's share of ``cpus`` (default
    :func:`camserve.onnx.session.available_cpus`: affinity and cgroup quota) among ``workers``:
    at least 1."""
    total = available_cpus() if cpus is None else int(cpus)
    return max(1, total // max(1, int(workers)))


def torchserve_workers(model_config: Optional[Mapping[str, Any]], *, gpu: bool,
                       cpus: Optional[int] = None, gpus: int = 1) -> int:
    """How many workers TorchServe runs for a model: ``maxWorkers`` (else ``minWorkers``) of its
    model-config.yaml; without them TorchServe's default, one worker per core (per GPU on a GPU
    host)."""
    cfg = model_config or {}
    for key in ("maxWorkers", "minWorkers"):
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    if gpu:
        return max(1, gpus)
    return available_cpus() if cpus is None else max(1, int(cpus))

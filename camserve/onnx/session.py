"""onnxruntime sessions for CAM graphs: the one place that picks providers, threads and session
options (:func:`ort_session`), for the batch job's runners and the serving backend
(:mod:`camserve.backends.ort`).

Threads are the CPUs the caller was given (a Ray actor's assignment, ``--threads``, a serving
worker's share, else the CPUs this process may run on: :func:`available_cpus`), never
onnxruntime's own default of every physical core of the machine, which oversubscribes a node that
runs several workers. On a GPU (``cuda`` or ``cuda:N``) the CUDA provider runs the graph (the
TensorRT provider first where onnxruntime has it), with the CPU provider for what they do not
take; without a CUDA provider the session runs on the CPU with a warning.

Example::

    >>> available_cpus() >= 1
    True
    >>> ort_session("graph.onnx", device="tpu")
    Traceback (most recent call last):
    ...
    ValueError: invalid value for device: 'tpu' (allowed: cpu, cuda, cuda:N)
    >>> providers("cpu")
    ['CPUExecutionProvider']
"""
from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

DEVICES: tuple[str, ...] = ("cpu", "cuda")
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cpus(cgroup: Path = CGROUP_CPU_MAX) -> int:
    """The CPUs this process may run on: its affinity (a ``taskset`` or container cpuset),
    bounded by the cgroup's CPU quota (a container limited to 2 CPUs on a 64-core host counts 2);
    at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        cpus = os.cpu_count() or 1
    try:
        quota, period = cgroup.read_text().split()[:2]
        if quota != "max" and int(period) > 0:
            cpus = min(cpus, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError):
        pass  # no readable cgroup v2 limit: the affinity stands
    return max(1, cpus)


def _device(device: str) -> tuple[str, int]:
    m = re.fullmatch(r"(cpu|cuda)(?::(\d{1,3}))?", str(device))
    if m is None or (m.group(1) == "cpu" and m.group(2)):
        raise ValueError(f"invalid value for device: {str(device)[:100]!r} (allowed: cpu, cuda, "
                         f"cuda:N)")
    return m.group(1), int(m.group(2) or 0)


def providers(device: str = "cpu") -> list[Any]:
    """The providers of a session on ``device``, in order: the CPU's; on ``cuda[:N]`` TensorRT
    (where onnxruntime has it) and CUDA on GPU N, then the CPU's — or, without a CUDA provider,
    the CPU's alone, with a warning."""
    kind, index = _device(device)
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    import onnxruntime as ort

    have = ort.get_available_providers()
    if "CUDAExecutionProvider" not in have:
        log.warning("CUDAExecutionProvider is not available (onnxruntime %s has %s); using CPU",
                    ort.__version__, ", ".join(have))
        return ["CPUExecutionProvider"]
    gpu = [("CUDAExecutionProvider", {"device_id": index})]
    if "TensorrtExecutionProvider" in have:
        gpu.insert(0, ("TensorrtExecutionProvider", {"device_id": index}))
    return [*gpu, "CPUExecutionProvider"]


def ort_session(model: str | Path | bytes, device: str = "cpu", threads: Optional[int] = None,
                spinning: bool = True) -> Any:
    """An onnxruntime session over ``model`` (a file, or a serialized graph) on ``device``
    (:func:`providers`) with ``threads`` intra-op threads (default :func:`available_cpus`);
    ``spinning=False`` lets idle pool threads sleep at once (better when other threads of the
    process need the CPU between runs: decoding, heatmaps, files)."""
    chosen = providers(device)
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: the optional "target" input is an initializer
    opts.intra_op_num_threads = int(threads or available_cpus())
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=opts, providers=chosen)

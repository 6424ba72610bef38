"""onnxruntime sessions for CAM graphs: the one place that picks providers, threads and session
options (:func:`ort_session`), for the batch job's runners and any other backend.

Threads are the CPUs the caller was given (a Ray actor's assignment, ``--threads``, else the CPUs
this process may run on: :func:`available_cpus`), never onnxruntime's own default of every
physical core of the machine, which oversubscribes a node that runs several workers.

Example::

    >>> available_cpus() >= 1
    True
    >>> ort_session("graph.onnx", device="tpu")
    Traceback (most recent call last):
    ...
    ValueError: invalid value for device: 'tpu' (allowed: cpu, cuda)
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

DEVICES: tuple[str, ...] = ("cpu", "cuda")


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity: a ``taskset`` or container cpuset), at
    least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def ort_session(path: str | Path, device: str = "cpu", threads: Optional[int] = None,
                spinning: bool = True) -> Any:
    """An onnxruntime session on ``device`` (``cuda`` when its provider is available, else CPU
    with a warning) with ``threads`` intra-op threads (default :func:`available_cpus`);
    ``spinning=False`` lets idle pool threads sleep at once (better when other threads of the
    process need the CPU between runs: decoding, heatmaps, files)."""
    if device not in DEVICES:
        raise ValueError(f"invalid value for device: {str(device)[:100]!r} (allowed: cpu, cuda)")
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: the optional "target" input is an initializer
    opts.intra_op_num_threads = int(threads or available_cpus())
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        else:
            log.warning("CUDAExecutionProvider is not available (onnxruntime %s has %s); using CPU",
                        ort.__version__, ", ".join(ort.get_available_providers()))
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)

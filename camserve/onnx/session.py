"""onnxruntime sessions for CAM graphs.

Example::

    >>> ort_session("graph.onnx", device="tpu")
    Traceback (most recent call last):
    ...
    ValueError: invalid value for device: 'tpu' (allowed: cpu, cuda)
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

DEVICES: tuple[str, ...] = ("cpu", "cuda")


def ort_session(path: str | Path, device: str = "cpu", threads: Optional[int] = None,
                spinning: bool = True) -> Any:
    """An onnxruntime session on ``device`` (``cuda`` when its provider is available, else CPU)
    with ``threads`` intra-op threads; ``spinning=False`` lets idle pool threads sleep at once
    (better when other threads of the process need the CPU between runs)."""
    if device not in DEVICES:
        raise ValueError(f"invalid value for device: {str(device)[:100]!r} (allowed: cpu, cuda)")
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: the optional "target" input is an initializer
    if threads:
        opts.intra_op_num_threads = int(threads)
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

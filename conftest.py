"""Doctest collection (``pytest --doctest-modules camserve tools``, as ``make test`` runs it).

A module whose extra is not installed is left out of the doctest run (a core-only install still
runs the core's examples); with ``make install`` (``.[all]``) every module is collected.
"""
from __future__ import annotations

import importlib.util

# module path (relative to this folder, glob) -> top-level packages its extra provides
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "camserve/onnx/*.py": ("onnx", "onnxruntime", "onnxscript"),
    "camserve/onnx/ray.py": ("ray",),
    "camserve/backends/ort.py": ("onnx", "onnxruntime"),
    "camserve/kserve/*.py": ("kserve",),
    "camserve/client.py": ("requests",),
    "camserve/testing/torchserve.py": ("requests",),
    "camserve/testing/kserve.py": ("requests",),
    "camserve/tasks/detectors/yolo.py": ("ultralytics",),
    "camserve/testing/browser.py": ("websocket",),
}


def _missing(packages: tuple[str, ...]) -> bool:
    return any(importlib.util.find_spec(p) is None for p in packages)


collect_ignore_glob = [pattern for pattern, packages in EXTRA_MODULES.items() if _missing(packages)]

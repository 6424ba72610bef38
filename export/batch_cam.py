"""``make batch``'s entry point: :func:`camserve.onnx.batch.main`, the ``camserve-batch`` command
(docs/batch.md: inputs, outputs, limits, the exit status; Ray:
docs/ray.md).
"""
from __future__ import annotations

import sys

from camserve.onnx.batch import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())

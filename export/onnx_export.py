"""``python -m export.onnx_export``: export a classifier to an ONNX graph that computes Grad-CAM
itself, and verify it. The command line of :func:`camserve.onnx.export.main` (see that module for
the graph's contract and the options).

Exit status: 0 exported and verified; 1 export or verification failed; 2 usage error.
"""
from __future__ import annotations

import sys

from camserve.onnx.export import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())

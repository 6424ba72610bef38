"""``make export``'s entry point: :func:`camserve.onnx.export.main`, the ``camserve-export`` command
(docs/export.md: the graph, the options, the exit status).
"""
from __future__ import annotations

import sys

from camserve.onnx.export import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())

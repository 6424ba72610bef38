"""``python -m export.batch_cam``: explain folders (or lists) of images with a camserve CAM graph on
onnxruntime. The command line of :func:`camserve.onnx.batch.main` (see that module for inputs,
outputs and options).

Exit status: 0 every image succeeded; 3 some images failed (see errors.jsonl); 2 usage error;
130 interrupted (Ctrl-C); 1 any other failure.
"""
from __future__ import annotations

import sys

from camserve.onnx.batch import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())

"""``python -m export.batch_cam``: the batch job's command line (:func:`camserve.onnx.cli.main`,
installed as ``camserve-batch``), kept here for ``make batch``. The manual: docs/batch.md.
"""
from __future__ import annotations

import sys

from camserve.onnx.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())

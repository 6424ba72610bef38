"""An HTML report of a batch job: ``camserve-report OUT_DIR`` writes ``OUT_DIR/report.html``, a
static page over the job's ``results.jsonl``, ``errors.jsonl`` and artefacts that works from a
file:// URL and from any static file server, with nothing from the network.

* :mod:`.job` — the job's lines as gallery rows (every task's keys, all optional);
* :mod:`.thumbs` — small thumbnails made once, with the bounded decoder, per row isolated;
* :mod:`.page` — the page, its script and style, and the data as script files in chunks;
* :mod:`.cli` — the command line.

The manual is docs/report.md. Importing this package imports neither onnx nor onnxruntime.
"""
from __future__ import annotations

from .page import ReportStats, write_report

__all__ = ["write_report", "ReportStats"]

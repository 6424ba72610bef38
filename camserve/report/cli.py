"""``camserve-report OUT_DIR [--title TEXT] [--input-root DIR] [--thumb-size 128] [--workers N]
[--max-pixels N] [--max-file-size BYTES] [-v]``: write ``OUT_DIR/report.html`` over the batch job
in OUT_DIR (:func:`camserve.report.write_report`; the manual is docs/report.md).

Exit status: 0 the page was written (images whose previews failed are listed in it); 2 usage
error (OUT_DIR is not a batch job's folder, a bad option); 1 any other failure.
"""
from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path
from typing import Optional, Sequence

from ..images import DEFAULT_MAX_PIXELS
from ..onnx.cli import parse_bytes
from ..onnx.inputs import DEFAULT_MAX_FILE_SIZE, UsageError
from .page import write_report
from .thumbs import THUMB_SIDE

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="camserve-report",
        description="Write OUT_DIR/report.html: a static page (no network; open it from disk or "
                    "any static server) with a gallery of the batch job's images and overlays, "
                    "sorting, filters, a detail view and a summary.")
    p.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="the batch job's --out folder")
    p.add_argument("--title", help="the page's title (default: camserve report: <folder name>)")
    p.add_argument("--input-root", type=Path, metavar="DIR",
                   help="where the job ran: relative input paths of results.jsonl are resolved "
                        "against it (default: the current folder)")
    p.add_argument("--thumb-size", type=int, default=THUMB_SIDE, metavar="PX",
                   help=f"long side of the thumbnails, 16..512 (default {THUMB_SIDE})")
    p.add_argument("--workers", type=int, metavar="N",
                   help="thumbnail threads (default: min(8, CPUs), >= 2)")
    p.add_argument("--max-pixels", type=parse_bytes, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"larger images get no thumbnail (default {DEFAULT_MAX_PIXELS})")
    p.add_argument("--max-file-size", type=parse_bytes, default=DEFAULT_MAX_FILE_SIZE,
                   metavar="BYTES", help="larger files get no thumbnail (default 64M; suffixes K, "
                                         "M, G)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (0, 2 or 1)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.workers is not None and args.workers < 1:
            raise UsageError(f"invalid value for --workers: {args.workers} (allowed: 1 or more)")
        stats = write_report(args.out_dir, title=args.title, input_root=args.input_root,
                             thumb_side=args.thumb_size, workers=args.workers,
                             max_pixels=args.max_pixels, max_file_size=args.max_file_size)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # report it and exit 1; the traceback with -v
        if args.verbose:
            traceback.print_exc()
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    print(f"{stats.page}: {stats.results} results, {stats.errors} errors, {stats.malformed} "
          f"malformed lines, {stats.preview_failures} failed previews, {stats.thumbs_made} "
          f"thumbnails made in {stats.seconds:.1f}s")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover - python -m camserve.report.cli
    sys.exit(main())

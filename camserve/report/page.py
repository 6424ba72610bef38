"""The writing side of the report: ``OUT_DIR/report.html``, its script and style, and the job's
data as script files in chunks beside it.

Layout (``<t>``: a fresh token per generation)::

    OUT_DIR/report.html                     the page (data-free: a title and the file names)
    OUT_DIR/report_files/report.js, .css, favicon.svg   the viewer (package data, copied)
    OUT_DIR/report_files/data-<t>/manifest.js   the summary and the tables of labels, methods, ...
    OUT_DIR/report_files/data-<t>/index-NNNNN.js  :data:`INDEX_ROWS` gallery rows each (all loaded)
    OUT_DIR/report_files/data-<t>/detail-NNNNN.js :data:`DETAIL_ROWS` detail records each (loaded
                                                  when a row is opened)
    OUT_DIR/thumbs/...                      thumbnails (:mod:`camserve.report.thumbs`)

Data travels as scripts (``camserveReport.receive(kind, n, {...})``) because a page opened from
a file:// URL may not ``fetch`` files beside it; each is pure JSON inside one call, ASCII only,
with ``<``, ``>`` and ``&`` escaped, so no value can end the script or read as markup. The page's
Content-Security-Policy allows scripts, styles and images from its own folder only: no inline
script, no ``eval``, nothing from the network; the viewer writes every value with
``textContent``. The page is written last and the previous generation's data folder removed after
it, so a page open meanwhile keeps working until it is reloaded.
"""
from __future__ import annotations

import html
import json
import logging
import math
import os
import re
import secrets
import shutil
import stat
import time
from collections import Counter, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any, Optional

from ..images import DEFAULT_MAX_PIXELS
from ..onnx.inputs import DEFAULT_MAX_FILE_SIZE, UsageError
from ..onnx.outputs import ERRORS, RESULTS, write_file
from .job import (SHORT_CHARS, JobLines, Locator, Row, display_text, lower_is_better, read_job)
from .thumbs import IMAGE, MASK, MASK_SIDE, OVERLAY, THUMB_SIDE, Preview, Thumbnailer, palette, \
    thumb_key, thumb_prefix, thumb_suffix

log = logging.getLogger(__name__)

PAGE = "report.html"
ASSETS = "report_files"
#: gallery rows per index chunk, detail records per detail chunk
INDEX_ROWS = 5000
DETAIL_ROWS = 200
HISTOGRAM_BINS = 20
#: errors and failed previews listed in the summary (the gallery's filters show all of them)
SUMMARY_LIST = 100
#: the viewer's files, copied from the package into report_files/
ASSET_FILES = ("report.js", "report.css", "favicon.svg")
_DATA_DIR = re.compile(r"data-[0-9a-f]{16}")

__all__ = ["write_report", "ReportStats", "PAGE", "ASSETS", "INDEX_ROWS", "DETAIL_ROWS"]


@dataclass
class ReportStats:
    """What :func:`write_report` wrote."""

    page: Path
    results: int = 0
    errors: int = 0
    malformed: int = 0
    preview_failures: int = 0
    missing_originals: int = 0
    thumbs_made: int = 0
    index_chunks: int = 0
    detail_chunks: int = 0
    seconds: float = 0.0


def script(kind: str, n: int, payload: Any) -> bytes:
    """One data file: ``camserveReport.receive("kind", n, <json>);`` (see the module docstring).

    Example::

        >>> script("index", 0, {"p": "</script><b>&"})
        b'camserveReport.receive("index",0,{"p":"\\\\u003c/script\\\\u003e\\\\u003cb\\\\u003e\\\\u0026"});\\n'
    """
    text = json.dumps(payload, ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return f'camserveReport.receive("{kind}",{int(n)},{text});\n'.encode("ascii")


class _Tables:
    """Values repeated over rows (labels, methods, tasks, error types) as small integers."""

    def __init__(self) -> None:
        self.ids: dict[str, dict[str, int]] = {"labels": {}, "methods": {}, "tasks": {},
                                               "errorTypes": {}}

    def id(self, table: str, value: str) -> int:
        ids = self.ids[table]
        return ids.setdefault(value, len(ids))

    def lists(self) -> dict[str, list[str]]:
        return {name: list(ids) for name, ids in self.ids.items()}


@dataclass
class _Summary:
    """The numbers at the top of the page, gathered row by row."""

    labels: Counter[int] = field(default_factory=Counter)
    histogram: list[int] = field(default_factory=lambda: [0] * HISTOGRAM_BINS)
    scored: int = 0
    metric_sums: dict[str, list[float]] = field(default_factory=dict)   # key -> [sum, n]
    error_types: Counter[int] = field(default_factory=Counter)
    errors: list[dict[str, Any]] = field(default_factory=list)
    previews: list[dict[str, Any]] = field(default_factory=list)
    preview_failures: int = 0
    missing_originals: int = 0
    thumbs_made: int = 0

    def add(self, row: Row, entry: dict[str, Any]) -> None:
        if row.error is not None:
            self.error_types[entry["e"]] += 1
            if len(self.errors) < SUMMARY_LIST:
                self.errors.append({"i": entry["i"], "p": entry["p"], "t": row.error[0],
                                    "r": entry["r"]})
            return
        self.labels.update(entry.get("l", ()))
        if row.score is not None:
            self.scored += 1
            self.histogram[min(HISTOGRAM_BINS - 1,
                               max(0, math.floor(row.score * HISTOGRAM_BINS)))] += 1
        for k, v in row.metrics.items():
            if v is not None:
                acc = self.metric_sums.setdefault(k, [0.0, 0])
                acc[0] += v
                acc[1] += 1

    def preview(self, entry: dict[str, Any], p: Preview) -> None:
        entry["f"] = p.flags
        self.thumbs_made += p.made
        self.missing_originals += p.missing_original
        if p.failures:
            entry["r"] = display_text("; ".join(p.failures), SHORT_CHARS)
            self.preview_failures += 1
            if len(self.previews) < SUMMARY_LIST:
                self.previews.append({"i": entry["i"], "p": entry["p"], "r": entry["r"]})


def _entry(i: int, row: Row, tables: _Tables) -> dict[str, Any]:
    """A row's gallery entry (short keys; see report.js)."""
    e: dict[str, Any] = {"i": i, "p": display_text(row.path), "t": tables.id("tasks", row.task)}
    if row.error is not None:
        e["e"] = tables.id("errorTypes", row.error[0])
        e["r"] = display_text(row.error[1], SHORT_CHARS)
        return e
    e["k"] = thumb_prefix(thumb_key(row.thumb_id))
    e["f"] = 0
    if row.labels:
        e["l"] = [tables.id("labels", label) for label in row.labels]
    if row.score is not None:
        e["s"] = round(row.score, 6)
    if row.method is not None:
        e["m"] = tables.id("methods", row.method)
    if row.boxes and row.size:
        w, h = row.size
        e["b"] = [[round(min(max(v / d, 0.0), 1.0), 4) for v, d in zip(b, (w, h, w, h))]
                  for b in row.boxes[:20]]
    if row.metrics:
        e["x"] = row.metrics  # a dict until the keys are known, then a list (see _finish)
    return e


def _detail(row: Row, entry: dict[str, Any]) -> dict[str, Any]:
    d = dict(row.detail)
    seg = d.get("segmentation")
    if seg is not None:
        seg["overlay"] = entry["k"] + thumb_suffix("m", MASK_SIDE)
        for c in seg["classes"]:
            if c["index"] is not None and 0 <= c["index"] < 256:
                c["color"] = list(palette(c["index"]))
    return d


class _Writer:
    """Writes the data files of one generation into ``report_files/data-<token>/``."""

    def __init__(self, out_dir: Path, token: str) -> None:
        self.out_dir = out_dir
        self.folder = f"{ASSETS}/data-{token}"
        self.details: list[dict[str, Any]] = []
        self.detail_chunks = 0

    def write(self, kind: str, n: int, payload: Any) -> None:
        write_file(self.out_dir, f"{self.folder}/{kind}-{n:05d}.js", script(kind, n, payload))

    def detail(self, record: dict[str, Any]) -> None:
        self.details.append(record)
        if len(self.details) >= DETAIL_ROWS:
            self.flush_details()

    def flush_details(self) -> None:
        if self.details:
            self.write("detail", self.detail_chunks, self.details)
            self.detail_chunks += 1
            self.details = []


def _check_folder(out_dir: Path) -> None:
    if not out_dir.is_dir():
        raise UsageError(f"invalid value for OUT_DIR: {display_text(str(out_dir), 200)!r} is not a "
                         f"folder")
    if not any(os.path.lexists(out_dir / n) for n in (RESULTS, ERRORS)):
        raise UsageError(f"invalid value for OUT_DIR: {display_text(str(out_dir), 200)!r} holds "
                         f"neither {RESULTS} nor {ERRORS} (expected the --out folder of a batch job)")


def write_report(out_dir: Path, *, title: Optional[str] = None,
                 input_root: Optional[Path] = None, thumb_side: int = THUMB_SIDE,
                 workers: Optional[int] = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_file_size: int = DEFAULT_MAX_FILE_SIZE) -> ReportStats:
    """Write ``out_dir/report.html`` over the batch job in ``out_dir`` (see the module
    docstring); relative input paths are resolved against ``input_root`` (default: the current
    folder, where the job ran). UsageError when ``out_dir`` is not a job folder."""
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    _check_folder(out_dir)
    if not 16 <= thumb_side <= 512:
        raise UsageError(f"invalid value for --thumb-size: {thumb_side} (allowed: 16..512)")
    token = secrets.token_hex(8)
    loc = Locator(out_dir, Path(input_root) if input_root is not None else Path.cwd())
    counts, tables, summary = JobLines(), _Tables(), _Summary()
    thumbs = Thumbnailer(out_dir, thumb_side, max_pixels=max_pixels, max_file_size=max_file_size)
    writer = _Writer(out_dir, token)
    entries: list[dict[str, Any]] = []
    # the batch job's pool size (not imported from camserve.onnx.batch, which will import this)
    workers = workers or min(8, max(2, len(os.sched_getaffinity(0))))
    window: deque[tuple[Future[Preview], dict[str, Any]]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="report_thumbs") as pool:
        try:
            for i, row in enumerate(read_job(out_dir, loc, counts)):
                entry = _entry(i, row, tables)
                entries.append(entry)
                summary.add(row, entry)
                writer.detail(_detail(row, entry))
                if row.error is None:
                    window.append((pool.submit(thumbs.make, thumb_key(row.thumb_id),
                                               row.sources), entry))
                while len(window) > 4 * workers:
                    fut, done = window.popleft()
                    summary.preview(done, fut.result())
            while window:
                fut, done = window.popleft()
                summary.preview(done, fut.result())
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    writer.flush_details()
    keys = list(counts.metric_keys)
    for e in entries:
        if "x" in e:
            e["x"] = [e["x"].get(k) for k in keys]
    index_chunks = 0
    for n in range(0, len(entries), INDEX_ROWS):
        writer.write("index", index_chunks, entries[n:n + INDEX_ROWS])
        index_chunks += 1
    manifest = {
        "version": 1, "title": title or f"camserve report: {out_dir.resolve().name}",
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "job": display_text(out_dir.resolve().name), "data": writer.folder + "/",
        "rows": len(entries), "indexRows": INDEX_ROWS, "indexChunks": index_chunks,
        "detailRows": DETAIL_ROWS, "detailChunks": writer.detail_chunks,
        "thumbs": {"image": thumb_suffix("i", thumb_side), "overlay": thumb_suffix("o", thumb_side),
                   "mask": thumb_suffix("s", thumb_side),
                   "flags": {"image": IMAGE, "overlay": OVERLAY, "mask": MASK}},
        **tables.lists(), "metricKeys": keys, "lowerIsBetter": lower_is_better(keys),
        "counts": {"results": counts.results, "errors": counts.errors,
                   "malformedResults": counts.malformed_results,
                   "malformedErrors": counts.malformed_errors,
                   "previewFailures": summary.preview_failures,
                   "missingOriginals": summary.missing_originals,
                   "thumbsMade": summary.thumbs_made},
        "labelCounts": summary.labels.most_common(),
        "histogram": summary.histogram, "scored": summary.scored,
        "metricMeans": {k: {"mean": s / n, "n": n} for k, (s, n) in summary.metric_sums.items()},
        "errorCounts": summary.error_types.most_common(),
        "errorList": summary.errors, "previewList": summary.previews,
    }
    write_file(out_dir, f"{writer.folder}/manifest.js", script("manifest", 0, manifest))
    _write_page(out_dir, manifest["title"], token, writer.folder)
    _remove_old_data(out_dir, token)
    stats = ReportStats(page=out_dir / PAGE, results=counts.results, errors=counts.errors,
                        malformed=counts.malformed_results + counts.malformed_errors,
                        preview_failures=summary.preview_failures,
                        missing_originals=summary.missing_originals,
                        thumbs_made=summary.thumbs_made, index_chunks=index_chunks,
                        detail_chunks=writer.detail_chunks, seconds=time.perf_counter() - t0)
    log.info("%s: %d results, %d errors, %d malformed lines, %d failed previews, %d thumbnails "
             "made in %.1f s", stats.page, stats.results, stats.errors, stats.malformed,
             stats.preview_failures, stats.thumbs_made, stats.seconds)
    if stats.missing_originals:
        log.warning("%d original images were not found under %s: relative paths of %s are "
                    "resolved against --input-root (default: the current folder), which should be "
                    "the folder the job ran in", stats.missing_originals, loc.input_root, RESULTS)
    return stats


def _asset(name: str) -> bytes:
    return resources.files(__package__).joinpath("assets", name).read_bytes()


def _write_page(out_dir: Path, title: str, token: str, folder: str) -> None:
    """The script and style, then the page (last: it names the new data folder)."""
    for name in ASSET_FILES:
        write_file(out_dir, f"{ASSETS}/{name}", _asset(name))
    page = Template(_asset("report.html").decode("utf-8")).substitute(
        title=html.escape(title, quote=True), token=token, data=folder)
    write_file(out_dir, PAGE, page.encode("utf-8"))


def _remove_old_data(out_dir: Path, keep: str) -> None:
    """Remove the data folders of earlier generations (real folders with the data name only)."""
    assets = out_dir / ASSETS
    for name in os.listdir(assets):
        if not _DATA_DIR.fullmatch(name) or name == f"data-{keep}":
            continue
        path = assets / name
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path)

"""The reading side of the report: a batch job's ``results.jsonl`` and ``errors.jsonl`` as gallery
rows, tolerant of every key being absent or of the wrong type.

Lines are read as the job's ``--resume`` reads them (bounded lines; a line that is not JSON, not
an object, or has no string ``path`` is counted as malformed and skipped). Each results line
becomes one :class:`Row` through its task's reader (:data:`TASKS`; a line without ``task`` is a
classification line); a value of the wrong type is treated as absent. Text shown on the page goes
through :func:`display_text` (undecodable bytes of non-UTF-8 names as ``\\xNN``, control and
format characters escaped, length capped) and file references through :class:`Locator`
(percent-encoded URLs relative to the page; artefacts confined to the job folder). See
docs/report.md for the line keys each task may carry.

Example::

    >>> display_text(os.fsdecode(b"caf\\xe9\\n.jpg"))
    'caf\\\\xe9\\\\x0a.jpg'
    >>> loc = Locator(Path("/data/job"), Path("/data"))
    >>> loc.original("photos/a b#1.jpg")[1]
    '../photos/a%20b%231.jpg'
    >>> loc.artefact("../etc/passwd") is None
    True
"""
from __future__ import annotations

import json
import math
import os
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

from ..metrics import LOWER_IS_BETTER
from ..onnx.inputs import Refused, UsageError, open_regular
from ..onnx.outputs import ERRORS, MAX_RESULT_LINE_BYTES, RESULTS, read_lines

#: characters of a path, label or method name shown in the gallery (the detail view: DETAIL_CHARS)
SHORT_CHARS = 300
DETAIL_CHARS = 4096
#: characters of a results line shown raw in the detail view
RAW_CHARS = 4000
#: distinct metric keys kept (more are ignored); longest metric key
MAX_METRIC_KEYS = 32
MAX_KEY_CHARS = 64
#: entries of a list in a line (top-k, detections, classes, labels) kept per row
MAX_LIST = 100

__all__ = ["Row", "Locator", "JobLines", "read_job", "display_text", "TASKS", "RESULTS",
           "ERRORS", "LOWER_IS_BETTER"]


def display_text(value: str, limit: int = SHORT_CHARS) -> str:
    """``value`` as text a person can read and nothing can forge: undecodable bytes of a
    non-UTF-8 name (surrogates U+DC80..U+DCFF, see docs/batch.md) as ``\\xNN``, other
    surrogates and every non-printable character (control, format such as U+202E, separators
    other than the space) as ``\\xNN``/``\\uNNNN``; cut to ``limit`` characters with ``…``."""
    if len(value) > limit:
        value = value[: limit - 1]
        cut = True
    else:
        cut = False
    if not value.isprintable():
        out = []
        for c in value:
            o = ord(c)
            if 0xDC80 <= o <= 0xDCFF:
                out.append(f"\\x{o - 0xDC00:02x}")
            elif c.isprintable():
                out.append(c)
            elif o < 0x100:
                out.append(f"\\x{o:02x}")
            elif o < 0x10000:
                out.append(f"\\u{o:04x}")
            else:
                out.append(f"\\U{o:08x}")
        value = "".join(out)
    return value + "…" if cut else value


def _url(target: str, base: str) -> str:
    """``target`` (an absolute path) relative to the folder ``base``, percent-encoded from its
    bytes (non-UTF-8 names keep their bytes): a relative URL that can never be read as a scheme
    (``:`` is encoded) or as markup."""
    rel = os.path.relpath(target, base)
    return urllib.parse.quote(os.fsencode(rel).replace(os.sep.encode(), b"/"), safe="/")


class Locator:
    """Where the files a line names are, and their URLs relative to the page in ``out_dir``.

    Originals (a line's ``path``, relative paths resolved against ``input_root``, where the job
    ran) may be anywhere; artefacts (``files``, explanation and mask paths) are relative to
    ``out_dir`` and must stay inside it: an absolute path, a ``..`` component, a NUL byte or a
    symlink leading out of the folder names no artefact (None)."""

    def __init__(self, out_dir: Path, input_root: Path) -> None:
        self.out_dir = os.path.abspath(out_dir)
        self.input_root = os.path.abspath(input_root)
        self._real_out = os.path.realpath(self.out_dir)

    def original(self, path: str) -> tuple[str, str]:
        """(absolute path, URL) of an input image."""
        full = os.path.abspath(os.path.join(self.input_root, path))
        return full, _url(full, self.out_dir)

    def artefact(self, rel: Any) -> Optional[tuple[str, str]]:
        """(absolute path, URL) of a file under ``out_dir``, or None when ``rel`` is not a
        relative path that stays inside it."""
        if not isinstance(rel, str) or not rel or "\0" in rel or rel.startswith(("/", "\\")):
            return None
        parts = rel.replace("\\", "/").split("/")
        if any(p in ("", ".", "..") for p in parts) or ":" in parts[0]:
            return None
        full = os.path.join(self.out_dir, *parts)
        real = os.path.realpath(full)
        if os.path.commonpath([real, self._real_out]) != self._real_out:
            return None
        return full, _url(full, self.out_dir)


# -- typed reads of loose values ----------------------------------------------------------------------

def _num(v: Any) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def _int(v: Any) -> Optional[int]:
    return v if isinstance(v, int) and not isinstance(v, bool) and abs(v) < 2**53 else None


def _size(v: Any) -> Optional[int]:
    n = _int(v)
    return n if n is not None and n > 0 else None


def _str(v: Any) -> Optional[str]:
    return v if isinstance(v, str) else None


def _box(v: Any) -> Optional[list[float]]:
    """``[x0, y0, x1, y1]``: four finite numbers with x1 >= x0, y1 >= y0."""
    if not isinstance(v, (list, tuple)) or len(v) != 4:
        return None
    nums = [_num(x) for x in v]
    if any(x is None for x in nums) or nums[2] < nums[0] or nums[3] < nums[1]:
        return None
    return [round(x, 2) for x in nums]


def _list(v: Any) -> list[Any]:
    return list(v[:MAX_LIST]) if isinstance(v, list) else []


def _dicts(v: Any) -> list[dict[str, Any]]:
    return [x for x in _list(v) if isinstance(x, dict)]


def _label(v: Any, limit: int = DETAIL_CHARS) -> Optional[str]:
    s = _str(v)
    return None if s is None else display_text(s, limit)


def _row_labels(entries: list[dict[str, Any]], keep: Callable[[dict[str, Any]], bool] = bool
                ) -> tuple[str, ...]:
    """The distinct labels (gallery text) of a line's entries for which ``keep`` holds."""
    return tuple(dict.fromkeys(display_text(d["label"]) for d in entries
                               if isinstance(d.get("label"), str) and keep(d)))


def _class(d: dict[str, Any], score_key: str = "score") -> dict[str, Any]:
    """``{"index", "label", "score"}`` of a top-k entry, detection or label, typed."""
    return {"index": _int(d.get("index")), "label": _label(d.get("label")),
            score_key: _num(d.get(score_key))}


# -- rows ---------------------------------------------------------------------------------------------

@dataclass
class Sources:
    """Files the thumbnails of a row are made from (absolute paths; None: not there)."""

    image: Optional[str] = None
    overlay: Optional[str] = None
    heatmap: Optional[str] = None
    mask: Optional[str] = None


@dataclass
class Row:
    """One gallery item: a results line (``error`` None) or an errors line.

    ``labels`` are the predicted labels (filter and counts), ``score`` the value sorted by
    (classification: the explained class; detection and multilabel: the best one), ``boxes``
    detection boxes in original pixels, ``detail`` the record the detail view shows (display
    text and URLs only), ``sources`` what its thumbnails are made from."""

    path: str
    name: Optional[str]
    task: str
    labels: tuple[str, ...] = ()
    score: Optional[float] = None
    method: Optional[str] = None
    metrics: dict[str, Optional[float]] = field(default_factory=dict)
    boxes: list[list[float]] = field(default_factory=list)
    size: Optional[tuple[int, int]] = None   # (W, H) of the original
    detail: dict[str, Any] = field(default_factory=dict)
    sources: Sources = field(default_factory=Sources)
    error: Optional[tuple[str, str]] = None

    @property
    def thumb_id(self) -> str:
        """What names the row's thumbnails: its output name, else its path."""
        return self.name if self.name is not None else self.path


def _files(line: dict[str, Any], loc: Locator) -> dict[str, tuple[str, str]]:
    files = line.get("files")
    out: dict[str, tuple[str, str]] = {}
    if isinstance(files, dict):
        for kind in ("heatmap", "overlay", "npy"):
            found = loc.artefact(files.get(kind))
            if found is not None:
                out[kind] = found
    return out


def _explanation(d: Any, loc: Locator) -> tuple[dict[str, Any], dict[str, tuple[str, str]]]:
    """A detection's ``explanation`` (``{method, bbox, files: {heatmap, overlay}}``): its record
    for the detail view (method, bbox, heatmap and overlay URLs) and its files."""
    d = d if isinstance(d, dict) else {}
    files = _files(d, loc)
    out: dict[str, Any] = {"method": _label(d.get("method"), SHORT_CHARS), "bbox": _box(d.get("bbox"))}
    for kind in ("heatmap", "overlay"):
        out[kind] = files[kind][1] if kind in files else None
    return out, files


def _explained(line: dict[str, Any], row: Row, loc: Locator) -> None:
    """What every line but a detection's holds: the explained target (``target``, ``label``,
    ``score``), ``topk``, the CAM's ``bbox`` and ``files`` (the gallery's overlay)."""
    label = _str(line.get("label"))
    row.score = _num(line.get("score"))
    files = _files(line, loc)
    row.sources.overlay = files.get("overlay", (None,))[0]
    row.sources.heatmap = files.get("heatmap", (None,))[0]
    row.detail.update({
        "target": {"index": _int(line.get("target")), "label": _label(label),
                   "score": row.score},
        "topk": [_class(d) for d in _dicts(line.get("topk"))],
        "bbox": _box(line.get("bbox")),
        "files": {k: v[1] for k, v in files.items()},
    })


def _classification(line: dict[str, Any], row: Row, loc: Locator) -> None:
    _explained(line, row, loc)
    label = _str(line.get("label"))
    row.labels = (display_text(label),) if label is not None else ()


def _detection(line: dict[str, Any], row: Row, loc: Locator) -> None:
    dets = []
    for d in _dicts(line.get("detections")):
        explanation, files = _explanation(d.get("explanation"), loc)
        det = {**_class(d), "box": _box(d.get("box")), "explanation": explanation}
        dets.append(det)
        if row.sources.overlay is None and row.sources.heatmap is None:
            for kind in ("overlay", "heatmap"):
                if kind in files:
                    setattr(row.sources, kind, files[kind][0])
        if row.method is None:
            row.method = det["explanation"]["method"]
    row.labels = _row_labels(_dicts(line.get("detections")))
    scores = [d["score"] for d in dets if d["score"] is not None]
    row.score = max(scores) if scores else None
    row.boxes = [d["box"] for d in dets if d["box"] is not None]
    row.detail["detections"] = dets


def _segmentation(line: dict[str, Any], row: Row, loc: Locator) -> None:
    _explained(line, row, loc)
    seg = line.get("segmentation") if isinstance(line.get("segmentation"), dict) else {}
    classes = [{"index": _int(c.get("index")), "label": _label(c.get("label")),
                "share": _num(c.get("share"))} for c in _dicts(seg.get("classes"))]
    mask = loc.artefact(seg.get("mask"))
    row.sources.mask = None if mask is None else mask[0]
    row.labels = _row_labels(_dicts(seg.get("classes")),
                             lambda c: (_num(c.get("share")) or 0) > 0)
    row.detail["segmentation"] = {"classes": classes, "mask": None if mask is None else mask[1]}


def _multilabel(line: dict[str, Any], row: Row, loc: Locator) -> None:
    _explained(line, row, loc)
    labels = [_class(d) for d in _dicts(line.get("labels"))]
    row.labels = _row_labels(_dicts(line.get("labels")))
    scores = [d["score"] for d in labels if d["score"] is not None]
    if row.score is None and scores:  # the explained label's, else the best label's
        row.score = max(scores)
    row.detail.update({"labels": labels, "threshold": _num(line.get("threshold"))})


#: task name -> reader filling a row from its line; a line without ``task`` is classification
TASKS: dict[str, Callable[[dict[str, Any], Row, Locator], None]] = {
    "classification": _classification, "detection": _detection,
    "segmentation": _segmentation, "multilabel": _multilabel,
}


def _metrics(v: Any, keys: dict[str, None]) -> dict[str, Optional[float]]:
    """A line's ``metrics`` ({key: number or null}); new keys are added to ``keys`` (at most
    :data:`MAX_METRIC_KEYS`, each at most :data:`MAX_KEY_CHARS` characters)."""
    if not isinstance(v, dict):
        return {}
    out: dict[str, Optional[float]] = {}
    for k, x in list(v.items())[:MAX_METRIC_KEYS]:
        if not isinstance(k, str) or not k or len(k) > MAX_KEY_CHARS:
            continue
        k = display_text(k, MAX_KEY_CHARS)
        if k not in keys:
            if len(keys) >= MAX_METRIC_KEYS:
                continue
            keys[k] = None
        out[k] = _num(x)
    return out


def result_row(line: dict[str, Any], raw: bytes, loc: Locator,
               metric_keys: dict[str, None]) -> Row:
    """The row of one results line (a dict with a string ``path``)."""
    path = line["path"]
    task_value = line.get("task", "classification")
    task = task_value if isinstance(task_value, str) else "classification"
    name = _str(line.get("name"))
    row = Row(path=path, name=name, task=display_text(task, MAX_KEY_CHARS))
    w, h = _size(line.get("width")), _size(line.get("height"))
    row.size = (w, h) if w and h else None
    row.method = _label(line.get("method"), SHORT_CHARS)
    row.metrics = _metrics(line.get("metrics"), metric_keys)
    image_path, image_url = loc.original(path)
    row.sources.image = image_path
    row.detail = {"path": display_text(path, DETAIL_CHARS), "url": image_url, "task": row.task,
                  "name": None if name is None else display_text(name, DETAIL_CHARS),
                  "width": w, "height": h, "layer": _label(line.get("layer"), SHORT_CHARS),
                  "metrics": row.metrics,
                  "raw": raw.decode("utf-8", "replace").rstrip("\n")[:RAW_CHARS]}
    reader = TASKS.get(task)
    if reader is not None:
        reader(line, row, loc)
    else:  # a task this report does not know: what every line has
        _classification(line, row, loc)
    row.detail["method"] = row.method
    return row


def error_row(line: dict[str, Any]) -> Row:
    """The row of one errors line (a dict with a string ``path``)."""
    etype = display_text(_str(line.get("type")) or "Error", MAX_KEY_CHARS)
    reason = display_text(_str(line.get("reason")) or "", DETAIL_CHARS)
    row = Row(path=line["path"], name=None, task="error", error=(etype, reason))
    row.detail = {"path": display_text(line["path"], DETAIL_CHARS), "task": "error",
                  "error": {"type": etype, "reason": reason}}
    return row


# -- the job folder -------------------------------------------------------------------------------------

Line = Union[tuple[dict[str, Any], bytes], None]


def iter_lines(path: Path) -> Iterator[Line]:
    """``(object, raw line)`` per line of a ``.jsonl`` file, None for a malformed line (not
    JSON, not an object, no string ``path``, longer than
    :data:`camserve.onnx.outputs.MAX_RESULT_LINE_BYTES`). Blank lines are skipped; a missing
    file has no lines. UsageError for a special file (a FIFO would block), OSError when it cannot
    be read."""
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        return
    except Refused as exc:
        raise UsageError(f"invalid value for OUT_DIR: {path.name} is {exc.reason}") from None
    with os.fdopen(fd, "rb") as fh:
        for raw, whole in read_lines(fh, MAX_RESULT_LINE_BYTES):
            if whole and not raw.strip():
                continue
            try:
                line = json.loads(raw) if whole else None
            except ValueError:
                line = None
            if not isinstance(line, dict) or not isinstance(line.get("path"), str):
                yield None
                continue
            yield line, raw


@dataclass
class JobLines:
    """Counts of what :func:`read_job` read (filled as its rows are consumed)."""

    results: int = 0
    errors: int = 0
    malformed_results: int = 0
    malformed_errors: int = 0
    metric_keys: dict[str, None] = field(default_factory=dict)


def read_job(out_dir: Path, loc: Locator, counts: JobLines) -> Iterator[Row]:
    """The rows of a job folder: its results lines in order, then its errors lines; ``counts``
    is updated as they are read."""
    for item in iter_lines(out_dir / RESULTS):
        if item is None:
            counts.malformed_results += 1
            continue
        counts.results += 1
        yield result_row(item[0], item[1], loc, counts.metric_keys)
    for item in iter_lines(out_dir / ERRORS):
        if item is None:
            counts.malformed_errors += 1
            continue
        counts.errors += 1
        yield error_row(item[0])


def lower_is_better(keys: Sequence[str]) -> list[str]:
    """The metric keys among ``keys`` where a lower value is better
    (:data:`camserve.metrics.LOWER_IS_BETTER`)."""
    return [k for k in keys if k in LOWER_IS_BETTER]


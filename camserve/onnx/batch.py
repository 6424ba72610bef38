"""Offline batch CAMs: a folder (or list) of images through a camserve CAM graph on onnxruntime.

    python -m export.batch_cam --model model_store/shapes.cam.onnx photos/ more.jpg list.txt \\
        --out cams/ [--batch-size 32] [--threads N] [--workers N] [--method gradcam] \\
        [--save heatmap,overlay,npy] [--target CLASS] [--topk K] [--resume] [--device cpu|cuda] \\
        [--metrics deletion,insertion,road_morf,avg_drop] [--metrics-steps 50] [--metrics-baseline mean]

INPUT is an image file, a folder (searched recursively for image files: .jpg .jpeg .png .bmp .gif
.webp .tif .tiff) or a text file (.txt, .lst, .list) with one path per line (blank lines and lines
starting with # are skipped; relative paths are relative to the text file's folder).

How it runs: image files are read (regular files only, with a bounded read: :func:`read_file`),
decoded and preprocessed in a thread pool with :func:`camserve.images.decode_image` and
:func:`camserve.images.preprocess` (the handler's code, with the mean/std/input size stored in the
graph's metadata), at most a few batches and ``--window-bytes`` of decoded data ahead of the
session, so memory stays bounded however many and however large the images are. Raw maps from the graph go
through :func:`camserve.heatmaps_at_sizes` (upsampling to each original size and min-max
normalisation, as the handler does) and :mod:`camserve.render` (PNG, overlay, bounding box) in the
same pool, so a heatmap here equals the handler's for the same image. When the session leaves CPUs
free (``--device cuda``, or ``--threads`` below the CPU count) the pool decodes the next batches
and writes the previous one while onnxruntime runs; when the session uses every CPU, the pool's
work runs between session runs instead, on every CPU — running it alongside would only make
onnxruntime's threads wait for the preempted ones (``--overlap``/``--no-overlap`` overrides).

Output layout, for an input ``photos/cats/a.jpg`` given as the folder ``photos``::

    DIR/photos/cats/a.jpg.heatmap.png   grayscale heatmap at the original size   (--save heatmap)
    DIR/photos/cats/a.jpg.overlay.png   jet colour map blended over the image, at most 2048
                                        pixels on its long side              (--save overlay)
    DIR/photos/cats/a.jpg.cam.npy       raw float32 map (h, w) from the graph     (--save npy)
    DIR/results.jsonl   one JSON line per image: path, name, width, height, topk [{index, label,
                        score}], target, label, score, bbox [x0, y0, x1, y1] (or null), method,
                        layer, files (+ metrics {key: value} with --metrics)
    DIR/errors.jsonl    one JSON line per file that could not be read: path, type, reason

A file given directly is named by its file name, a list entry by its path relative to the list's
folder. Scores are softmax probabilities. ``--resume`` skips the paths already in results.jsonl (as
written: run from the same folder with the same inputs) and retries the ones in errors.jsonl.

Each item is its own transaction: a file that cannot be listed, opened, read, decoded or written
(a FIFO, a device, a file over ``--max-file-size``, a corrupt image, a name the filesystem refuses,
a NUL byte in a list entry, a list that is not text, a non-finite score) becomes one
``errors.jsonl`` line and the job goes on (exit 3). Limits, name rules and the JSON encoding of
names that are not UTF-8 are described in docs/batch.md.

Faithfulness audit (``--metrics``): each image's map is scored through the same session
(:mod:`camserve.onnx.audit`, no PyTorch model needed) with any of the per-image keys of
:mod:`camserve.metrics` (deletion, insertion, road_morf, road_lerf, avg_drop, avg_increase); the
explained class is the line's ``target``. Each perturbation step is one session run of the batch:
``--metrics deletion,insertion,road_morf,avg_drop`` costs 111 runs per image (1 reference + 50 +
50 + 9 + 1) on top of the CAM run. The means over the images go to the summary line (images of
this run only, with ``--resume``). Not on Ray yet (``--ray`` with ``--metrics`` is refused).

Exit status: 0 every image succeeded; 3 some images failed (see errors.jsonl); 2 usage error (bad
option, missing input, not a camserve CAM graph, graph metadata that does not fit the graph);
130 interrupted (Ctrl-C; ``--resume`` continues); 1 any other failure.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import io
import json
import logging
import math
import os
import re
import secrets
import signal
import stat
import sys
import threading
import time
import traceback
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..engine import heatmaps_at_sizes
from ..images import DEFAULT_MAX_PIXELS, ImageError, decode_image, preprocess
from ..records import Prediction, TargetError, resolve_target, top_predictions
from ..render import bbox_from_heatmap, heatmap_png, overlay_png
from .audit import AUDIT_KEYS, BASELINES, MetricMeans, audit_batch, cost_help, format_means, \
    parse_metric_keys, runs_per_image
from .format import GraphMeta
from .session import ort_session

log = logging.getLogger(__name__)

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif",
                                            ".tiff"})
LIST_SUFFIXES: frozenset[str] = frozenset({".txt", ".lst", ".list"})
SAVE_KINDS: tuple[str, ...] = ("heatmap", "overlay", "npy")
#: file suffix of each artefact, appended to the item's output name
SAVE_SUFFIXES: dict[str, str] = {"heatmap": ".heatmap.png", "overlay": ".overlay.png",
                                 "npy": ".cam.npy"}
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_PARTIAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
RESULTS, ERRORS = "results.jsonl", "errors.jsonl"

#: largest input file read (``--max-file-size``); the read itself is bounded by it
DEFAULT_MAX_FILE_SIZE = 64 * 2**20
#: bytes of decoded data held between decoding and writing (``--window-bytes``): preprocessed
#: tensors plus the bounded overlay copies
DEFAULT_WINDOW_BYTES = 256 * 2**20
#: overlays are drawn on a copy of the image with at most this long side
OVERLAY_MAX_SIDE = 2048
#: an output name's folder or file name longer than this (in bytes) is shortened with a hash; the
#: longest artefact suffix and the temporary name still fit the usual 255-byte limit
MAX_COMPONENT_BYTES = 200
#: an output name longer than this (in bytes) keeps its file name under a hashed folder
MAX_NAME_BYTES = 1024
#: list entries longer than this (in bytes) are refused (PATH_MAX)
MAX_LIST_ENTRY_BYTES = 4096
#: a results.jsonl line longer than this is malformed (skipped by --resume)
MAX_RESULT_LINE_BYTES = 2**20
_HASH_CHARS = 12


class UsageError(ValueError):
    """A command-line value that is not allowed (exit status 2)."""


def _cut(value: Any, limit: int = 100) -> str:
    """``repr`` of ``value`` cut to about ``limit`` characters (for echoing user values)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- inputs -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    """One image to process: ``path`` as found (a string; names that are not UTF-8 hold their
    undecodable bytes as surrogates, ``os.fsdecode``) and ``name``, its relative output name under
    DIR. ``error`` is ``(type, reason)`` for an entry refused while listing (a NUL byte in a list
    entry, a list that is not text): it is written to errors.jsonl without being opened."""

    path: str
    name: str
    error: Optional[tuple[str, str]] = None


def _short_component(part: str, limit: int = MAX_COMPONENT_BYTES) -> str:
    """``part`` if its file-system encoding fits ``limit`` bytes, else a prefix of it, ``~``, 12 hex
    characters of the SHA-256 of the whole part, and its suffix (``.jpg``) when that is short.

    Example::

        >>> _short_component("a" * 300 + ".jpg")  # doctest: +ELLIPSIS
        'aaaa...~....jpg'
        >>> len(os.fsencode(_short_component("é" * 300 + ".png")))  <= MAX_COMPONENT_BYTES
        True
    """
    raw = os.fsencode(part)
    if len(raw) <= limit:
        return part
    digest = hashlib.sha256(raw).hexdigest()[:_HASH_CHARS]
    stem, dot, ext = part.rpartition(".")
    suffix = f".{ext}" if dot and stem and len(os.fsencode(ext)) <= 16 else ""
    keep = limit - len(os.fsencode(suffix)) - 1 - _HASH_CHARS
    prefix = raw[:keep]
    # cut on a character boundary of the prefix (a UTF-8 sequence is not split; other bytes are
    # kept as they are, losslessly, through surrogateescape)
    text = os.fsdecode(prefix)
    while text and "\ufffd" in text[-1:]:
        text = text[:-1]
    return f"{text}~{digest}{suffix}"


def _safe_name(parts: Sequence[str]) -> str:
    """Relative output name from path parts: no empty, ``.`` or ``/`` parts, ``..`` as ``__``,
    every part within :data:`MAX_COMPONENT_BYTES` and the whole within :data:`MAX_NAME_BYTES`
    (the folders of a longer name become one hashed folder)."""
    clean = [p for p in parts if p not in ("", ".", "/")]
    clean = ["__" if p == ".." else _short_component(p) for p in clean]
    if not clean:
        return "image"
    name = str(PurePosixPath(*clean))
    if len(os.fsencode(name)) > MAX_NAME_BYTES and len(clean) > 1:
        folder = os.fsencode(str(PurePosixPath(*clean[:-1])))
        name = f"~{hashlib.sha256(folder).hexdigest()[:2 * _HASH_CHARS]}/{clean[-1]}"
    return name


def _same_file(a: os.stat_result, b: Optional[tuple[int, int]]) -> bool:
    return b is not None and (a.st_dev, a.st_ino) == b


def _walk(folder: Path, exclude: Optional[tuple[int, int]] = None) -> Iterator[Path]:
    """Image files under ``folder``, recursively, in a stable (sorted) order; symlinked folders
    are not followed and the folder ``exclude`` (``(st_dev, st_ino)``: the output folder) is never
    entered."""
    for root, dirs, files in os.walk(folder):
        keep = []
        for d in sorted(dirs):
            try:
                st = os.lstat(os.path.join(root, d))
            except OSError:
                continue
            if _same_file(st, exclude):
                log.info("not listing %s: it is the output folder", os.path.join(root, d))
                continue
            keep.append(d)
        dirs[:] = keep
        for f in sorted(files):
            if Path(f).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(root) / f


def iter_inputs(inputs: Sequence[str], exclude: Optional[Path] = None) -> Iterator[Item]:
    """Expand INPUT arguments (files, folders, list files) to :class:`Item` s, lazily; UsageError
    for an argument that does not exist. ``exclude``: a folder never listed (the output folder).

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     for rel in ("photos/a.jpg", "photos/sub/b.png", "photos/notes.txt"):
        ...         (Path(d) / rel).parent.mkdir(parents=True, exist_ok=True)
        ...         _ = (Path(d) / rel).write_bytes(b"")
        ...     [it.name for it in iter_inputs([f"{d}/photos"])]
        ['photos/a.jpg', 'photos/sub/b.png']
    """
    skip: Optional[tuple[int, int]] = None
    if exclude is not None:
        try:
            st = os.stat(exclude)
            skip = (st.st_dev, st.st_ino)
        except OSError:
            skip = None
    for arg in inputs:
        p = Path(arg)
        try:
            st = os.stat(p)
        except OSError:
            if os.path.lexists(p):  # a dangling link: its own error record
                yield Item(str(p), _safe_name([p.name]))
                continue
            raise UsageError(f"invalid value for INPUT: {_cut(arg)} does not exist (expected an "
                             f"image file, a folder or a .txt list of paths)") from None
        if stat.S_ISDIR(st.st_mode):
            if _same_file(st, skip):
                log.warning("not listing %s: it is the output folder", p)
                continue
            base = _short_component(p.resolve().name or "root")
            for f in _walk(p, skip):
                yield Item(str(f), _safe_name([base, *f.relative_to(p).parts]))
        elif p.suffix.lower() in LIST_SUFFIXES:
            yield from _iter_list(p)
        else:
            yield Item(str(p), _safe_name([p.name]))


def _is_binary(head: bytes) -> bool:
    """Whether the first bytes of a list file are not text: two NUL bytes in a row, more than 10%
    control bytes (other than tab, line feed, carriage return, form feed, vertical tab) or more than
    30% bytes that are not UTF-8."""
    if not head:
        return False
    if b"\x00\x00" in head:
        return True
    control = sum(1 for b in head if b < 32 and b not in (9, 10, 11, 12, 13))
    if control > 0.10 * len(head):
        return True
    text = head.decode("utf-8", "surrogateescape")
    bad = sum(1 for c in text if "\udc80" <= c <= "\udcff")
    return bad > 0.30 * len(head)


def _iter_list(list_file: Path) -> Iterator[Item]:
    """The entries of a list file, one path per line, read as bytes (names that are not UTF-8 are
    kept with ``os.fsdecode``). A list that is not a regular file, cannot be read or is not text
    is one error record; so is each entry with a NUL byte or longer than
    :data:`MAX_LIST_ENTRY_BYTES`."""
    folder = list_file.parent
    where = str(list_file)
    try:
        fh = _open_regular(list_file)
    except _Refused as exc:
        yield Item(where, "", (exc.type, f"list file: {exc.reason}"))
        return
    except OSError as exc:
        yield Item(where, "", ("UnreadableFile", f"cannot read list file: {_os_reason(exc)}"))
        return
    with os.fdopen(fh, "rb") as f:
        head = f.read(8192)
        if _is_binary(head):
            yield Item(where, "", ("InvalidList", "not a text list of paths (binary data in its "
                                                  "first 8 KiB): one path per line expected"))
            return
        f.seek(0)
        lineno = 0
        while True:
            raw = f.readline(MAX_LIST_ENTRY_BYTES + 2)
            if not raw:
                break
            lineno += 1
            if not raw.endswith(b"\n") and len(raw) > MAX_LIST_ENTRY_BYTES:
                while raw and not raw.endswith(b"\n"):  # skip the rest of the line
                    raw = f.readline(65536)
                yield Item(f"{where}:{lineno}", "", (
                    "InvalidListEntry", f"{_cut(where)} line {lineno}: longer than "
                                        f"{MAX_LIST_ENTRY_BYTES} bytes"))
                continue
            entry = raw.strip()
            if not entry or entry.startswith(b"#"):
                continue
            text = os.fsdecode(entry)
            if b"\x00" in entry:
                yield Item(text, "", ("InvalidListEntry",
                                      f"{_cut(where)} line {lineno}: a NUL byte in the path"))
                continue
            p = Path(text)
            full = p if p.is_absolute() else folder / p
            parts = p.parts[1:] if p.is_absolute() else p.parts
            yield Item(str(full), _safe_name(list(parts)))


def _unique(items: Iterable[Item], skip: set[str], counts: dict[str, int],
            reserved: Iterable[str] = ()) -> Iterator[Item]:
    """Drop repeated paths and paths in ``skip`` (counted in ``counts["skipped"]``); make clashing
    output names unique (``name~2``), also against ``reserved`` (the names of a resumed run's
    results). Items with an ``error`` pass through untouched."""
    seen_paths: set[str] = set()
    used: set[str] = set(reserved)
    for it in items:
        if it.error is not None:
            yield it
            continue
        if it.path in seen_paths:
            continue
        if it.path in skip:
            seen_paths.add(it.path)
            counts["skipped"] = counts.get("skipped", 0) + 1
            continue
        seen_paths.add(it.path)
        name, n = it.name, 1
        while name in used:
            n += 1
            name = f"{it.name}~{n}"
        used.add(name)
        yield it if name == it.name else Item(it.path, name)


# -- reading files ------------------------------------------------------------------------------------

class _Refused(Exception):
    """A file refused before or while reading it: ``type`` and ``reason`` of its error record."""

    def __init__(self, type: str, reason: str) -> None:
        super().__init__(reason)
        self.type = type
        self.reason = reason


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFDIR: "a folder", stat.S_IFLNK: "a symlink"}


def _os_reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _open_regular(path: str | Path) -> int:
    """A read-only descriptor of a regular file: refused (:class:`_Refused`) without opening it
    when ``stat`` says it is anything else (a FIFO would block, a device never ends), and checked
    again with ``fstat`` on the descriptor (opened with ``O_NONBLOCK``: a file swapped for a FIFO
    in between cannot block the open)."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise _Refused("NotARegularFile", f"not a regular file ({_KINDS.get(stat.S_IFMT(st.st_mode), 'special')}); "
                                          f"only regular files are read")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | \
        getattr(os, "O_NOCTTY", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _Refused("NotARegularFile", "not a regular file (it changed while opening); only "
                                              "regular files are read")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_file(path: str | Path, max_size: int = DEFAULT_MAX_FILE_SIZE) -> bytes:
    """The bytes of a regular file of at most ``max_size`` bytes, read with a bounded read.
    :class:`_Refused` for a special file or a larger one; OSError when it cannot be read."""
    fd = _open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > max_size:
            raise _Refused("FileTooLarge", f"file too large: {size} bytes (the limit is {max_size} "
                                           f"bytes; raise it with --max-file-size)")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(max_size + 1 - total, 2**22) or 1)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_size:  # it grew while being read
                raise _Refused("FileTooLarge", f"file too large: more than {max_size} bytes (the "
                                               f"limit; raise it with --max-file-size)")
        return b"".join(chunks)
    finally:
        os.close(fd)


# -- decoding -----------------------------------------------------------------------------------------

@dataclass
class Decoded:
    """A decoded image: the preprocessed tensor, the original size and (for overlays) a copy of
    the image with a long side of at most :data:`OVERLAY_MAX_SIDE`. ``nbytes``: what it holds."""

    item: Item
    tensor: torch.Tensor
    size: tuple[int, int]  # (H, W)
    image: Optional[Image.Image] = None
    nbytes: int = 0


@dataclass
class Failed:
    """A file that could not be read, decoded or written."""

    item: Item
    type: str
    reason: str


Outcome = Union[Decoded, Failed]


def _bounded_copy(img: Image.Image, side: int = OVERLAY_MAX_SIDE) -> Image.Image:
    """``img`` itself when its long side is within ``side``, else a bilinear copy that fits."""
    w, h = img.size
    if max(w, h) <= side:
        return img
    scale = side / max(w, h)
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)


def _load(item: Item, meta: GraphMeta, keep_image: bool, max_pixels: int,
          max_file_size: int = DEFAULT_MAX_FILE_SIZE) -> Outcome:
    """Read, decode and preprocess one file; every failure is a :class:`Failed` (never raises)."""
    if item.error is not None:
        return Failed(item, *item.error)
    try:
        data = read_file(item.path, max_file_size)
        img = decode_image(data, max_pixels=max_pixels)
        del data
        x = preprocess(img, meta.input_size, meta.mean, meta.std,
                       interpolation=meta.spec.interpolation)
        size = (img.height, img.width)
        kept = _bounded_copy(img) if keep_image else None
        del img
        nbytes = x.element_size() * x.nelement()
        if kept is not None:
            nbytes += kept.width * kept.height * 3
        return Decoded(item, x, size, kept, nbytes)
    except _Refused as exc:
        return Failed(item, exc.type, exc.reason)
    except ImageError as exc:
        return Failed(item, exc.type, str(exc))
    except OSError as exc:
        return Failed(item, "UnreadableFile", f"cannot read file: {_os_reason(exc)}")
    except MemoryError:
        return Failed(item, "OutOfMemory", "not enough memory to decode this file")
    except Exception as exc:  # a bug or a decoder surprise: this item's error, the job goes on
        return _internal(item, exc)


def _internal(item: Item, exc: BaseException) -> Failed:
    """An unexpected exception while handling one item: its error record, with a short id that
    also names the traceback in the log."""
    eid = uuid.uuid4().hex[:8]
    log.warning("internal error %s on %s", eid, _cut(item.path), exc_info=exc)
    return Failed(item, "InternalError", f"internal error {eid}: {type(exc).__name__}")


class ByteBudget:
    """Bytes held between decoding and writing, shared by the pool's threads: ``add`` when a
    decode is done, ``release`` when the item's files are written. ``over()`` tells the decode
    window to stop reading ahead and the job to run the batch it has."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.peak = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.held += n
            self.peak = max(self.peak, self.held)

    def release(self, n: int) -> None:
        with self._lock:
            self.held -= n

    def over(self) -> bool:
        return self.held >= self.limit


def _decoded_stream(items: Iterable[Item], pool: ThreadPoolExecutor, window: int, meta: GraphMeta,
                    keep_image: bool, max_pixels: int,
                    pending: Optional[deque[Future[Outcome]]] = None,
                    budget: Optional[ByteBudget] = None,
                    max_file_size: int = DEFAULT_MAX_FILE_SIZE) -> Iterator[Outcome]:
    """Decode in ``pool`` with at most ``window`` images in flight and, with a ``budget``, no new
    read while the bytes held are over it; yield outcomes in input order. A read is charged to the
    budget when it is submitted (the tensor's size, plus for overlays the average copy so far,
    or a 2048x1536 one), then corrected to what its outcome holds. ``pending`` (if given) is the
    deque of in-flight decodes, for the caller to wait on or cancel."""
    pending = deque() if pending is None else pending
    h, w = meta.input_size
    tensor_bytes = 3 * int(h) * int(w) * 4
    seen = {"n": 0, "bytes": 0}

    def estimate() -> int:
        if not keep_image:
            return tensor_bytes
        avg = seen["bytes"] // seen["n"] if seen["n"] else OVERLAY_MAX_SIDE * 1536 * 3
        return tensor_bytes + avg

    def load(it: Item, est: int) -> Outcome:
        out = _load(it, meta, keep_image, max_pixels, max_file_size)
        if budget is not None:
            held = out.nbytes if isinstance(out, Decoded) else 0
            budget.add(held - est)
            if isinstance(out, Decoded) and keep_image:
                seen["n"] += 1
                seen["bytes"] += max(0, held - tensor_bytes)
        return out

    for it in items:
        while pending and (len(pending) >= window or (budget is not None and budget.over())):
            yield pending.popleft().result()
        est = estimate() if budget is not None else 0
        if budget is not None:
            budget.add(est)
        pending.append(pool.submit(load, it, est))
    while pending:
        yield pending.popleft().result()


# -- outputs ------------------------------------------------------------------------------------------

_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0) | \
    getattr(os, "O_CLOEXEC", 0)


def _open_folder(out_dir: Path, parts: Sequence[str]) -> int:
    """A descriptor of ``out_dir/parts...``, creating the folders, never through a symlink inside
    ``out_dir`` (OSError ``ELOOP``/``ENOTDIR`` then). ``out_dir`` itself is the user's choice and
    may be reached through links."""
    os.makedirs(out_dir, exist_ok=True)
    fd = os.open(out_dir, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        for part in parts:
            try:
                os.mkdir(part, 0o777, dir_fd=fd)
            except FileExistsError:
                pass
            nfd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nfd
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_file(out_dir: Path, rel: str, data: bytes) -> None:
    """Write ``data`` to ``out_dir/rel`` atomically: a new temporary file in the same folder
    (``O_CREAT|O_EXCL|O_NOFOLLOW``), then ``os.replace``, which replaces an existing symlink
    itself, never its target. Folders are created without following symlinks."""
    parts = rel.split("/")
    dfd = _open_folder(out_dir, parts[:-1])
    try:
        tmp = f".~{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_CLOEXEC", 0), 0o644, dir_fd=dfd)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, parts[-1], src_dir_fd=dfd, dst_dir_fd=dfd)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except OSError:
                pass
            raise
    finally:
        os.close(dfd)


#: pixels of full-resolution heatmaps made at the same time (upsampling, normalising, the box
#: and the PNG take about 20 bytes per pixel): a 24 MP photo's map is made alone
MAP_PIXELS_AT_ONCE = 16_000_000


class PixelGate:
    """Lets threads make full-resolution maps together while their pixels sum to at most
    ``limit``; one map is always let through, however large."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        with self._cond:
            while self.in_use and self.in_use + pixels > self.limit:
                self._cond.wait()
            self.in_use += pixels
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= pixels
                self._cond.notify_all()


_MAP_GATE = PixelGate(MAP_PIXELS_AT_ONCE)


@dataclass
class BatchResult:
    """One image's results line, waiting for its heatmap, bbox and files."""

    line: dict[str, Any]
    files: Future[tuple[dict[str, str], Optional[list[int]]]]


def _finish_image(out_dir: Path, d: Decoded, cam: np.ndarray,
                  save: Sequence[str]) -> tuple[dict[str, str], Optional[list[int]]]:
    """Heatmap at the original size (:func:`camserve.heatmaps_at_sizes`, as the handler), its
    bounding box, and the chosen files of one image; returns ({kind: path under out_dir}, bbox).
    The overlay is drawn on the bounded copy (long side at most :data:`OVERLAY_MAX_SIDE`). Files
    are written with :func:`write_file`. Maps of large images wait for each other
    (:data:`MAP_PIXELS_AT_ONCE`). Runs in the pool, overlapped with the next session run."""
    with _MAP_GATE.hold(d.size[0] * d.size[1]):
        return _make_files(out_dir, d, cam, save)


def _make_files(out_dir: Path, d: Decoded, cam: np.ndarray,
                save: Sequence[str]) -> tuple[dict[str, str], Optional[list[int]]]:
    heatmap = heatmaps_at_sizes(torch.from_numpy(cam[None]), [d.size])[0]
    bbox = bbox_from_heatmap(heatmap)
    written: dict[str, str] = {}
    for kind in save:
        rel = d.item.name + SAVE_SUFFIXES[kind]
        if kind == "heatmap":
            data = heatmap_png(heatmap)
        elif kind == "overlay":
            if d.image is None:
                raise RuntimeError(f"{_cut(d.item.path)}: the decoded image was not kept for its "
                                   f"overlay")
            small = heatmap
            if d.image.size != (heatmap.shape[1], heatmap.shape[0]):
                small = np.asarray(Image.fromarray(heatmap, "L").resize(d.image.size,
                                                                        Image.BILINEAR))
            data = overlay_png(d.image, small)
        else:
            buf = io.BytesIO()
            np.save(buf, cam.astype(np.float32, copy=False))
            data = buf.getvalue()
        write_file(out_dir, rel, data)
        written[kind] = rel
    return written, bbox


def finish_image(out_dir: Path, d: Decoded, cam: np.ndarray,
                 save: Sequence[str]) -> Union[tuple[dict[str, str], Optional[list[int]]], Failed]:
    """:func:`_finish_image`, with a failure (a name the filesystem refuses, a symlinked output
    folder, a full disk, ...) returned as this item's :class:`Failed` record."""
    try:
        return _finish_image(out_dir, d, cam, save)
    except OSError as exc:
        what = "name too long for the filesystem" if exc.errno == errno.ENAMETOOLONG else (
            "a symlink or non-folder in the output path" if exc.errno in (errno.ELOOP,
                                                                           errno.ENOTDIR)
            else _os_reason(exc))
        return Failed(d.item, "UnwritableOutput", f"cannot write {_cut(d.item.name)}: {what}")
    except MemoryError:
        return Failed(d.item, "OutOfMemory", "not enough memory to make this image's files")
    except Exception as exc:
        return _internal(d.item, exc)


def probabilities(logits: np.ndarray) -> torch.Tensor:
    """Softmax of a session's logits (float32, per row)."""
    return torch.softmax(torch.from_numpy(np.asarray(logits)).float(), dim=1)


def result_lines(items: Sequence[Item], sizes: Sequence[tuple[int, int]], logits: np.ndarray,
                 cams: Optional[np.ndarray], target: int, topk: int, meta: GraphMeta,
                 method: str) -> list[Union[dict[str, Any], Failed]]:
    """The results.jsonl lines of one session run (bbox and files are filled in when each heatmap
    is done): the :class:`camserve.records.Prediction` records of the top-k and of the explained
    class (``target`` -1: each image's top-1). An image whose scores or map are not finite gets a
    :class:`Failed` record instead (``InvalidOutput``). Shared by the local job and the Ray
    actors."""
    probs = probabilities(logits)
    out: list[Union[dict[str, Any], Failed]] = []
    for j, (item, size) in enumerate(zip(items, sizes)):
        row = probs[j]
        if not bool(torch.isfinite(row).all()):
            out.append(Failed(item, "InvalidOutput", "the graph returned non-finite scores (NaN "
                                                     "or infinity) for this image"))
            continue
        if cams is not None and not bool(np.isfinite(cams[j]).all()):
            out.append(Failed(item, "InvalidOutput", "the graph returned a non-finite CAM (NaN "
                                                     "or infinity) for this image"))
            continue
        values = row.tolist()
        preds = top_predictions(values, meta.labels, topk)
        t = preds[0].index if target < 0 else target
        explained = Prediction(t, meta.labels[t], float(values[t])).to_json()
        out.append({"path": item.path, "name": item.name, "width": size[1], "height": size[0],
                    "topk": [p.to_json() for p in preds], "target": explained["index"],
                    "label": explained["label"], "score": explained["score"], "bbox": None,
                    "method": method, "layer": meta.layer})
    return out


def encode_line(obj: dict[str, Any]) -> str:
    """One JSON line (without the newline), always valid UTF-8 JSON: ``allow_nan=False`` (a NaN
    raises ValueError instead of writing invalid JSON); non-ASCII text is written as is, except in
    a line holding a name that is not UTF-8 (undecodable bytes kept as surrogates, see
    :class:`Item`): that line is written with every non-ASCII character ``\\uXXXX``-escaped, and
    ``os.fsencode(json.loads(line)["path"])`` gives the original bytes back.

    Example::

        >>> encode_line({"path": "caf\u00e9.jpg"})
        '{"path": "caf\u00e9.jpg"}'
        >>> encode_line({"path": os.fsdecode(b"caf\\xe9.jpg")})
        '{"path": "caf\\\\udce9.jpg"}'
    """
    text = json.dumps(obj, ensure_ascii=False, allow_nan=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, ensure_ascii=True, allow_nan=False)
    return text


@contextmanager
def _deferred_interrupt() -> Iterator[None]:
    """Hold back SIGINT while whole lines are written (the main thread only): a Ctrl-C that comes
    in between raises KeyboardInterrupt when the lines are out, so results.jsonl never ends in a
    torn line because of it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    except (ValueError, OSError):  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if got:
        raise KeyboardInterrupt


def _open_out(path: Path, append: bool) -> BinaryIO:
    """results.jsonl / errors.jsonl opened without following a symlink: a symlink (or other
    non-file) at that name is removed and a new file made when starting over, refused on resume."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        if append:
            raise UsageError(f"invalid output folder: {_cut(str(path))} is not a regular file (a "
                             f"symlink?); --resume refuses to append to it")
        log.warning("%s is not a regular file (a symlink?): replacing it with a new file", path)
        os.unlink(path)
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= os.O_APPEND if append else os.O_TRUNC
    return os.fdopen(os.open(path, flags, 0o644), "ab" if append else "wb")


class Outputs:
    """results.jsonl and errors.jsonl: lines collected, then written (whole lines, Ctrl-C held
    back meanwhile) and flushed per batch. On resume, ``done`` holds the paths and ``names`` the
    output names already in results.jsonl (the names stay reserved: a new input with the same
    relative name gets ``name~2``)."""

    def __init__(self, out_dir: Path, resume: bool) -> None:
        self.out_dir = out_dir
        self.done: set[str] = set()
        self.names: set[str] = set()
        self.malformed = 0
        out_dir.mkdir(parents=True, exist_ok=True)
        res_path, err_path = out_dir / RESULTS, out_dir / ERRORS
        if resume:
            self.done, self.names, self.malformed = _read_done(res_path)
        elif res_path.exists() and res_path.stat().st_size:
            log.warning("%s exists and --resume was not given: starting over", res_path)
        self.results = _open_out(res_path, append=resume)
        self.errors = _open_out(err_path, append=False)  # failures are retried on resume
        self._results: list[str] = []
        self._errors: list[str] = []
        self.ok = 0
        self.failed = 0

    def result(self, line: dict[str, Any]) -> bool:
        """Queue one results line; a line that is not valid JSON (a NaN) becomes an error record
        instead (False)."""
        try:
            text = encode_line(line)
        except ValueError as exc:
            self.error(Failed(Item(str(line.get("path")), str(line.get("name"))), "InvalidOutput",
                              f"the result is not valid JSON: {_cut(str(exc))}"))
            return False
        self._results.append(text + "\n")
        self.ok += 1
        return True

    def error(self, f: Failed) -> None:
        self._errors.append(encode_line({"path": f.item.path, "type": f.type,
                                         "reason": f.reason}) + "\n")
        self.failed += 1

    def flush(self) -> None:
        with _deferred_interrupt():
            for fh, lines in ((self.results, self._results), (self.errors, self._errors)):
                if lines:
                    fh.write("".join(lines).encode("utf-8"))
                    lines.clear()
                fh.flush()

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.results.close()
            self.errors.close()


def _read_lines(fh: BinaryIO, limit: int) -> Iterator[tuple[bytes, bool]]:
    """``(line, whole)`` of a binary file, each at most ``limit`` bytes read into memory: a longer
    line is returned cut, with ``whole`` False. The last line may lack its newline."""
    while True:
        raw = fh.readline(limit + 1)
        if not raw:
            return
        if len(raw) > limit and not raw.endswith(b"\n"):
            rest = raw
            while rest and not rest.endswith(b"\n"):
                rest = fh.readline(65536)
            yield raw[:limit], False
            continue
        yield raw, True


def _read_done(path: Path) -> tuple[set[str], set[str], int]:
    """(paths, output names, malformed lines) of results.jsonl. Malformed lines (not JSON, no
    string ``path``, over :data:`MAX_RESULT_LINE_BYTES`) are skipped and counted, and stay in the
    file; only a torn last line (no newline: an interrupted write) is cut off."""
    done: set[str] = set()
    names: set[str] = set()
    malformed = 0
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return done, names, malformed
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"invalid output folder: {_cut(str(path))} is not a regular file (a "
                         f"symlink?); --resume refuses to read it")
    end = 0
    torn = False
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as fh:
        for raw, whole in _read_lines(fh, MAX_RESULT_LINE_BYTES):
            if whole and not raw.endswith(b"\n"):
                torn = True
                break
            end = fh.tell()
            try:
                line = json.loads(raw) if whole else None
            except ValueError:
                line = None
            if not isinstance(line, dict) or not isinstance(line.get("path"), str):
                malformed += 1
                continue
            done.add(line["path"])
            if isinstance(line.get("name"), str):
                names.add(line["name"])
    if malformed:
        log.warning("%s: skipped %d malformed line(s); their images are done again", path,
                    malformed)
    if torn:
        log.warning("%s: dropping an incomplete last line (interrupted run)", path)
        fd = os.open(path, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        try:
            os.ftruncate(fd, end)
        finally:
            os.close(fd)
    return done, names, malformed


# -- the job ------------------------------------------------------------------------------------------

@dataclass
class JobConfig:
    """Options of :func:`run_job` (the command line's, validated)."""

    model: Path
    inputs: list[str]
    out: Path
    batch_size: int = 32
    threads: Optional[int] = None
    workers: Optional[int] = None
    method: Optional[str] = None
    save: tuple[str, ...] = ("heatmap",)
    resume: bool = False
    device: str = "cpu"
    target: Optional[str] = None
    topk: Optional[int] = None
    progress: Optional[bool] = None
    max_pixels: Optional[int] = None
    overlap: Optional[bool] = None
    max_file_size: int = DEFAULT_MAX_FILE_SIZE
    window_bytes: int = DEFAULT_WINDOW_BYTES
    metrics: tuple[str, ...] = ()
    metrics_steps: int = 50
    metrics_baseline: str = "mean"


@dataclass
class JobStats:
    """What :func:`run_job` did."""

    ok: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    session_seconds: float = 0.0
    providers: list[str] = field(default_factory=list)
    malformed: int = 0
    peak_window_bytes: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    metrics_images: int = 0
    metrics_seconds: float = 0.0
    metrics_runs_per_image: int = 0

    @property
    def exit_status(self) -> int:
        """0 when every image succeeded, 3 when some failed."""
        return EXIT_PARTIAL if self.failed else EXIT_OK


def default_threads() -> int:
    """onnxruntime intra-op threads: the CPUs this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _resolve_target(value: Optional[str], labels: Sequence[str]) -> int:
    """``--target`` as a class index, -1 (each image's top-1 class) when not given; labels match
    as on the server (exact, then case-insensitive: :func:`camserve.records.resolve_target`)."""
    if value is None:
        return -1
    try:
        return resolve_target(value, labels, allow_top1=True, what="--target")
    except TargetError as exc:
        raise UsageError(str(exc)) from None


#: longest label or layer name a graph may record (they are copied into every results line)
MAX_LABEL_CHARS = 1024


def check_meta(meta: GraphMeta) -> None:
    """The graph's metadata within sane bounds, before any image: finite mean, finite std > 0,
    input size within 8..4096, labels and layer name of at most :data:`MAX_LABEL_CHARS`
    characters. UsageError naming the key and what is allowed."""
    def bad(key: str, value: Any, allowed: str) -> UsageError:
        return UsageError(f"invalid value for --model: graph metadata {key!r} is {_cut(value)} "
                          f"(allowed: {allowed})")

    if not all(math.isfinite(v) for v in meta.mean):
        raise bad("mean", meta.mean, "3 finite numbers")
    if not all(math.isfinite(v) and v > 0 for v in meta.std):
        raise bad("std", meta.std, "3 finite numbers > 0")
    h, w = meta.input_size
    if not (8 <= h <= 4096 and 8 <= w <= 4096):
        raise bad("input_size", meta.input_size, "8..4096 per side")
    long = [v for v in (*meta.labels, meta.layer) if len(v) > MAX_LABEL_CHARS]
    if long:
        raise bad("labels", long[0], f"labels and layer of at most {MAX_LABEL_CHARS} characters")
    if not meta.labels:
        raise bad("labels", [], "at least one label")


def check_session(meta: GraphMeta, inputs: Sequence[Any], outputs: Sequence[Any],
                  target: int) -> None:
    """The metadata against the session's inputs and outputs (``NodeArg`` s with ``name`` and
    ``shape``): input ``input`` (N, 3, H, W) with H, W equal to ``input_size`` where static,
    ``target`` present when a target is fixed, output ``logits`` as wide as the labels where
    static, and a CAM output for every method. UsageError naming what does not fit."""
    def bad(what: str) -> UsageError:
        return UsageError(f"invalid value for --model: the graph's metadata does not fit the graph: "
                          f"{what}")

    ins = {i.name: list(i.shape or []) for i in inputs}
    outs = {o.name: list(o.shape or []) for o in outputs}
    first = inputs[0] if inputs else None
    if first is None or first.name != "input":
        raise bad(f"its first input is {_cut(getattr(first, 'name', None))}, expected 'input'")
    shape = ins["input"]
    if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 3):
        raise bad(f"input 'input' has shape {_cut(shape)}, expected (N, 3, H, W)")
    static = [d for d in shape[2:] if isinstance(d, int)]
    if len(static) == 2 and tuple(shape[2:]) != tuple(meta.input_size):
        raise bad(f"metadata input_size {list(meta.input_size)} but the graph's input is "
                  f"{shape[2]}x{shape[3]}")
    if target >= 0 and "target" not in ins:
        raise bad("--target needs the graph input 'target', which it lacks")
    if "logits" not in outs:
        raise bad("it has no output 'logits'")
    width = outs["logits"][1] if len(outs["logits"]) == 2 else None
    if isinstance(width, int) and width != len(meta.labels):
        raise bad(f"{len(meta.labels)} labels for {width} logits")
    missing = [f"{m} ({o})" for m, o in meta.cam_outputs.items() if o not in outs]
    if missing:
        raise bad(f"no output for method {missing[0]}")


def session_inputs(sess: Any) -> list[Any]:
    """A session's inputs, then its inputs with a default value (``target``: onnxruntime lists it
    among the overridable initializers)."""
    return [*sess.get_inputs(), *sess.get_overridable_initializers()]


@dataclass(frozen=True)
class JobPlan:
    """The validated, resolved options of a job (all picklable, all small: the Ray actors get
    it as is)."""

    model: str              # absolute path of the graph
    out: str                # absolute path of DIR
    cam_output: str
    method: str
    target: int
    topk: int
    save: tuple[str, ...]
    max_pixels: int
    meta: GraphMeta
    max_file_size: int = DEFAULT_MAX_FILE_SIZE
    window_bytes: int = DEFAULT_WINDOW_BYTES


def plan_job(cfg: JobConfig) -> JobPlan:
    """Check ``cfg`` and the graph's metadata (:func:`check_meta`) before anything runs; the one
    option check of the local job and the Ray runner. UsageError naming the option.

    ``max_pixels``: ``cfg.max_pixels`` when given (the command line may raise it), else the
    graph's value capped at :data:`camserve.images.DEFAULT_MAX_PIXELS`."""
    if cfg.batch_size < 1:
        raise UsageError(f"invalid value for --batch-size: {cfg.batch_size} (allowed: 1 or more)")
    for opt, v in (("max-file-size", cfg.max_file_size), ("window-bytes", cfg.window_bytes),
                   ("max-pixels", cfg.max_pixels)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise UsageError(f"invalid value for --{opt}: {_cut(v)} (allowed: 1 or more)")
    if not cfg.model.is_file():
        raise UsageError(f"invalid value for --model: {_cut(str(cfg.model))} does not exist")
    try:
        meta = GraphMeta.from_file(cfg.model)
    except ValueError as exc:
        raise UsageError(f"invalid value for --model: {exc}") from None
    except Exception as exc:  # onnx's own errors for a file that is not a graph at all
        raise UsageError(f"invalid value for --model: cannot read it as an ONNX graph "
                         f"({type(exc).__name__})") from None
    check_meta(meta)
    method = cfg.method or meta.methods[0]
    try:
        cam_output = meta.output_for(method)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    bad = [s for s in cfg.save if s not in SAVE_KINDS]
    if bad:
        raise UsageError(f"invalid value for --save: {_cut(bad[0])} (allowed: "
                         f"{', '.join(SAVE_KINDS)})")
    target = _resolve_target(cfg.target, meta.labels)
    topk = min(cfg.topk or meta.topk, len(meta.labels))
    if topk < 1:
        raise UsageError(f"invalid value for --topk: {cfg.topk} (allowed: 1 or more)")
    if not cfg.inputs:
        raise UsageError("no INPUT given (image files, folders or .txt lists of paths)")
    missing = [a for a in cfg.inputs if not os.path.lexists(a)]
    if missing:
        raise UsageError(f"invalid value for INPUT: {_cut(missing[0])} does not exist (expected "
                         f"an image file, a folder or a .txt list of paths)")
    _check_metrics(cfg)
    if cfg.max_pixels is not None:
        max_pixels = cfg.max_pixels
    else:
        max_pixels = min(meta.max_pixels or DEFAULT_MAX_PIXELS, DEFAULT_MAX_PIXELS)
        if (meta.max_pixels or 0) > DEFAULT_MAX_PIXELS:
            log.warning("the graph's max_pixels %d is above the default %d: using %d (raise it "
                        "with --max-pixels)", meta.max_pixels, DEFAULT_MAX_PIXELS, max_pixels)
    return JobPlan(model=str(cfg.model.resolve()), out=str(cfg.out.resolve()),
                   cam_output=cam_output, method=method.lower(), target=target, topk=topk,
                   save=tuple(cfg.save), max_pixels=max_pixels, meta=meta,
                   max_file_size=cfg.max_file_size, window_bytes=cfg.window_bytes)


def run_job(cfg: JobConfig) -> JobStats:
    """Explain every input image; see the module docstring. UsageError for bad options and for
    graph metadata that does not fit; KeyboardInterrupt (Ctrl-C) after writing whole lines only
    (queued work is cancelled, ``--resume`` continues)."""
    plan = plan_job(cfg)
    meta, target, topk, method = plan.meta, plan.target, plan.topk, plan.method
    threads = cfg.threads or default_threads()
    workers = cfg.workers or min(8, max(2, default_threads()))
    # Overlap decoding with the session when the session leaves CPUs free (a GPU, or fewer
    # threads than CPUs). When it uses every CPU, decoding alongside it only makes its threads
    # wait for preempted ones: decode, heatmaps and files then run between session runs, on
    # every CPU, and the session runs alone.
    overlap = cfg.overlap if cfg.overlap is not None else (
        cfg.device == "cuda" or threads < default_threads())
    stats = JobStats()
    # no spinning: idle onnxruntime threads would take the CPU the decode threads need
    sess = ort_session(cfg.model, device=cfg.device, threads=threads, spinning=False)
    check_session(meta, session_inputs(sess), sess.get_outputs(), target)
    stats.providers = list(sess.get_providers())
    outputs = Outputs(cfg.out, cfg.resume)  # after everything that can fail on bad options
    stats.malformed = outputs.malformed
    in_name = sess.get_inputs()[0].name
    fetch = ["logits", plan.cam_output]
    keep_image = "overlay" in cfg.save
    budget = ByteBudget(plan.window_bytes)
    show = sys.stderr.isatty() if cfg.progress is None else cfg.progress
    bar = tqdm(unit="img", disable=not show, dynamic_ncols=True, smoothing=0.1)
    t0 = time.perf_counter()
    pending: deque[list[BatchResult]] = deque()
    counts: dict[str, int] = {}
    audit_keys = tuple(dict.fromkeys(cfg.metrics))
    means = MetricMeans()
    if audit_keys:
        stats.metrics_runs_per_image = runs_per_image(audit_keys, cfg.metrics_steps)
        log.info("metrics %s: %d session runs per image (%s), %d steps, baseline %s",
                 ",".join(audit_keys), stats.metrics_runs_per_image,
                 cost_help(cfg.metrics_steps), cfg.metrics_steps, cfg.metrics_baseline)

    def drain(keep: int) -> None:
        while len(pending) > keep:
            for r in pending.popleft():
                done = r.files.result()
                if isinstance(done, Failed):
                    outputs.error(done)
                else:
                    r.line["files"], r.line["bbox"] = done
                    outputs.result(r.line)
            outputs.flush()

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="batch_cam")
    inflight: deque[Future[Outcome]] = deque()
    try:
        items = _unique(iter_inputs(cfg.inputs, exclude=cfg.out), outputs.done, counts,
                        reserved=outputs.names)
        stream = _decoded_stream(items, pool, window=2 * cfg.batch_size + workers, meta=meta,
                                 keep_image=keep_image, max_pixels=plan.max_pixels,
                                 pending=inflight, budget=budget,
                                 max_file_size=plan.max_file_size)
        batch: list[Decoded] = []

        def finish(d: Decoded, cam: np.ndarray) -> Any:
            try:
                return finish_image(cfg.out, d, cam, cfg.save)
            finally:
                budget.release(d.nbytes)

        def run_batch() -> None:
            if not overlap or budget.over():  # the CPU phase ends before the session runs
                if not overlap:
                    futures_wait(list(inflight))
                drain(keep=0)
            x = np.stack([d.tensor.numpy() for d in batch])
            feed: dict[str, np.ndarray] = {in_name: x}
            if target >= 0:
                feed["target"] = np.full((len(batch),), target, dtype=np.int64)
            ts = time.perf_counter()
            logits, cams = sess.run(fetch, feed)
            stats.session_seconds += time.perf_counter() - ts
            if logits.ndim != 2 or logits.shape[1] != len(meta.labels):
                raise UsageError(f"invalid value for --model: the graph returned logits of shape "
                                 f"{list(logits.shape)} for {len(meta.labels)} labels")
            lines = result_lines([d.item for d in batch], [d.size for d in batch], logits, cams,
                                 target, topk, meta, method)
            results: list[BatchResult] = []
            kept: list[int] = []
            for j, (d, line) in enumerate(zip(batch, lines)):
                if isinstance(line, Failed):
                    budget.release(d.nbytes)
                    outputs.error(line)
                    continue
                kept.append(j)
                results.append(BatchResult(line, pool.submit(finish, d, cams[j])))
            if audit_keys and kept:
                ta = time.perf_counter()
                rows = audit_batch(sess, torch.from_numpy(x[kept]), cams[kept],
                                   [r.line["target"] for r in results], audit_keys,
                                   steps=cfg.metrics_steps, baseline=cfg.metrics_baseline)
                stats.metrics_seconds += time.perf_counter() - ta
                for r, row in zip(results, rows):
                    r.line["metrics"] = None if row is None else {
                        k: round(v, 6) for k, v in row.items()}
                means.add(rows)
            pending.append(results)
            bar.update(len(batch))
            batch.clear()
            if overlap:
                drain(keep=1)  # the previous batch's lines, while this one's files are written

        for outcome in stream:
            if isinstance(outcome, Failed):
                outputs.error(outcome)
                bar.update(1)
                continue
            batch.append(outcome)
            if len(batch) >= cfg.batch_size or budget.over():
                run_batch()
        if batch:
            run_batch()
        drain(keep=0)
    except BaseException:
        # Ctrl-C or a failure: queued decodes and writes are cancelled, running ones end on
        # their own; only lines already complete are written
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        pool.shutdown(wait=True)
        bar.close()
        outputs.close()
    stats.ok, stats.failed = outputs.ok, outputs.failed
    stats.skipped = counts.get("skipped", 0)
    stats.seconds = time.perf_counter() - t0
    stats.peak_window_bytes = budget.peak
    stats.metrics, stats.metrics_images = means.means(), means.images
    if audit_keys:
        log.info("metrics of %d images in %.1f s: %s", means.images, stats.metrics_seconds,
                 format_means(stats.metrics))
    return stats


def _check_metrics(cfg: JobConfig) -> None:
    """``cfg.metrics`` checked against :data:`camserve.onnx.audit.AUDIT_KEYS`, and its settings."""
    bad = [k for k in cfg.metrics if k not in AUDIT_KEYS]
    if bad:
        raise UsageError(f"invalid value for --metrics: {_cut(bad[0])} "
                         f"(allowed: {', '.join(AUDIT_KEYS)}, all)")
    if cfg.metrics_baseline not in BASELINES:
        raise UsageError(f"invalid value for --metrics-baseline: {_cut(cfg.metrics_baseline)} "
                         f"(allowed: {', '.join(BASELINES)})")
    steps = cfg.metrics_steps
    if cfg.metrics and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise UsageError(f"invalid value for --metrics-steps: {_cut(steps)} (allowed: 1 or more)")


# -- command line -------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export.batch_cam",
        description="Grad-CAM heatmaps for many images with a camserve CAM graph on onnxruntime.",
        epilog="Exit status: 0 all images succeeded, 3 some failed (see DIR/errors.jsonl), "
               "2 usage error, 130 interrupted (--resume continues), 1 other failure.")
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image file, folder (recursive) or .txt file listing paths")
    p.add_argument("--model", required=True, type=Path, help="CAM graph from export.onnx_export")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--batch-size", type=int, default=32, help="images per session run (default 32)")
    p.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: all CPUs)")
    p.add_argument("--workers", type=int, help="decode/write threads (default: min(8, CPUs), >= 2)")
    p.add_argument("--method", help="which CAM output of the graph (default: its first method)")
    p.add_argument("--save", default="heatmap",
                   help=f"comma-separated artefacts per image: {', '.join(SAVE_KINDS)} or none "
                        f"(default heatmap); results.jsonl is always written")
    p.add_argument("--target", help="explain this class (index or label) for every image; "
                                    "default: each image's top-1 class")
    p.add_argument("--topk", type=int, help="predictions per image in results.jsonl "
                                            "(default: the graph's)")
    p.add_argument("--resume", action="store_true",
                   help="skip images already in DIR/results.jsonl")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda uses CUDAExecutionProvider when onnxruntime has it, else CPU")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    p.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="decode while the session runs (default: when the session leaves CPUs "
                        "free, i.e. --device cuda or --threads below the CPU count)")
    lim = p.add_argument_group("limits (see docs/batch.md)")
    lim.add_argument("--max-file-size", type=_parse_bytes, default=DEFAULT_MAX_FILE_SIZE,
                     metavar="BYTES", help="larger input files are refused (default 64M; "
                                           "suffixes K, M, G)")
    lim.add_argument("--max-pixels", type=_parse_bytes, metavar="N",
                     help="larger images are refused (default: the graph's, at most 40000000)")
    lim.add_argument("--window-bytes", type=_parse_bytes, default=DEFAULT_WINDOW_BYTES,
                     metavar="BYTES", help="decoded data held ahead of the session and writes "
                                           "(default 256M)")
    m = p.add_argument_group(
        "faithfulness audit (camserve.onnx.audit)",
        "Score each map through the graph itself: results.jsonl lines get \"metrics\": {key: value} "
        "and the summary line their means. Cost, in session runs per image (each run covers the "
        f"whole batch, as the CAM run): {cost_help()} (with --metrics-steps 50); ROAD also solves "
        "a linear system per step. Example: deletion,insertion,road_morf,avg_drop = "
        f"{runs_per_image(('deletion', 'insertion', 'road_morf', 'avg_drop'))} runs per image.")
    m.add_argument("--metrics", metavar="KEYS",
                   help=f"comma-separated: {', '.join(AUDIT_KEYS)}, or all (default: none)")
    m.add_argument("--metrics-steps", type=int, default=50, metavar="N",
                   help="deletion/insertion steps = session runs per image for each (default 50)")
    m.add_argument("--metrics-baseline", choices=BASELINES, default="mean",
                   help="what replaces removed pixels: each image's mean colour or its blur "
                        "(default mean)")
    r = p.add_argument_group("Ray cluster (camserve.onnx.ray)")
    r.add_argument("--ray", metavar="ADDRESS", help="run on Ray: local (a private Ray, stopped at "
                   "the end), auto, HOST:PORT or ray://HOST:PORT; inputs, graph and DIR must be on "
                   "a filesystem every node sees")
    r.add_argument("--actors", metavar="N|MIN,MAX", help="actor pool size, fixed or autoscaling "
                   "(default: as many as fit, may shrink to 1)")
    r.add_argument("--cpus-per-actor", type=float, metavar="C",
                   help="CPUs per actor = its onnxruntime threads (default 1)")
    r.add_argument("--gpus-per-actor", type=float, metavar="G",
                   help="GPUs per actor (default 0; 1 with --device cuda)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _parse_bytes(text: str) -> int:
    """``1234``, ``64K``, ``64M``, ``2G`` (powers of 1024) -> a positive int."""
    m = re.fullmatch(r"\s*([0-9]{1,15})\s*([kKmMgG]?)[iI]?[bB]?\s*", text)
    if not m or int(m.group(1)) < 1:
        raise argparse.ArgumentTypeError(f"{_cut(text)} (allowed: a positive number of bytes, "
                                         f"optionally with K, M or G)")
    return int(m.group(1)) * 1024 ** " KMG".index((m.group(2) or " ").upper())


def _parse_save(text: str) -> tuple[str, ...]:
    kinds: list[str] = []
    for part in text.split(","):
        k = part.strip().lower()
        if not k or k == "none":
            continue
        if k not in SAVE_KINDS:
            raise UsageError(f"invalid value for --save: {part.strip()!r} (allowed: "
                             f"{', '.join(SAVE_KINDS)}, none)")
        if k not in kinds:
            kinds.append(k)
    return tuple(kinds)


def _parse_metrics(text: Optional[str]) -> tuple[str, ...]:
    if text is None:
        return ()
    try:
        return parse_metric_keys(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _metrics_summary(stats: JobStats) -> str:
    """The summary line's metrics part: means, images, cost (empty without --metrics)."""
    if not stats.metrics_runs_per_image:
        return ""
    return (f"; metrics (mean of {stats.metrics_images} images, {stats.metrics_runs_per_image} "
            f"session runs per image, {stats.metrics_seconds:.1f}s): "
            f"{format_means(stats.metrics) or 'none'}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (0, 3, 2, 130 or 1)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        for opt in ("threads", "workers", "topk"):
            v = getattr(args, opt)
            if v is not None and v < 1:
                raise UsageError(f"invalid value for --{opt}: {v} (allowed: 1 or more)")
        cfg = JobConfig(model=args.model, inputs=list(args.inputs), out=args.out,
                        batch_size=args.batch_size, threads=args.threads, workers=args.workers,
                        method=args.method, save=_parse_save(args.save), resume=args.resume,
                        device=args.device, target=args.target, topk=args.topk,
                        progress=args.progress, overlap=args.overlap,
                        max_file_size=args.max_file_size, max_pixels=args.max_pixels,
                        window_bytes=args.window_bytes, metrics=_parse_metrics(args.metrics),
                        metrics_steps=args.metrics_steps, metrics_baseline=args.metrics_baseline)
        from .ray import ray_options, run_ray_job  # imports ray itself only when it runs

        ray_opts = ray_options(args)  # None without --ray
        if ray_opts is not None and cfg.metrics:
            raise UsageError("--metrics does not run on Ray yet: run the job without --ray")
        stats = run_job(cfg) if ray_opts is None else run_ray_job(cfg, ray_opts, args.verbose)
    except KeyboardInterrupt:
        print("interrupted: run again with --resume to continue", file=sys.stderr)
        if argv is None:  # the program itself: its files are closed and its threads done, so
            # skip the interpreter's teardown (about a second with torch and onnxruntime loaded)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # report it and exit 1; the traceback with -v
        if args.verbose:
            traceback.print_exc()
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    rate = stats.ok / stats.seconds if stats.seconds > 0 else 0.0
    print(f"{stats.ok} images explained, {stats.failed} failed, {stats.skipped} skipped (resume) "
          f"in {stats.seconds:.1f}s ({rate:.1f} images/s, {', '.join(stats.providers)}) -> {args.out}"
          + _metrics_summary(stats))
    if stats.failed:
        print(f"see {args.out / ERRORS}", file=sys.stderr)
    return stats.exit_status


if __name__ == "__main__":  # pragma: no cover - python -m camserve.onnx.batch
    sys.exit(main())

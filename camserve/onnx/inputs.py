"""The reading side of the batch job: listing inputs (files, folders, ``.txt`` lists), output names,
bounded reads of regular files only, and decoding into model inputs (:func:`decoded_stream`).

Every problem with one input is an :class:`Item` error or a :class:`Failed` record, never an
exception that stops the job. The rules (what is refused, how names are made): docs/batch.md.
"""
from __future__ import annotations

import hashlib
import logging
import os
import stat
import threading
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch
from PIL import Image

from ..images import ImageError, decode_image, preprocess
from ..parsing import short_repr
from .format import GraphMeta


log = logging.getLogger("camserve.onnx.batch")

IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif",
                                            ".tiff"})
LIST_SUFFIXES: frozenset[str] = frozenset({".txt", ".lst", ".list"})
#: largest input file read (``--max-file-size``); the read itself is bounded by it
DEFAULT_MAX_FILE_SIZE = 64 * 2**20
#: overlays are drawn on a copy of the image with at most this long side
OVERLAY_MAX_SIDE = 2048
#: an output name's folder or file name longer than this (in bytes) is shortened with a hash; the
#: longest artefact suffix and the temporary name still fit the usual 255-byte limit
MAX_COMPONENT_BYTES = 200
#: an output name longer than this (in bytes) keeps its file name under a hashed folder
MAX_NAME_BYTES = 1024
#: list entries longer than this (in bytes) are refused (PATH_MAX)
MAX_LIST_ENTRY_BYTES = 4096
_HASH_CHARS = 12


class UsageError(ValueError):
    """An option, input or graph the job refuses before any image: its usage error
    (docs/batch.md)."""




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
            raise UsageError(f"invalid value for INPUT: {short_repr(arg)} does not exist (expected an "
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
        fh = open_regular(list_file)
    except Refused as exc:
        yield Item(where, "", (exc.type, f"list file: {exc.reason}"))
        return
    except OSError as exc:
        yield Item(where, "", ("UnreadableFile", f"cannot read list file: {os_reason(exc)}"))
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
                    "InvalidListEntry", f"{short_repr(where)} line {lineno}: longer than "
                                        f"{MAX_LIST_ENTRY_BYTES} bytes"))
                continue
            entry = raw.strip()
            if not entry or entry.startswith(b"#"):
                continue
            text = os.fsdecode(entry)
            if b"\x00" in entry:
                yield Item(text, "", ("InvalidListEntry",
                                      f"{short_repr(where)} line {lineno}: a NUL byte in the path"))
                continue
            p = Path(text)
            full = p if p.is_absolute() else folder / p
            parts = p.parts[1:] if p.is_absolute() else p.parts
            yield Item(str(full), _safe_name(list(parts)))


def unique_items(items: Iterable[Item], skip: set[str], counts: dict[str, int],
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

class Refused(Exception):
    """A file refused before or while reading it: ``type`` and ``reason`` of its error record."""

    def __init__(self, type: str, reason: str) -> None:
        super().__init__(reason)
        self.type = type
        self.reason = reason


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFDIR: "a folder", stat.S_IFLNK: "a symlink"}


def os_reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def open_regular(path: str | Path) -> int:
    """A read-only descriptor of a regular file: refused (:class:`Refused`) without opening it
    when ``stat`` says it is anything else (a FIFO would block, a device never ends), and checked
    again with ``fstat`` on the descriptor (opened with ``O_NONBLOCK``: a file swapped for a FIFO
    in between cannot block the open)."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise Refused("NotARegularFile", f"not a regular file ({_KINDS.get(stat.S_IFMT(st.st_mode), 'special')}); "
                                          f"only regular files are read")
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | \
        getattr(os, "O_NOCTTY", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Refused("NotARegularFile", "not a regular file (it changed while opening); only "
                                              "regular files are read")
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_file(path: str | Path, max_size: int = DEFAULT_MAX_FILE_SIZE) -> bytes:
    """The bytes of a regular file of at most ``max_size`` bytes, read with a bounded read.
    :class:`Refused` for a special file or a larger one; OSError when it cannot be read."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > max_size:
            raise Refused("FileTooLarge", f"file too large: {size} bytes (the limit is {max_size} "
                                           f"bytes; raise it with --max-file-size)")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(max_size + 1 - total, 2**22) or 1)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_size:  # it grew while being read
                raise Refused("FileTooLarge", f"file too large: more than {max_size} bytes (the "
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

    def record(self) -> dict[str, str]:
        """Its errors.jsonl line: ``{"path", "type", "reason"}``."""
        return {"path": self.item.path, "type": self.type, "reason": self.reason}


Outcome = Union[Decoded, Failed]


def _bounded_copy(img: Image.Image, side: int = OVERLAY_MAX_SIDE) -> Image.Image:
    """``img`` itself when its long side is within ``side``, else a bilinear copy that fits."""
    w, h = img.size
    if max(w, h) <= side:
        return img
    scale = side / max(w, h)
    return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)


def load_item(item: Item, meta: GraphMeta, keep_image: bool, max_pixels: int,
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
    except Refused as exc:
        return Failed(item, exc.type, exc.reason)
    except ImageError as exc:
        return Failed(item, exc.type, str(exc))
    except OSError as exc:
        return Failed(item, "UnreadableFile", f"cannot read file: {os_reason(exc)}")
    except MemoryError:
        return Failed(item, "OutOfMemory", "not enough memory to decode this file")
    except Exception as exc:  # a bug or a decoder surprise: this item's error, the job goes on
        return internal_error(item, exc)


def internal_error(item: Item, exc: BaseException) -> Failed:
    """An unexpected exception while handling one item (a bug or a decoder surprise): its error
    record, with a short id that also names the traceback in the log."""
    eid = uuid.uuid4().hex[:8]
    log.warning("internal error %s on %s", eid, short_repr(item.path), exc_info=exc)
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


class _ChargedLoad:
    """:func:`load_item` with each read charged to a :class:`ByteBudget`: when it is submitted
    (:meth:`estimate`: the tensor's size, plus for overlays the mean copy so far, or a 2048x1536
    one before any), then corrected to what its outcome holds. Without a budget, a plain
    :func:`load_item`."""

    def __init__(self, meta: GraphMeta, keep_image: bool, max_pixels: int, max_file_size: int,
                 budget: Optional[ByteBudget]) -> None:
        self.meta, self.keep_image, self.budget = meta, keep_image, budget
        self.max_pixels, self.max_file_size = max_pixels, max_file_size
        h, w = meta.input_size
        self.tensor_bytes = 3 * int(h) * int(w) * 4
        self._copies = 0        # overlay copies decoded so far
        self._copy_bytes = 0    # and their bytes
        self._lock = threading.Lock()

    def estimate(self) -> int:
        """Bytes to charge for a read about to be submitted (0 without a budget)."""
        if self.budget is None:
            return 0
        if not self.keep_image:
            return self.tensor_bytes
        with self._lock:
            avg = self._copy_bytes // self._copies if self._copies else OVERLAY_MAX_SIDE * 1536 * 3
        return self.tensor_bytes + avg

    def __call__(self, item: Item, charged: int) -> Outcome:
        out = load_item(item, self.meta, self.keep_image, self.max_pixels, self.max_file_size)
        if self.budget is not None:
            held = out.nbytes if isinstance(out, Decoded) else 0
            self.budget.add(held - charged)
            if isinstance(out, Decoded) and self.keep_image:
                with self._lock:
                    self._copies += 1
                    self._copy_bytes += max(0, held - self.tensor_bytes)
        return out


def decoded_stream(items: Iterable[Item], pool: ThreadPoolExecutor, window: int, meta: GraphMeta,
                   keep_image: bool, max_pixels: int,
                   pending: Optional[deque[Future[Outcome]]] = None,
                   budget: Optional[ByteBudget] = None,
                   max_file_size: int = DEFAULT_MAX_FILE_SIZE) -> Iterator[Outcome]:
    """Decode in ``pool`` with at most ``window`` images in flight and, with a ``budget``, no new
    read while the bytes held are over it; yield outcomes in input order. Each read is charged to
    the budget when it is submitted and corrected when it is done (:class:`_ChargedLoad`).
    ``pending`` (if given) is the deque of in-flight decodes, for the caller to wait on or
    cancel."""
    pending = deque() if pending is None else pending
    load = _ChargedLoad(meta, keep_image, max_pixels, max_file_size, budget)
    for it in items:
        while pending and (len(pending) >= window or (budget is not None and budget.over())):
            yield pending.popleft().result()
        charged = load.estimate()
        if budget is not None:
            budget.add(charged)
        pending.append(pool.submit(load, it, charged))
    while pending:
        yield pending.popleft().result()

"""The writing side of the batch job: each image's artefacts (heatmap at the original size, bbox,
files written to a temporary name and renamed without following links: :func:`finish_image`), and
``results.jsonl``/``errors.jsonl`` appended with whole lines only, read back by ``--resume``
(:class:`Outputs`). The output layout and its safety rules: docs/batch.md.
"""
from __future__ import annotations

import errno
import io
import json
import logging
import os
import secrets
import signal
import stat
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from ..engine import heatmaps_at_sizes
from ..parsing import short_repr
from ..render import bbox_from_heatmap, heatmap_png, overlay_png
from .inputs import Decoded, Failed, Item, UsageError, internal_error, os_reason


log = logging.getLogger("camserve.onnx.batch")

#: file suffix of each artefact, appended to the item's output name
SAVE_SUFFIXES: dict[str, str] = {"heatmap": ".heatmap.png", "overlay": ".overlay.png",
                                 "npy": ".cam.npy"}
RESULTS, ERRORS = "results.jsonl", "errors.jsonl"
#: a results.jsonl line longer than this is malformed (skipped by --resume)
MAX_RESULT_LINE_BYTES = 2**20



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


def _finish_image(out_dir: Path, d: Decoded, cam: np.ndarray, save: Sequence[str],
                  extra: Optional[Mapping[str, Callable[[], bytes]]] = None
                  ) -> tuple[dict[str, str], Optional[list[int]]]:
    """Heatmap at the original size (:func:`camserve.heatmaps_at_sizes`, as the handler), its
    bounding box, and the chosen files of one image; returns ({kind: path under out_dir}, bbox).
    The overlay is drawn on the bounded copy (long side at most :data:`camserve.onnx.inputs.OVERLAY_MAX_SIDE`). Files
    are written with :func:`write_file`. Maps of large images wait for each other
    (:data:`MAP_PIXELS_AT_ONCE`). Runs in the pool, overlapped with the next session run."""
    with _MAP_GATE.hold(d.size[0] * d.size[1]):
        written, bbox = _make_files(out_dir, d, cam, save)
        for suffix, make in (extra or {}).items():  # a task's own artefact (a class mask)
            write_file(out_dir, d.item.name + suffix, make())
        return written, bbox


def _make_files(out_dir: Path, d: Decoded, cam: np.ndarray,
                save: Sequence[str]) -> tuple[dict[str, str], Optional[list[int]]]:
    heatmap = heatmaps_at_sizes(torch.from_numpy(cam[None]), [d.size])[0]
    return _write_artefacts(out_dir, d, d.item.name, heatmap, cam, save), bbox_from_heatmap(heatmap)


def _write_artefacts(out_dir: Path, d: Decoded, stem: str, heatmap: np.ndarray, cam: np.ndarray,
                     save: Sequence[str], box: Optional[Sequence[float]] = None) -> dict[str, str]:
    """Write the chosen files of one map (``heatmap`` uint8 at the original size, ``cam`` raw)
    as ``stem`` + their suffix; the overlay draws ``box`` (original pixels) when given. Returns
    ``{kind: path under out_dir}``."""
    written: dict[str, str] = {}
    for kind in save:
        rel = stem + SAVE_SUFFIXES[kind]
        if kind == "heatmap":
            data = heatmap_png(heatmap)
        elif kind == "overlay":
            if d.image is None:
                raise RuntimeError(f"{short_repr(d.item.path)}: the decoded image was not kept for its "
                                   f"overlay")
            small = heatmap
            if d.image.size != (heatmap.shape[1], heatmap.shape[0]):
                small = np.asarray(Image.fromarray(heatmap, "L").resize(d.image.size,
                                                                        Image.BILINEAR))
            sx, sy = d.image.size[0] / heatmap.shape[1], d.image.size[1] / heatmap.shape[0]
            data = overlay_png(d.image, small, box=None if box is None else
                               [box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy])
        else:
            buf = io.BytesIO()
            np.save(buf, cam.astype(np.float32, copy=False))
            data = buf.getvalue()
        write_file(out_dir, rel, data)
        written[kind] = rel
    return written


#: what each explained detection's files are named after: the item's name + ``.det<k>``
BOX_STEM = ".det{k}"


def _make_box_files(out_dir: Path, d: Decoded, cams: np.ndarray, boxes: Sequence[Sequence[float]],
                    save: Sequence[str], inside: bool) -> list[tuple[dict[str, str], Optional[list[int]]]]:
    """Per explained detection ``k`` (``cams[k]`` its raw map, ``boxes[k]`` its box in original
    pixels): the heatmap at the original size — min-max normalised inside the box and zero
    outside with ``inside`` (:func:`camserve.explain.box_heatmap`, as the servers do for
    ``box_normalize`` and gradient-free methods) — its bbox, and the chosen files
    (``<name>.det<k>.heatmap.png`` ...); the overlay draws the box."""
    from ..explain import box_heatmap

    h, w = d.size
    out = []
    for k, box in enumerate(boxes):
        cam = torch.from_numpy(np.ascontiguousarray(cams[k]))
        heatmap = box_heatmap(cam, (w, h), box) if inside else heatmaps_at_sizes(cam[None], [d.size])[0]
        written = _write_artefacts(out_dir, d, d.item.name + BOX_STEM.format(k=k), heatmap,
                                   cams[k], save, box)
        out.append((written, bbox_from_heatmap(heatmap)))
    return out


def finish_boxes(out_dir: Path, d: Decoded, cams: np.ndarray, boxes: Sequence[Sequence[float]],
                 save: Sequence[str], inside: bool
                 ) -> Union[list[tuple[dict[str, str], Optional[list[int]]]], Failed]:
    """:func:`_make_box_files` of a detection image (its maps wait for each other as in
    :func:`finish_image`), with a failure returned as the item's :class:`Failed` record."""
    def make() -> list[tuple[dict[str, str], Optional[list[int]]]]:
        with _MAP_GATE.hold(d.size[0] * d.size[1]):
            return _make_box_files(out_dir, d, cams, boxes, save, inside)

    return _or_failed(d, make)


def finish_image(out_dir: Path, d: Decoded, cam: np.ndarray, save: Sequence[str],
                 extra: Optional[Mapping[str, Callable[[], bytes]]] = None
                 ) -> Union[tuple[dict[str, str], Optional[list[int]]], Failed]:
    """:func:`_finish_image`, with a failure (a name the filesystem refuses, a symlinked output
    folder, a full disk, ...) returned as this item's :class:`Failed` record. ``extra``: a task's
    own artefacts, ``{suffix: make the bytes}`` (written as the item's name + suffix)."""
    return _or_failed(d, lambda: _finish_image(out_dir, d, cam, save, extra))


def _or_failed(d: Decoded, make: Callable[[], Any]) -> Any:
    """``make()``, or the item's :class:`Failed` record when its files could not be made (a
    name the filesystem refuses, a symlinked output folder, a full disk, ...)."""
    try:
        return make()
    except OSError as exc:
        what = "name too long for the filesystem" if exc.errno == errno.ENAMETOOLONG else (
            "a symlink or non-folder in the output path" if exc.errno in (errno.ELOOP,
                                                                           errno.ENOTDIR)
            else os_reason(exc))
        return Failed(d.item, "UnwritableOutput", f"cannot write {short_repr(d.item.name)}: {what}")
    except MemoryError:
        return Failed(d.item, "OutOfMemory", "not enough memory to make this image's files")
    except Exception as exc:
        return internal_error(d.item, exc)


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


def encode_result(line: dict[str, Any]) -> Union[str, Failed]:
    """A results line as JSON text (:func:`encode_line`), or, for a line that is not valid JSON
    (a NaN), its image's :class:`Failed` record (``InvalidOutput``)."""
    try:
        return encode_line(line)
    except ValueError as exc:
        return Failed(Item(str(line.get("path")), str(line.get("name"))), "InvalidOutput",
                      f"the result is not valid JSON: {short_repr(str(exc))}")


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
            raise UsageError(f"invalid output folder: {short_repr(str(path))} is not a regular file (a "
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
        text = encode_result(line)
        if isinstance(text, Failed):
            self.error(text)
            return False
        self._results.append(text + "\n")
        self.ok += 1
        return True

    def error(self, f: Failed) -> None:
        self._errors.append(encode_line(f.record()) + "\n")
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


def read_lines(fh: BinaryIO, limit: int) -> Iterator[tuple[bytes, bool]]:
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
        raise UsageError(f"invalid output folder: {short_repr(str(path))} is not a regular file (a "
                         f"symlink?); --resume refuses to read it")
    end = 0
    torn = False
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as fh:
        for raw, whole in read_lines(fh, MAX_RESULT_LINE_BYTES):
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


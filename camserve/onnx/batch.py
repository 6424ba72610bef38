"""Offline batch CAMs: a folder (or list) of images through a camserve CAM graph on onnxruntime.

    python -m export.batch_cam --model model_store/shapes.cam.onnx photos/ more.jpg list.txt \\
        --out cams/ [--batch-size 32] [--threads N] [--workers N] [--method gradcam] \\
        [--save heatmap,overlay,npy] [--target CLASS] [--topk K] [--resume] [--device cpu|cuda] \\
        [--metrics deletion,insertion,road_morf,avg_drop] [--metrics-steps 50] [--metrics-baseline mean]

INPUT is an image file, a folder (searched recursively for image files: .jpg .jpeg .png .bmp .gif
.webp .tif .tiff) or a text file (.txt, .lst, .list) with one path per line (blank lines and lines
starting with # are skipped; relative paths are relative to the text file's folder).

How it runs: image files are read, decoded and preprocessed in a thread pool with
:func:`camserve.images.load_image_file` and :func:`camserve.images.preprocess` (the handler's
code, with the mean/std/input size stored in the graph's metadata), at most a few batches ahead of
the session, so memory stays bounded however many images there are. Raw maps from the graph go
through :func:`camserve.heatmaps_at_sizes` (upsampling to each original size and min-max
normalisation, as the handler does) and :mod:`camserve.render` (PNG, overlay, bounding box) in the
same pool, so a heatmap here equals the handler's for the same image. When the session leaves CPUs
free (``--device cuda``, or ``--threads`` below the CPU count) the pool decodes the next batches
and writes the previous one while onnxruntime runs; when the session uses every CPU, the pool's
work runs between session runs instead, on every CPU — running it alongside would only make
onnxruntime's threads wait for the preempted ones (``--overlap``/``--no-overlap`` overrides).

Output layout, for an input ``photos/cats/a.jpg`` given as the folder ``photos``::

    DIR/photos/cats/a.jpg.heatmap.png   grayscale heatmap at the original size   (--save heatmap)
    DIR/photos/cats/a.jpg.overlay.png   jet colour map blended over the image     (--save overlay)
    DIR/photos/cats/a.jpg.cam.npy       raw float32 map (h, w) from the graph     (--save npy)
    DIR/results.jsonl   one JSON line per image: path, name, width, height, topk [{index, label,
                        score}], target, label, score, bbox [x0, y0, x1, y1] (or null), method,
                        layer, files (+ metrics {key: value} with --metrics)
    DIR/errors.jsonl    one JSON line per file that could not be read: path, type, reason

A file given directly is named by its file name, a list entry by its path relative to the list's
folder. Scores are softmax probabilities. ``--resume`` skips the paths already in results.jsonl (as
written: run from the same folder with the same inputs) and retries the ones in errors.jsonl.

Faithfulness audit (``--metrics``): each image's map is scored through the same session
(:mod:`camserve.onnx.audit`, no PyTorch model needed) with any of the per-image keys of
:mod:`camserve.metrics` (deletion, insertion, road_morf, road_lerf, avg_drop, avg_increase); the
explained class is the line's ``target``. Each perturbation step is one session run of the batch:
``--metrics deletion,insertion,road_morf,avg_drop`` costs 111 runs per image (1 reference + 50 +
50 + 9 + 1) on top of the CAM run. The means over the images go to the summary line (images of
this run only, with ``--resume``).

Exit status: 0 every image succeeded; 3 some images failed (see errors.jsonl); 2 usage error (bad
option, missing input, not a camserve CAM graph); 1 any other failure.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, Optional, Sequence, TextIO, Union

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..engine import heatmaps_at_sizes
from ..images import ImageError, load_image_file, preprocess
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
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_PARTIAL = 0, 1, 2, 3
RESULTS, ERRORS = "results.jsonl", "errors.jsonl"


class UsageError(ValueError):
    """A command-line value that is not allowed (exit status 2)."""


# -- inputs -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Item:
    """One image to process: ``path`` as found (a string, recorded in the JSON lines) and ``name``,
    its relative output name under DIR."""

    path: str
    name: str


def _safe_name(parts: Sequence[str]) -> str:
    clean = [p for p in parts if p not in ("", ".", "/")]
    clean = ["__" if p == ".." else p for p in clean]
    return str(PurePosixPath(*clean)) if clean else "image"


def _walk(folder: Path) -> Iterator[Path]:
    """Image files under ``folder``, recursively, in a stable (sorted) order."""
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for f in sorted(files):
            if Path(f).suffix.lower() in IMAGE_SUFFIXES:
                yield Path(root) / f


def iter_inputs(inputs: Sequence[str]) -> Iterator[Item]:
    """Expand INPUT arguments (files, folders, list files) to :class:`Item` s, lazily; UsageError
    for an argument that does not exist.

    Example::

        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     for rel in ("photos/a.jpg", "photos/sub/b.png", "photos/notes.txt"):
        ...         (Path(d) / rel).parent.mkdir(parents=True, exist_ok=True)
        ...         _ = (Path(d) / rel).write_bytes(b"")
        ...     [it.name for it in iter_inputs([f"{d}/photos"])]
        ['photos/a.jpg', 'photos/sub/b.png']
    """
    for arg in inputs:
        p = Path(arg)
        if p.is_dir():
            base = p.resolve().name or "root"
            for f in _walk(p):
                yield Item(str(f), _safe_name([base, *f.relative_to(p).parts]))
        elif p.is_file() and p.suffix.lower() in LIST_SUFFIXES:
            yield from _iter_list(p)
        elif p.is_file():
            yield Item(str(p), _safe_name([p.name]))
        else:
            raise UsageError(f"invalid value for INPUT: {arg!r} does not exist (expected an image "
                             f"file, a folder or a .txt list of paths)")


def _iter_list(list_file: Path) -> Iterator[Item]:
    folder = list_file.parent
    with list_file.open(encoding="utf-8") as fh:
        for line in fh:
            entry = line.strip()
            if not entry or entry.startswith("#"):
                continue
            p = Path(entry)
            full = p if p.is_absolute() else folder / p
            parts = p.parts[1:] if p.is_absolute() else p.parts
            yield Item(str(full), _safe_name(list(parts)))


def _unique(items: Iterable[Item], skip: set[str], counts: dict[str, int]) -> Iterator[Item]:
    """Drop repeated paths and paths in ``skip`` (counted in ``counts["skipped"]``); make clashing
    output names unique (``name~2``)."""
    seen_paths: set[str] = set()
    used: set[str] = set()
    for it in items:
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


# -- decoding -----------------------------------------------------------------------------------------

@dataclass
class Decoded:
    """A decoded image: the preprocessed tensor, the original size and (for overlays) the image."""

    item: Item
    tensor: torch.Tensor
    size: tuple[int, int]  # (H, W)
    image: Optional[Image.Image] = None


@dataclass
class Failed:
    """A file that could not be read or decoded."""

    item: Item
    type: str
    reason: str


Outcome = Union[Decoded, Failed]


def _load(item: Item, meta: GraphMeta, keep_image: bool, max_pixels: int) -> Outcome:
    try:
        img = load_image_file(item.path, max_pixels=max_pixels)
    except ImageError as exc:
        return Failed(item, exc.type, str(exc))
    except OSError as exc:
        return Failed(item, "UnreadableFile", f"cannot read file: {exc.strerror or exc}")
    x = preprocess(img, meta.input_size, meta.mean, meta.std)
    return Decoded(item, x, (img.height, img.width), img if keep_image else None)


def _decoded_stream(items: Iterable[Item], pool: ThreadPoolExecutor, window: int, meta: GraphMeta,
                    keep_image: bool, max_pixels: int,
                    pending: Optional[deque[Future[Outcome]]] = None) -> Iterator[Outcome]:
    """Decode in ``pool`` with at most ``window`` images in flight; yield outcomes in input order.
    ``pending`` (if given) is the deque of in-flight decodes, for the caller to wait on."""
    pending = deque() if pending is None else pending
    for it in items:
        pending.append(pool.submit(_load, it, meta, keep_image, max_pixels))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


# -- outputs ------------------------------------------------------------------------------------------

@dataclass
class BatchResult:
    """One image's results line, waiting for its heatmap, bbox and files."""

    line: dict[str, Any]
    files: Future[tuple[dict[str, str], Optional[list[int]]]]


def _finish_image(out_dir: Path, d: Decoded, cam: np.ndarray,
                  save: Sequence[str]) -> tuple[dict[str, str], Optional[list[int]]]:
    """Heatmap at the original size (:func:`camserve.heatmaps_at_sizes`, as the handler), its
    bounding box, and the chosen files of one image; returns ({kind: path under out_dir}, bbox).
    Runs in the pool, overlapped with the next session run."""
    heatmap = heatmaps_at_sizes(torch.from_numpy(cam[None]), [d.size])[0]
    bbox = bbox_from_heatmap(heatmap)
    written: dict[str, str] = {}
    if save:
        (out_dir / d.item.name).parent.mkdir(parents=True, exist_ok=True)
    for kind in save:
        if kind == "heatmap":
            rel = d.item.name + ".heatmap.png"
            (out_dir / rel).write_bytes(heatmap_png(heatmap))
        elif kind == "overlay":
            rel = d.item.name + ".overlay.png"
            if d.image is None:
                raise RuntimeError(f"{d.item.path}: the decoded image was not kept for its overlay")
            (out_dir / rel).write_bytes(overlay_png(d.image, heatmap))
        else:
            rel = d.item.name + ".cam.npy"
            np.save(out_dir / rel, cam.astype(np.float32, copy=False))
        written[kind] = rel
    return written, bbox


def _result_line(d: Decoded, probs: Sequence[float], meta: GraphMeta, topk: int, target: int,
                 method: str) -> dict[str, Any]:
    """One image's results line (bbox and files are filled in when its heatmap is done): the
    :class:`camserve.records.Prediction` records of the top-k and of the explained class."""
    preds = top_predictions(probs, meta.labels, topk)
    t = preds[0].index if target < 0 else target
    explained = Prediction(t, meta.labels[t], float(probs[t])).to_json()
    return {"path": d.item.path, "name": d.item.name, "width": d.size[1], "height": d.size[0],
            "topk": [p.to_json() for p in preds], "target": explained["index"],
            "label": explained["label"], "score": explained["score"], "bbox": None,
            "method": method, "layer": meta.layer}


class Outputs:
    """results.jsonl and errors.jsonl, appended line by line and flushed per batch."""

    def __init__(self, out_dir: Path, resume: bool) -> None:
        self.out_dir = out_dir
        self.done: set[str] = set()
        out_dir.mkdir(parents=True, exist_ok=True)
        res_path, err_path = out_dir / RESULTS, out_dir / ERRORS
        if resume:
            self.done = _read_done(res_path)
        elif res_path.exists() and res_path.stat().st_size:
            log.warning("%s exists and --resume was not given: starting over", res_path)
        self.results: TextIO = res_path.open("a" if resume else "w", encoding="utf-8")
        self.errors: TextIO = err_path.open("w", encoding="utf-8")  # failures are retried on resume
        self.ok = 0
        self.failed = 0

    def result(self, line: dict[str, Any]) -> None:
        self.results.write(json.dumps(line, ensure_ascii=False) + "\n")
        self.ok += 1

    def error(self, f: Failed) -> None:
        self.errors.write(json.dumps({"path": f.item.path, "type": f.type, "reason": f.reason},
                                     ensure_ascii=False) + "\n")
        self.failed += 1

    def flush(self) -> None:
        self.results.flush()
        self.errors.flush()

    def close(self) -> None:
        self.results.close()
        self.errors.close()


def _read_done(path: Path) -> set[str]:
    """Paths already in results.jsonl; a torn last line (an interrupted write) is cut off."""
    done: set[str] = set()
    if not path.exists():
        return done
    good_end = 0
    with path.open("rb") as fh:
        for raw in fh:
            if not raw.endswith(b"\n"):
                break
            try:
                done.add(str(json.loads(raw)["path"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                break
            good_end += len(raw)
    if good_end != path.stat().st_size:
        log.warning("%s: dropping an incomplete last line (interrupted run)", path)
        with path.open("r+b") as fh:
            fh.truncate(good_end)
    return done


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


def run_job(cfg: JobConfig) -> JobStats:
    """Explain every input image; see the module docstring. UsageError for bad options."""
    if cfg.batch_size < 1:
        raise UsageError(f"invalid value for --batch-size: {cfg.batch_size} (allowed: 1 or more)")
    if not cfg.model.is_file():
        raise UsageError(f"invalid value for --model: {str(cfg.model)!r} does not exist")
    try:
        meta = GraphMeta.from_file(cfg.model)
    except ValueError as exc:
        raise UsageError(f"invalid value for --model: {exc}") from None
    try:
        cam_output = meta.output_for(cfg.method or meta.methods[0])
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    bad = [s for s in cfg.save if s not in SAVE_KINDS]
    if bad:
        raise UsageError(f"invalid value for --save: {bad[0]!r} (allowed: {', '.join(SAVE_KINDS)})")
    target = _resolve_target(cfg.target, meta.labels)
    n_cls = len(meta.labels)
    topk = min(cfg.topk or meta.topk, n_cls)
    if topk < 1:
        raise UsageError(f"invalid value for --topk: {cfg.topk} (allowed: 1 or more)")
    max_pixels = cfg.max_pixels or meta.max_pixels
    threads = cfg.threads or default_threads()
    workers = cfg.workers or min(8, max(2, default_threads()))
    # Overlap decoding with the session when the session leaves CPUs free (a GPU, or fewer
    # threads than CPUs). When it uses every CPU, decoding alongside it only makes its threads
    # wait for preempted ones: decode, heatmaps and files then run between session runs, on
    # every CPU, and the session runs alone.
    overlap = cfg.overlap if cfg.overlap is not None else (
        cfg.device == "cuda" or threads < default_threads())
    method = (cfg.method or meta.methods[0]).lower()
    audit_keys = _check_metrics(cfg)

    missing = [a for a in cfg.inputs if not Path(a).exists()]
    if missing:
        raise UsageError(f"invalid value for INPUT: {missing[0]!r} does not exist (expected an image "
                         f"file, a folder or a .txt list of paths)")
    if not cfg.inputs:
        raise UsageError("no INPUT given (image files, folders or .txt lists of paths)")
    stats = JobStats()
    # no spinning: idle onnxruntime threads would take the CPU the decode threads need
    sess = ort_session(cfg.model, device=cfg.device, threads=threads, spinning=False)
    stats.providers = list(sess.get_providers())
    outputs = Outputs(cfg.out, cfg.resume)  # after everything that can fail on bad options
    in_name = sess.get_inputs()[0].name
    fetch = ["logits", cam_output]
    keep_image = "overlay" in cfg.save
    show = sys.stderr.isatty() if cfg.progress is None else cfg.progress
    bar = tqdm(unit="img", disable=not show, dynamic_ncols=True, smoothing=0.1)
    t0 = time.perf_counter()
    pending: deque[list[BatchResult]] = deque()
    counts: dict[str, int] = {}
    means = MetricMeans()
    if audit_keys:
        stats.metrics_runs_per_image = runs_per_image(audit_keys, cfg.metrics_steps)
        log.info("metrics %s: %d session runs per image (%s), %d steps, baseline %s",
                 ",".join(audit_keys), stats.metrics_runs_per_image,
                 cost_help(cfg.metrics_steps), cfg.metrics_steps, cfg.metrics_baseline)

    def drain(keep: int) -> None:
        while len(pending) > keep:
            for r in pending.popleft():
                r.line["files"], r.line["bbox"] = r.files.result()
                outputs.result(r.line)
            outputs.flush()

    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="batch_cam") as pool:
            inflight: deque[Future[Outcome]] = deque()
            stream = _decoded_stream(_unique(iter_inputs(cfg.inputs), outputs.done, counts), pool,
                                     window=2 * cfg.batch_size + workers, meta=meta,
                                     keep_image=keep_image, max_pixels=max_pixels, pending=inflight)
            batch: list[Decoded] = []

            def run_batch() -> None:
                if not overlap:  # the CPU phase ends before the session takes every core
                    futures_wait(list(inflight))
                    drain(keep=0)
                x = np.stack([d.tensor.numpy() for d in batch])
                feed: dict[str, np.ndarray] = {in_name: x}
                if target >= 0:
                    feed["target"] = np.full((len(batch),), target, dtype=np.int64)
                ts = time.perf_counter()
                logits, cams = sess.run(fetch, feed)
                stats.session_seconds += time.perf_counter() - ts
                probs = torch.softmax(torch.from_numpy(logits).float(), dim=1)
                results: list[BatchResult] = []
                for j, d in enumerate(batch):
                    line = _result_line(d, probs[j].tolist(), meta, topk, target, method)
                    fut = pool.submit(_finish_image, cfg.out, d, cams[j], cfg.save)
                    results.append(BatchResult(line, fut))
                if audit_keys:
                    ta = time.perf_counter()
                    rows = audit_batch(sess, torch.from_numpy(x), cams,
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
                if len(batch) >= cfg.batch_size:
                    run_batch()
            if batch:
                run_batch()
            drain(keep=0)
    finally:
        bar.close()
        outputs.close()
    stats.ok, stats.failed = outputs.ok, outputs.failed
    stats.skipped = counts.get("skipped", 0)
    stats.seconds = time.perf_counter() - t0
    stats.metrics, stats.metrics_images = means.means(), means.images
    if audit_keys:
        log.info("metrics of %d images in %.1f s: %s", means.images, stats.metrics_seconds,
                 format_means(stats.metrics))
    return stats


def _check_metrics(cfg: JobConfig) -> tuple[str, ...]:
    """``cfg.metrics`` checked against :data:`camserve.onnx.audit.AUDIT_KEYS`, and its settings."""
    bad = [k for k in cfg.metrics if k not in AUDIT_KEYS]
    if bad:
        raise UsageError(f"invalid value for --metrics: {bad[0][:100]!r} "
                         f"(allowed: {', '.join(AUDIT_KEYS)}, all)")
    if cfg.metrics_baseline not in BASELINES:
        raise UsageError(f"invalid value for --metrics-baseline: {cfg.metrics_baseline[:100]!r} "
                         f"(allowed: {', '.join(BASELINES)})")
    if cfg.metrics and (isinstance(cfg.metrics_steps, bool) or not isinstance(cfg.metrics_steps, int)
                        or cfg.metrics_steps < 1):
        raise UsageError(f"invalid value for --metrics-steps: {cfg.metrics_steps!r} (allowed: 1 or more)")
    return tuple(dict.fromkeys(cfg.metrics))


# -- command line -------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export.batch_cam",
        description="Grad-CAM heatmaps for many images with a camserve CAM graph on onnxruntime.",
        epilog="Exit status: 0 all images succeeded, 3 some failed (see DIR/errors.jsonl), "
               "2 usage error, 1 other failure.")
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
    """Command-line entry point; returns the exit status (0, 3, 2 or 1)."""
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
                        metrics=_parse_metrics(args.metrics), metrics_steps=args.metrics_steps,
                        metrics_baseline=args.metrics_baseline)
        from .ray import ray_options, run_ray_job  # imports ray itself only when it runs

        ray_opts = ray_options(args)  # None without --ray
        if ray_opts is not None and cfg.metrics:
            raise UsageError("--metrics does not run on Ray yet: run the job without --ray")
        stats = run_job(cfg) if ray_opts is None else run_ray_job(cfg, ray_opts, args.verbose)
    except KeyboardInterrupt:
        print("interrupted: run again with --resume to continue", file=sys.stderr)
        return 130
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

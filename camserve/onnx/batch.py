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
this run only, with ``--resume``). With ``--ray`` each actor scores its batches with its own
session (:func:`audit_lines`, the same code) and the driver takes the means of the lines it writes.

Exit status: 0 every image succeeded; 3 some images failed (see errors.jsonl); 2 usage error (bad
option, missing input, not a camserve CAM graph, graph metadata that does not fit the graph);
130 interrupted (Ctrl-C; ``--resume`` continues); 1 any other failure.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
import time
import traceback
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..images import DEFAULT_MAX_PIXELS
from ..parsing import MAX_INPUT_SIDE, MIN_INPUT_SIDE, parse_choices, short_repr
from ..records import TargetError, parse_target
from .audit import AUDIT_KEYS, BASELINES, MetricMeans, audit_batch, cost_help, format_means, \
    parse_metric_keys, runs_per_image
from .format import GraphMeta
from .inputs import (DEFAULT_MAX_FILE_SIZE, ByteBudget, Decoded, Failed, Outcome, UsageError,
                     _decoded_stream, _unique, iter_inputs)
from .outputs import ERRORS, BatchResult, Outputs, finish_image, result_lines
from .session import ort_session


log = logging.getLogger(__name__)

SAVE_KINDS: tuple[str, ...] = ("heatmap", "overlay", "npy")
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_PARTIAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
#: bytes of decoded data held between decoding and writing (``--window-bytes``): preprocessed
#: tensors plus the bounded overlay copies
DEFAULT_WINDOW_BYTES = 256 * 2**20



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
    as on the server (exact, then case-insensitive: :func:`camserve.records.parse_target`)."""
    if value is None:
        return -1
    try:
        return parse_target(value, labels, allow_top1=True, what="--target")
    except TargetError as exc:
        raise UsageError(str(exc)) from None


#: longest label or layer name a graph may record (they are copied into every results line)
MAX_LABEL_CHARS = 1024


def check_meta(meta: GraphMeta) -> None:
    """The graph's metadata within sane bounds, before any image: finite mean, finite std > 0,
    input size within :data:`camserve.parsing.MAX_INPUT_SIDE`, labels and layer name of at most :data:`MAX_LABEL_CHARS`
    characters. UsageError naming the key and what is allowed."""
    def bad(key: str, value: Any, allowed: str) -> UsageError:
        return UsageError(f"invalid value for --model: graph metadata {key!r} is {short_repr(value)} "
                          f"(allowed: {allowed})")

    if not all(math.isfinite(v) for v in meta.mean):
        raise bad("mean", meta.mean, "3 finite numbers")
    if not all(math.isfinite(v) and v > 0 for v in meta.std):
        raise bad("std", meta.std, "3 finite numbers > 0")
    h, w = meta.input_size
    if not (MIN_INPUT_SIDE <= h <= MAX_INPUT_SIDE and MIN_INPUT_SIDE <= w <= MAX_INPUT_SIDE):
        raise bad("input_size", meta.input_size, f"{MIN_INPUT_SIDE}..{MAX_INPUT_SIDE} per side")
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
        raise bad(f"its first input is {short_repr(getattr(first, 'name', None))}, expected 'input'")
    shape = ins["input"]
    if len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 3):
        raise bad(f"input 'input' has shape {short_repr(shape)}, expected (N, 3, H, W)")
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
    metrics: tuple[str, ...] = ()   # --metrics keys, in order, each once; () = no audit
    metrics_steps: int = 50
    metrics_baseline: str = "mean"


def audit_lines(sess: Any, x: np.ndarray, cams: np.ndarray, lines: Sequence[dict[str, Any]],
                keys: Sequence[str], *, steps: int, baseline: str
                ) -> list[Optional[dict[str, float]]]:
    """``--metrics`` for one batch: :func:`camserve.onnx.audit.audit_batch` through ``sess`` on
    the preprocessed images ``x`` and their raw maps ``cams``, each line's ``target`` explained.
    Sets each line's ``"metrics"`` (values rounded to 6 decimals, ``None`` where the image's
    metrics failed) and returns the unrounded rows, for :class:`~camserve.onnx.audit.MetricMeans`.
    The one implementation of the local job and the Ray actors.

    Example (a stand-in session whose class 0 reads the red of the image's top half)::

        >>> class Session:
        ...     def run(self, fetch, feed):
        ...         red_top = feed["input"][:, 0, :4].mean(axis=(1, 2))
        ...         return [np.stack([20 * (red_top - 0.75), 0 * red_top], axis=1)]
        >>> x = np.zeros((1, 3, 8, 8), np.float32); x[:, 0, :4] = 1.0
        >>> cams = np.zeros((1, 4, 4), np.float32); cams[:, :2] = 1.0
        >>> lines = [{"path": "a.png", "target": 0}]
        >>> rows = audit_lines(Session(), x, cams, lines, ("avg_drop",), steps=4, baseline="mean")
        >>> lines[0]["metrics"] == {"avg_drop": round(rows[0]["avg_drop"], 6)}
        True
    """
    rows = audit_batch(sess, torch.from_numpy(np.ascontiguousarray(x)), cams,
                       [line["target"] for line in lines], keys, steps=steps, baseline=baseline)
    for line, row in zip(lines, rows):
        line["metrics"] = None if row is None else {k: round(v, 6) for k, v in row.items()}
    return rows


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
            raise UsageError(f"invalid value for --{opt}: {short_repr(v)} (allowed: 1 or more)")
    if not cfg.model.is_file():
        raise UsageError(f"invalid value for --model: {short_repr(str(cfg.model))} does not exist")
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
        raise UsageError(f"invalid value for --save: {short_repr(bad[0])} (allowed: "
                         f"{', '.join(SAVE_KINDS)})")
    target = _resolve_target(cfg.target, meta.labels)
    topk = min(cfg.topk or meta.topk, len(meta.labels))
    if topk < 1:
        raise UsageError(f"invalid value for --topk: {cfg.topk} (allowed: 1 or more)")
    if not cfg.inputs:
        raise UsageError("no INPUT given (image files, folders or .txt lists of paths)")
    missing = [a for a in cfg.inputs if not os.path.lexists(a)]
    if missing:
        raise UsageError(f"invalid value for INPUT: {short_repr(missing[0])} does not exist (expected "
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
                   max_file_size=cfg.max_file_size, window_bytes=cfg.window_bytes,
                   metrics=tuple(dict.fromkeys(cfg.metrics)), metrics_steps=cfg.metrics_steps,
                   metrics_baseline=cfg.metrics_baseline)


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
    audit_keys = plan.metrics
    means = MetricMeans()
    start_metrics(plan, stats)

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
                rows = audit_lines(sess, x[kept], cams[kept], [r.line for r in results],
                                   audit_keys, steps=plan.metrics_steps,
                                   baseline=plan.metrics_baseline)
                stats.metrics_seconds += time.perf_counter() - ta
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
    end_metrics(plan, stats, means)
    return stats


def start_metrics(plan: JobPlan, stats: JobStats) -> None:
    """``stats.metrics_runs_per_image`` of the plan's ``--metrics`` (0 without), logged with its
    cost; the local job's and the Ray runner's."""
    if not plan.metrics:
        return
    stats.metrics_runs_per_image = runs_per_image(plan.metrics, plan.metrics_steps)
    log.info("metrics %s: %d session runs per image (%s), %d steps, baseline %s",
             ",".join(plan.metrics), stats.metrics_runs_per_image,
             cost_help(plan.metrics_steps), plan.metrics_steps, plan.metrics_baseline)


def end_metrics(plan: JobPlan, stats: JobStats, means: MetricMeans) -> None:
    """The means of ``means`` into ``stats`` (the summary line's), logged; the local job's and
    the Ray runner's."""
    stats.metrics, stats.metrics_images = means.means(), means.images
    if plan.metrics:
        log.info("metrics of %d images in %.1f s: %s", means.images, stats.metrics_seconds,
                 format_means(stats.metrics))


def _check_metrics(cfg: JobConfig) -> None:
    """``cfg.metrics`` checked against :data:`camserve.onnx.audit.AUDIT_KEYS`, and its settings."""
    bad = [k for k in cfg.metrics if k not in AUDIT_KEYS]
    if bad:
        raise UsageError(f"invalid value for --metrics: {short_repr(bad[0])} "
                         f"(allowed: {', '.join(AUDIT_KEYS)}, all)")
    if cfg.metrics_baseline not in BASELINES:
        raise UsageError(f"invalid value for --metrics-baseline: {short_repr(cfg.metrics_baseline)} "
                         f"(allowed: {', '.join(BASELINES)})")
    steps = cfg.metrics_steps
    if cfg.metrics and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise UsageError(f"invalid value for --metrics-steps: {short_repr(steps)} (allowed: 1 or more)")


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
        raise argparse.ArgumentTypeError(f"{short_repr(text)} (allowed: a positive number of bytes, "
                                         f"optionally with K, M or G)")
    return int(m.group(1)) * 1024 ** " KMG".index((m.group(2) or " ").upper())


def _parse_save(text: str) -> tuple[str, ...]:
    return parse_choices(text, SAVE_KINDS, key="--save", exc=UsageError, skip=("none",),
                         empty_ok=True)


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

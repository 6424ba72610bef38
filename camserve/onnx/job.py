"""The batch job's model, shared by its two runners (:mod:`camserve.onnx.batch`, local;
:mod:`camserve.onnx.ray`, Ray): the options (:class:`JobConfig`), their checked plan
(:func:`plan_job` -> :class:`JobPlan`), what a run did (:class:`JobStats`), the graph checked
against bounds and against its session, and :class:`BatchExplainer`, which turns a batch of
decoded images into results lines and artefacts through one onnxruntime session.

The job's manual (outputs, results lines, exit statuses, limits): docs/batch.md.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
import sys
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import dataclasses
import functools

import numpy as np
import torch

from ..images import DEFAULT_MAX_PIXELS
from ..parsing import MAX_INPUT_SIDE, MIN_INPUT_SIDE, short_repr
from ..records import Prediction, TargetError, parse_target, round_score, top_predictions
from ..tasks import Geometry, TargetBatch
from .audit import AUDIT_KEYS, BASELINES, MetricMeans, audit_batch, cost_help, format_means, \
    runs_per_image
from .format import GraphMeta
from .inputs import DEFAULT_MAX_FILE_SIZE, Decoded, Failed, Item, Refused, UsageError, \
    iter_inputs, load_item, read_file, unique_items
from .outputs import Outputs, finish_boxes, finish_image
from .session import ort_session

log = logging.getLogger("camserve.onnx.batch")

SAVE_KINDS: tuple[str, ...] = ("heatmap", "overlay", "npy")
#: the command line's exit statuses (their meaning: docs/batch.md)
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_PARTIAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
#: bytes of decoded data held between decoding and writing (``--window-bytes``): preprocessed
#: tensors plus the bounded overlay copies
DEFAULT_WINDOW_BYTES = 256 * 2**20
#: longest label or layer name a graph may record (they are copied into every results line)
MAX_LABEL_CHARS = 1024


# -- options, plan, stats -----------------------------------------------------------------------------

@dataclass
class JobConfig:
    """Options of a job (the command line's, parsed); checked by :func:`plan_job`. ``threads``,
    ``workers`` and ``overlap`` are the local runner's."""

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
    reference: Optional[str] = None
    explain_top: Optional[int] = None


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
    #: an embedding graph's --reference: a vector, or an image (absolute path) embedded first
    reference: Optional[tuple[float, ...]] = None
    reference_image: Optional[str] = None
    #: a detection graph: how many of each image's top detections get maps (at most the graph's)
    explain_top: int = 0


@dataclass
class JobStats:
    """What a run did (the summary line's figures)."""

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
        """:data:`EXIT_PARTIAL` when some images failed, else :data:`EXIT_OK`."""
        return EXIT_PARTIAL if self.failed else EXIT_OK


def plan_job(cfg: JobConfig) -> JobPlan:
    """Check ``cfg`` and the graph's metadata (:func:`check_meta`) before anything runs; the one
    option check of both runners. UsageError naming the option.

    ``max_pixels``: ``cfg.max_pixels`` when given (the command line may raise it), else the
    graph's value capped at :data:`camserve.images.DEFAULT_MAX_PIXELS`."""
    if cfg.batch_size < 1:
        raise UsageError(f"invalid value for --batch-size: {cfg.batch_size} (allowed: 1 or more)")
    for opt, v in (("max-file-size", cfg.max_file_size), ("window-bytes", cfg.window_bytes),
                   ("max-pixels", cfg.max_pixels)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise UsageError(f"invalid value for --{opt}: {short_repr(v)} (allowed: 1 or more)")
    meta = _read_meta(cfg.model)
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
    vector, image = _resolve_reference(cfg.reference, meta)
    if target >= 0 and "target" not in meta.input_names:
        raise UsageError(f"invalid value for --target: the {meta.spec.task} graph has no target "
                         f"input")
    explain_top = _explain_top(cfg.explain_top, meta)
    if cfg.metrics and meta.task.graph_per_target:
        raise UsageError("invalid value for --metrics: none applies to a detection graph (the "
                         "faithfulness metrics score one target per image; box pointing and "
                         "energy in the box need ground-truth boxes: docs/batch.md)")
    return JobPlan(model=str(cfg.model.resolve()), out=str(cfg.out.resolve()),
                   cam_output=cam_output, method=method.lower(), target=target, topk=topk,
                   save=tuple(cfg.save), max_pixels=_max_pixels(cfg.max_pixels, meta), meta=meta,
                   max_file_size=cfg.max_file_size, window_bytes=cfg.window_bytes,
                   metrics=tuple(dict.fromkeys(cfg.metrics)), metrics_steps=cfg.metrics_steps,
                   metrics_baseline=cfg.metrics_baseline, reference=vector,
                   reference_image=image, explain_top=explain_top)


def _explain_top(value: Optional[int], meta: GraphMeta) -> int:
    """A detection graph's ``--explain-top``: 0 .. the graph's own count (its metadata's
    ``explain_top``, the maps it computes per image), default all of them; other graphs take
    none."""
    if not meta.task.graph_per_target:
        if value is not None:
            raise UsageError(f"invalid value for --explain-top: the {meta.spec.task} graph takes "
                             f"none (detection graphs only)")
        return 0
    most = meta.task.graph_top
    if value is None:
        return most
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= most:
        raise UsageError(f"invalid value for --explain-top: {short_repr(value)} (allowed: 0..{most}, "
                         f"the maps this graph computes per image)")
    return value


def _resolve_reference(value: Optional[str], meta: GraphMeta
                       ) -> tuple[Optional[tuple[float, ...]], Optional[str]]:
    """An embedding graph's ``--reference``: a ``.json`` list or ``.npy`` vector of its dimension
    (checked as the server checks ``reference_embedding``), or an image file (embedded by the
    explainer, under the job's image limits). Other graphs take none."""
    from ..errors import OptionError

    needs = "reference" in meta.input_names
    if value is None:
        if needs:
            raise UsageError("the embedding graph needs --reference (an image file, or a .json / "
                             ".npy vector of its dimension)")
        return None, None
    if not needs:
        raise UsageError(f"invalid value for --reference: the {meta.spec.task} graph takes none")
    path = Path(value)
    if not path.is_file():
        raise UsageError(f"invalid value for --reference: {short_repr(value)} is not a file")
    if path.suffix.lower() not in (".json", ".npy"):
        return None, str(path.resolve())
    try:
        raw: Any = read_file(path, 64 * 2**20)
        vec = json.loads(raw) if path.suffix.lower() == ".json" else \
            np.load(io.BytesIO(raw), allow_pickle=False).reshape(-1).tolist()
        return meta.task.parse_options({"reference_embedding": vec}, max_targets=1).vector, None
    except OptionError as exc:
        raise UsageError(f"invalid value for --reference: {exc.message}") from None
    except (ValueError, OSError, Refused) as exc:
        raise UsageError(f"invalid value for --reference: {short_repr(value)} is not a JSON list "
                         f"or a .npy array ({type(exc).__name__})") from None


def _read_meta(model: Path) -> GraphMeta:
    """The graph's metadata, checked (:func:`check_meta`); UsageError for a file that is missing,
    not an ONNX graph or not a camserve CAM graph."""
    if not model.is_file():
        raise UsageError(f"invalid value for --model: {short_repr(str(model))} does not exist")
    try:
        meta = GraphMeta.from_file(model)
    except ValueError as exc:
        raise UsageError(f"invalid value for --model: {exc}") from None
    except Exception as exc:  # onnx's own errors for a file that is not a graph at all
        raise UsageError(f"invalid value for --model: cannot read it as an ONNX graph "
                         f"({type(exc).__name__})") from None
    check_meta(meta)
    return meta


def _max_pixels(given: Optional[int], meta: GraphMeta) -> int:
    if given is not None:
        return given
    limit = min(meta.max_pixels or DEFAULT_MAX_PIXELS, DEFAULT_MAX_PIXELS)
    if (meta.max_pixels or 0) > DEFAULT_MAX_PIXELS:
        log.warning("the graph's max_pixels %d is above the default %d: using %d (raise it "
                    "with --max-pixels)", meta.max_pixels, DEFAULT_MAX_PIXELS, limit)
    return limit


def _resolve_target(value: Optional[str], labels: Sequence[str]) -> int:
    """``--target`` as a class index, -1 (each image's top-1 class) when not given; labels match
    as on the server (exact, then case-insensitive: :func:`camserve.records.parse_target`)."""
    if value is None:
        return -1
    try:
        return parse_target(value, labels, allow_top1=True, what="--target")
    except TargetError as exc:
        raise UsageError(str(exc)) from None


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


# -- the graph, not trusted ---------------------------------------------------------------------------

def check_meta(meta: GraphMeta) -> None:
    """The graph's metadata within sane bounds, before any image: finite mean, finite std > 0,
    input size within :data:`camserve.parsing.MAX_INPUT_SIDE`, labels and layer name of at most
    :data:`MAX_LABEL_CHARS` characters. UsageError naming the key and what is allowed."""
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
    ``target`` present when a target is fixed, the task's other inputs present, its output
    (``logits``, ``embedding``) as wide as the labels where static, and a CAM output for every
    method. UsageError naming what does not fit."""
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
    missing_in = [n for n in meta.input_names if n not in ins]
    if missing_in:
        raise bad(f"the {meta.spec.task} task's input {missing_in[0]!r} is missing")
    name = meta.output_names[0]
    if name not in outs:
        raise bad(f"it has no output {name!r}")
    width = outs[name][1] if len(outs[name]) >= 2 else None
    if meta.task.graph_per_target:  # detections (N, M, 6)
        dims = outs[name]
        if len(dims) != 3 or (isinstance(dims[2], int) and dims[2] != 6):
            raise bad(f"output {name!r} has shape {short_repr(outs[name])}, expected (N, M, 6)")
    elif isinstance(width, int) and width != len(meta.labels):
        raise bad(f"{len(meta.labels)} labels for {width} {name}")
    missing = [f"{m} ({o})" for m, o in meta.cam_outputs.items() if o not in outs]
    if missing:
        raise bad(f"no output for method {missing[0]}")


def session_inputs(sess: Any) -> list[Any]:
    """A session's inputs, then its inputs with a default value (``target``: onnxruntime lists it
    among the overridable initializers)."""
    return [*sess.get_inputs(), *sess.get_overridable_initializers()]


# -- results lines (the task's part) -----------------------------------------------------------------

def probabilities(logits: np.ndarray) -> torch.Tensor:
    """Softmax of a session's logits (float32, per row)."""
    return torch.softmax(torch.from_numpy(np.asarray(logits)).float(), dim=1)


#: the artefact each segmentation line points to: the class-index PNG at the original size
MASK_SUFFIX = ".mask.png"


def graph_targets(meta: GraphMeta, out: torch.Tensor, target: int,
                  reference: Optional[Sequence[float]] = None) -> TargetBatch:
    """The one target per row the graph explained, resolved on the host as the graph resolves it
    (:meth:`camserve.tasks.Task.graph_targets`): ``target`` (-1: each row's default), the
    predicted mask of a segmentation class, the ``reference`` of an embedding."""
    task = meta.task
    inputs: dict[str, torch.Tensor] = {}
    for g in task.graph_inputs(meta.input_size):
        if g.name == "target":
            inputs[g.name] = torch.tensor([target], dtype=torch.long)
        elif g.name == "reference":  # one per row: the graph takes no broadcast reference
            inputs[g.name] = torch.tensor([list(reference or ())], dtype=torch.float32).expand(
                int(out.shape[0]), -1)
        else:
            inputs[g.name] = g.fill(1)
    tb = task.graph_targets(out, inputs)
    return dataclasses.replace(tb, count=(1,) * int(out.shape[0]))


def _task_fields(meta: GraphMeta, row: torch.Tensor, item: Item, topk: int,
                 reference: Optional[str]) -> dict[str, Any]:
    """What a results line holds besides the explained target, per task: classification the
    top-k; multilabel the top-k, the predicted ``labels`` and the threshold; segmentation the
    mask file and each class's share; embedding the vector, its similarity's reference kind."""
    task = meta.task
    name = task.name
    if name in ("classification", "multilabel"):
        fields: dict[str, Any] = {"topk": [p.to_json() for p in top_predictions(
            task.probabilities(row).tolist(), meta.labels, topk)]}
        if name == "multilabel":
            fields.update(task="multilabel", labels=[p.to_json() for p in task.labels_of(
                row, task.threshold)], threshold=task.threshold)
        return fields
    if name == "segmentation":
        return {"task": name, "segmentation": {"mask": item.name + MASK_SUFFIX,
                                               "classes": task.classes(row)}}
    return {"task": name, "embedding": [round_score(v) for v in row.tolist()],
            "reference": reference}


def result_lines(items: Sequence[Item], sizes: Sequence[tuple[int, int]], logits: np.ndarray,
                 cams: Optional[np.ndarray], target: int, topk: int, meta: GraphMeta,
                 method: str, reference: Optional[Sequence[float]] = None,
                 reference_kind: Optional[str] = None) -> list[Union[dict[str, Any], Failed]]:
    """The results.jsonl lines of one session run (``bbox`` and ``files`` are filled in when each
    heatmap is done): the explained target (``target``, ``label``, ``score`` as the task shows
    it: a class probability, a label's sigmoid, a class's mean probability over its predicted
    mask, the similarity to ``reference``) and the task's own fields (:func:`_task_fields`;
    classification lines are what they always were, the others say their ``task``). ``logits``
    is the graph's first output. An image whose output or map is not finite gets a
    :class:`Failed` record instead (``InvalidOutput``). The one place that knows the graph's
    task."""
    task = meta.task
    out = torch.from_numpy(np.asarray(logits)).float()
    finite = torch.isfinite(out.reshape(out.shape[0], -1)).all(dim=1).tolist()
    tb = graph_targets(meta, out.nan_to_num(), target, reference)
    lines: list[Union[dict[str, Any], Failed]] = []
    for j, (item, size) in enumerate(zip(items, sizes)):
        if not finite[j]:
            lines.append(Failed(item, "InvalidOutput", "the graph returned non-finite scores (NaN "
                                                       "or infinity) for this image"))
            continue
        if cams is not None and not bool(np.isfinite(cams[j]).all()):
            lines.append(Failed(item, "InvalidOutput", "the graph returned a non-finite CAM (NaN "
                                                       "or infinity) for this image"))
            continue
        fields = _task_fields(meta, out[j], item, topk, reference_kind)
        [shown] = task.shown(out[j], tb, j, Geometry((size[1], size[0]), meta.input_size))
        explained = Prediction(shown.index, shown.label, shown.score).to_json()
        lines.append({"path": item.path, "name": item.name, "width": size[1], "height": size[0],
                      **{k: v for k, v in fields.items() if k == "topk"},
                      "target": explained["index"], "label": explained["label"],
                      "score": explained["score"], "bbox": None, "method": method,
                      "layer": meta.layer, **{k: v for k, v in fields.items() if k != "topk"}})
    return lines


def detection_lines(items: Sequence[Item], sizes: Sequence[tuple[int, int]], dets: np.ndarray,
                    cams: np.ndarray, meta: GraphMeta, method: str, explain_top: int
                    ) -> list[Union[dict[str, Any], Failed]]:
    """The results.jsonl lines of a detection graph's run: per image its ``detections`` (boxes in
    original pixels, as the servers answer: :meth:`camserve.tasks.Detection.detections_json`),
    the first ``explain_top`` with an ``explanation`` (``method``; ``bbox`` and ``files`` are
    filled in when its maps are done). ``dets`` is the graph's packed ``detections`` (N, M, 6),
    ``cams`` its maps (N, K, h, w). An image whose detections or explained maps are not finite
    gets a :class:`Failed` record (``InvalidOutput``)."""
    task = meta.task
    out = torch.from_numpy(np.asarray(dets)).float()
    lines: list[Union[dict[str, Any], Failed]] = []
    for j, (item, size) in enumerate(zip(items, sizes)):
        if not bool(torch.isfinite(out[j]).all()):
            lines.append(Failed(item, "InvalidOutput", "the graph returned non-finite detections "
                                                       "(NaN or infinity) for this image"))
            continue
        found = task.detections_json(out[j], Geometry((size[1], size[0]), meta.input_size))
        shown = min(explain_top, len(found))
        if not bool(np.isfinite(cams[j, :shown]).all()):
            lines.append(Failed(item, "InvalidOutput", "the graph returned a non-finite CAM (NaN "
                                                       "or infinity) for this image"))
            continue
        for det in found[:shown]:
            det["explanation"] = {"method": method, "bbox": None, "files": {}}
        lines.append({"path": item.path, "name": item.name, "width": size[1], "height": size[0],
                      "task": "detection", "detections": found, "method": method,
                      "layer": meta.layer})
    return lines


# -- --metrics ----------------------------------------------------------------------------------------

def audit_lines(sess: Any, x: np.ndarray, cams: np.ndarray, lines: Sequence[dict[str, Any]],
                keys: Sequence[str], *, steps: int, baseline: str, model_for: Any = None
                ) -> list[Optional[dict[str, float]]]:
    """``--metrics`` for one batch: :func:`camserve.onnx.audit.audit_batch` through ``sess`` on
    the preprocessed images ``x`` and their raw maps ``cams``, each line's ``target`` explained.
    Sets each line's ``"metrics"`` (values rounded to 6 decimals, ``None`` where the image's
    metrics failed) and returns the unrounded rows, for :class:`~camserve.onnx.audit.MetricMeans`.
    ``model_for``: a task's two-class model of its targets' probability, per slice of the batch
    (each line's target is then class 1 of it; :meth:`BatchExplainer._model_for`); default the
    graph's logits.

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
    targets = [1] * len(lines) if model_for is not None else [line["target"] for line in lines]
    rows = audit_batch(sess, torch.from_numpy(np.ascontiguousarray(x)), cams, targets, keys,
                       steps=steps, baseline=baseline, model_for=model_for)
    for line, row in zip(lines, rows):
        line["metrics"] = None if row is None else {k: round(v, 6) for k, v in row.items()}
    return rows


def start_metrics(plan: JobPlan, stats: JobStats) -> None:
    """``stats.metrics_runs_per_image`` of the plan's ``--metrics`` (0 without), logged with its
    cost."""
    if not plan.metrics:
        return
    stats.metrics_runs_per_image = runs_per_image(plan.metrics, plan.metrics_steps)
    log.info("metrics %s: %d session runs per image (%s), %d steps, baseline %s",
             ",".join(plan.metrics), stats.metrics_runs_per_image,
             cost_help(plan.metrics_steps), plan.metrics_steps, plan.metrics_baseline)


def finish_stats(plan: JobPlan, stats: JobStats, outputs: Outputs, means: MetricMeans,
                 t0: float) -> JobStats:
    """``stats`` completed at the end of a run: the lines written, the time since ``t0`` and the
    means of ``means`` (logged with ``--metrics``)."""
    stats.ok, stats.failed = outputs.ok, outputs.failed
    stats.seconds = time.perf_counter() - t0
    stats.metrics, stats.metrics_images = means.means(), means.images
    if plan.metrics:
        log.info("metrics of %d images in %.1f s: %s", means.images, stats.metrics_seconds,
                 format_means(stats.metrics))
    return stats


# -- what both runners share --------------------------------------------------------------------------

def list_items(cfg: JobConfig, outputs: Outputs, counts: dict[str, int]) -> Iterator[Item]:
    """The job's items, lazily: the INPUT arguments listed (DIR never), each path once, the
    paths already done skipped on ``--resume`` (counted in ``counts["skipped"]``) and output names
    unique, also against those already written."""
    return unique_items(iter_inputs(cfg.inputs, exclude=cfg.out), outputs.done, counts,
                        reserved=outputs.names)


def progress_bar(progress: Optional[bool], total: Optional[int] = None) -> Any:
    """The job's tqdm bar (images/s), shown when ``progress`` or, by default, when stderr is a
    terminal."""
    from tqdm import tqdm

    show = sys.stderr.isatty() if progress is None else progress
    return tqdm(total=total, unit="img", disable=not show, dynamic_ncols=True, smoothing=0.1)


#: an executor's ``submit(fn, *args) -> Future`` (``ThreadPoolExecutor.submit``, or a runner's
#: wrapper around it)
Submit = Callable[..., "Future[Any]"]
Files = tuple[dict[str, str], Optional[list[int]]]


@dataclass
class Explained:
    """One image of a batch after the session run: its results line, its artefacts being made
    (``files``: :meth:`BatchExplainer.artefacts` in the runner's pool) and, with ``--metrics``,
    its unrounded metrics (None where they failed)."""

    line: dict[str, Any]
    files: Future[Union[Files, list[Files], Failed]]
    metrics: Optional[dict[str, float]] = None

    def result(self) -> Union[dict[str, Any], Failed]:
        """Wait for the artefacts: the finished line (``files`` and ``bbox`` in; a detection
        line's in each explained detection's ``explanation``), or the image's :class:`Failed`
        record when they could not be made."""
        done = self.files.result()
        if isinstance(done, Failed):
            return done
        if isinstance(done, list):
            for det, (files, bbox) in zip(self.line["detections"], done):
                det["explanation"]["files"], det["explanation"]["bbox"] = files, bbox
            return self.line
        self.line["files"], self.line["bbox"] = done
        return self.line


@dataclass
class ExplainedBatch:
    """What :meth:`BatchExplainer.explain` made of a batch: one row per image, in order (an
    :class:`Explained`, or the image's :class:`Failed` record), and where the time went."""

    rows: list[Union[Explained, Failed]]
    session_seconds: float = 0.0
    metrics_seconds: float = 0.0


class BatchExplainer:
    """A batch of decoded images -> results lines and artefacts, through one onnxruntime session
    over the CAM graph: the per-batch work of the local runner and of each Ray actor.

    The session is checked against the plan's metadata (:func:`check_session`) before any
    image. :meth:`explain` runs it once per batch, builds the lines (:func:`result_lines`), hands
    each image's artefacts to the runner's pool and, with ``--metrics``, scores the maps through
    the same session while the files are written.
    """

    def __init__(self, plan: JobPlan, sess: Any) -> None:
        check_session(plan.meta, session_inputs(sess), sess.get_outputs(), plan.target)
        self.plan = plan
        self.sess = sess
        self.providers: list[str] = list(sess.get_providers())
        self.in_name = sess.get_inputs()[0].name
        #: a graph traced at batch size 1 (a gradient-free detection graph) runs image by image
        self.one_by_one = sess.get_inputs()[0].shape[0] == 1
        self.fetch = [plan.meta.output_names[0], plan.cam_output]
        self.task = plan.meta.task
        self.reference = self._reference()
        self.reference_kind = None if self.reference is None else (
            "image" if plan.reference_image else "embedding")

    @classmethod
    def open(cls, plan: JobPlan, *, device: str, threads: int) -> "BatchExplainer":
        """An explainer with its own session (:func:`camserve.onnx.session.ort_session`) on
        ``device`` with ``threads``: the CPUs the runner was given. Its threads do not spin: the
        pool's decoding, heatmaps and files need the CPUs between session runs."""
        return cls(plan, ort_session(plan.model, device=device, threads=threads, spinning=False))

    def _reference(self) -> Optional[tuple[float, ...]]:
        """The embedding every image is compared with: ``--reference``'s vector, or its image's
        embedding (one session run; the image decoded under the job's limits)."""
        plan = self.plan
        if plan.reference_image is None:
            return plan.reference
        got = load_item(Item(plan.reference_image, "reference"), plan.meta, False, plan.max_pixels,
                        plan.max_file_size)
        if isinstance(got, Failed):
            raise UsageError(f"invalid value for --reference: {got.reason}")
        x = got.tensor[None].numpy()
        ones = np.ones((1, len(plan.meta.labels)), np.float32)  # any reference: only its embedding
        (emb,) = self.sess.run([self.fetch[0]], {self.in_name: x, "reference": ones})
        if not np.isfinite(emb).all() or not np.any(emb):
            raise UsageError("invalid value for --reference: its embedding is zero or not finite")
        return tuple(float(v) for v in emb[0])

    def feed(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """The session's inputs for the images ``x``: the fixed ``--target``, the reference."""
        feed: dict[str, np.ndarray] = {self.in_name: x}
        if self.plan.target >= 0:
            feed["target"] = np.full((len(x),), self.plan.target, dtype=np.int64)
        if self.reference is not None:
            feed["reference"] = np.tile(np.asarray(self.reference, np.float32), (len(x), 1))
        return feed

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        """The task's output and the chosen map of the images ``x``: one session run, or one per
        image for a graph of batch size 1."""
        if not self.one_by_one:
            return self.sess.run(self.fetch, self.feed(x))
        parts = [self.sess.run(self.fetch, self.feed(x[i:i + 1])) for i in range(len(x))]
        return [np.concatenate(p) for p in zip(*parts)]

    def explain(self, batch: Sequence[Decoded], submit: Submit) -> ExplainedBatch:
        """Explain ``batch`` (at least one image): one session run, the results lines, each
        image's :meth:`artefacts` started with ``submit`` and, with ``--metrics``, the audit.
        UsageError when the graph's output does not fit its labels."""
        plan = self.plan
        x = np.stack([d.tensor.numpy() for d in batch])
        t0 = time.perf_counter()
        logits, cams = self.run(x)
        out = ExplainedBatch([], session_seconds=time.perf_counter() - t0)
        if self.task.graph_per_target:
            return self._explain_boxes(batch, logits, cams, out, submit)
        if logits.ndim < 2 or logits.shape[0] != len(batch) \
                or logits.shape[1] != len(plan.meta.labels):
            raise UsageError(f"invalid value for --model: the graph returned {self.fetch[0]} of "
                             f"shape {list(logits.shape)} for {len(plan.meta.labels)} labels")
        lines = result_lines([d.item for d in batch], [d.size for d in batch], logits, cams,
                             plan.target, plan.topk, plan.meta, plan.method, self.reference,
                             self.reference_kind)
        dense = logits.ndim == 4  # segmentation: each line's mask file is made with its heatmap
        kept: list[int] = []
        for j, (d, line) in enumerate(zip(batch, lines)):
            if isinstance(line, Failed):
                out.rows.append(line)
            else:
                kept.append(j)
                fn = functools.partial(self.artefacts, mask=logits[j].argmax(0)) if dense \
                    else self.artefacts
                out.rows.append(Explained(line, submit(fn, d, cams[j])))
        if plan.metrics and kept:
            t1 = time.perf_counter()
            explained = [out.rows[j] for j in kept]
            rows = audit_lines(self.sess, x[kept], cams[kept], [e.line for e in explained],
                               plan.metrics, steps=plan.metrics_steps,
                               baseline=plan.metrics_baseline, model_for=self._model_for(
                                   torch.from_numpy(logits[kept]).float()))
            for e, row in zip(explained, rows):
                e.metrics = row
            out.metrics_seconds = time.perf_counter() - t1
        return out

    def _explain_boxes(self, batch: Sequence[Decoded], dets: np.ndarray, cams: np.ndarray,
                       out: ExplainedBatch, submit: Submit) -> ExplainedBatch:
        """A detection graph's batch: :func:`detection_lines`, then each image's per-box files
        (:func:`camserve.onnx.outputs.finish_boxes`; renormalised inside each box for a
        gradient-free method or the graph's ``box_normalize``). ``--metrics`` is refused for
        detection graphs by :func:`plan_job`."""
        plan = self.plan
        if dets.ndim != 3 or dets.shape[0] != len(batch) or dets.shape[2] != 6 \
                or cams.ndim != 4 or cams.shape[0] != len(batch):
            raise UsageError(f"invalid value for --model: the graph returned {self.fetch[0]} of "
                             f"shape {list(dets.shape)} and maps of shape {list(cams.shape)} for "
                             f"{len(batch)} images (expected (N, M, 6) and (N, K, h, w))")
        lines = detection_lines([d.item for d in batch], [d.size for d in batch], dets, cams,
                                plan.meta, plan.method, plan.explain_top)
        from ..methods import get_method
        from ..tasks.detection import DetectionOptions

        inside = self.task.box_normalized(DetectionOptions(box_normalize=self.task.box_normalize),
                                          get_method(plan.method).gradients)
        for j, (d, line) in enumerate(zip(batch, lines)):
            if isinstance(line, Failed):
                out.rows.append(line)
                continue
            boxes = [det["box"] for det in line["detections"] if "explanation" in det]
            fn = functools.partial(self.box_artefacts, boxes=boxes, inside=inside)
            out.rows.append(Explained(line, submit(fn, d, cams[j, :len(boxes)])))
        return out

    def box_artefacts(self, d: Decoded, cams: np.ndarray, *, boxes: Sequence[Sequence[float]],
                      inside: bool) -> Union[list[Files], Failed]:
        """One detection image's per-box heatmaps, bboxes and files
        (:func:`camserve.onnx.outputs.finish_boxes`), or its :class:`Failed` record."""
        return finish_boxes(Path(self.plan.out), d, cams, boxes, self.plan.save, inside)

    def _model_for(self, intact: torch.Tensor) -> Optional[Callable[[slice], Any]]:
        """The ``--metrics`` model of a task other than classification, per slice of the batch:
        the probability of each image's explained target (:meth:`camserve.tasks.Task.probability`:
        a label's sigmoid, a class's mean probability over its predicted mask on the intact image,
        the similarity mapped to [0, 1]) as two-class logits ``(0, logit p)``, so the metrics'
        softmax of class 1 is that probability. None for classification (the metrics read the
        logits)."""
        if self.task.name == "classification":
            return None
        targets = graph_targets(self.plan.meta, intact, self.plan.target, self.reference)

        def model_for(rows: slice) -> Callable[[torch.Tensor], torch.Tensor]:
            tb = targets.select(torch.arange(targets.rows)[rows])

            def model_fn(xp: torch.Tensor) -> torch.Tensor:
                arr = np.ascontiguousarray(xp.detach().to("cpu", torch.float32).numpy())
                (o,) = self.sess.run([self.fetch[0]], self.feed(arr))
                p = self.task.probability(torch.from_numpy(o).float(), tb)[:, 0].double()
                p = p.clamp(1e-12, 1 - 1e-12)
                return torch.stack([torch.zeros_like(p), p.log() - (-p).log1p()], dim=1).float()

            return model_fn

        return model_for

    def artefacts(self, d: Decoded, cam: np.ndarray,
                  mask: Optional[np.ndarray] = None) -> Union[Files, Failed]:
        """One image's heatmap, bbox and files (:func:`camserve.onnx.outputs.finish_image`):
        ``({kind: path under DIR}, bbox)``, or its :class:`Failed` record. ``mask``: a
        segmentation's class indices at the input size, written as the class-index PNG at the
        original size (:data:`MASK_SUFFIX`)."""
        extra = None
        if mask is not None:
            from ..tasks.segmentation import mask_png, nearest_resize

            extra = {MASK_SUFFIX: lambda: mask_png(nearest_resize(mask, (d.size[1], d.size[0])))}
        return finish_image(Path(self.plan.out), d, cam, self.plan.save, extra)

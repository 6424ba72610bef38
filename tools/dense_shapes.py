"""Shapes for the dense tasks: the segmentation and multi-label default models, with known answers.

The generator of :mod:`tools.shapes` draws one to three non-overlapping shapes per image and knows
each one's coverage mask, so both right answers are exact:

* ``models/shapes-seg`` — :class:`ShapesSegNet` (``model.py`` of that folder), ``task:
  segmentation``: 9 classes, ``background`` (0) then the 8 shapes; a pixel belongs to a shape when
  the shape covers at least half of it. ``make train-seg``; ``make evaluate
  MODEL=models/shapes-seg`` prints ``miou`` (mean IoU over the 9 classes, over the whole
  evaluation set) and, per CAM method, ``energy_in_mask``: the share of a class's map (the served
  heatmap: upsampled to the image, min-max normalised) that falls inside that class's true mask,
  the class explained over its predicted mask (the default target).
* ``models/shapes-multi`` — the default ShapesNet with ``task: multilabel`` (8 sigmoid labels).
  ``make train-multi``; ``make evaluate MODEL=models/shapes-multi`` prints ``map`` (mean over the
  labels of the average precision of the sigmoid scores) and, per CAM method, ``pointing_game``:
  the share of (image, true label) maps whose peak lies in that label's object (its box, grown by
  :data:`tools.shapes.POINTING_TOLERANCE` px).

Training images come from ``rng_for(seed, "train")`` and evaluation images from ``rng_for(seed,
"evaluate")``: evaluation is always on unseen images. The training loop is
:func:`tools.shapes.fit`. Like :mod:`tools.shapes`, this is checkout tooling, not part of the
installed package::

    python -m tools.dense_shapes train --task segmentation --out models/shapes-seg
    python -m tools.dense_shapes evaluate --model models/shapes-multi --seed 1234

Example::

    >>> data = make_dense_dataset(0, 3)
    >>> data.images.shape, data.classes.shape, data.labels.shape, data.boxes.shape
    ((3, 96, 96, 3), (3, 96, 96), (3, 3), (3, 3, 4))
    >>> sorted(set(data.classes[0].ravel()) - {0}) == sorted(int(v) + 1 for v in data.labels[0] if v >= 0)
    True
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from tools.shapes import (CLASSES, CONFIG_NAME, IMAGE_SIZE, POINTING_TOLERANCE, add_train_options,
                          fit, pointing_hits, render_sample, rng_for, to_batch)

if TYPE_CHECKING:
    import torch

    from camserve.models import LoadedModel, ModelSpec

log = logging.getLogger(__name__)

#: Class names of the segmentation model: the background, then the shapes.
SEG_CLASSES: tuple[str, ...] = ("background",) + CLASSES
MAX_OBJECTS = 3
#: The checkout's dense default model folders, by task.
REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIRS = {"segmentation": REPO / "models" / "shapes-seg",
                "multilabel": REPO / "models" / "shapes-multi"}
TASKS = tuple(DEFAULT_DIRS)
#: passes over the 8000 training images (segmentation learns its boundaries late)
EPOCHS = {"segmentation": 11, "multilabel": 8}


@dataclass(frozen=True)
class DenseData:
    """Images of one to three shapes: ``images`` (N, H, W, 3) uint8; ``classes`` (N, H, W) uint8,
    the segmentation classes (0 background, ``1 + label`` where a shape covers at least half of
    the pixel); ``labels`` (N, 3) int64, the shapes' classes (-1 pads); ``boxes`` (N, 3, 4)."""

    images: np.ndarray
    classes: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def multi_hot(self) -> np.ndarray:
        """(N, 8) float32: 1 for each shape class present."""
        out = np.zeros((len(self), len(CLASSES)), dtype=np.float32)
        rows, cols = np.nonzero(self.labels >= 0)
        out[rows, self.labels[rows, cols]] = 1.0
        return out


def make_dense_dataset(seed: int, n: int, *, stream: str = "train",
                       rng: Optional[np.random.Generator] = None) -> DenseData:
    """``n`` images of one to three different shapes (the count uniform in 1..3), from
    ``rng_for(seed, stream)`` (or ``rng``, to continue a stream)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"invalid value for n: {n!r} (a non-negative integer)")
    gen = rng if rng is not None else rng_for(seed, stream)
    size = IMAGE_SIZE
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    classes = np.zeros((n, size, size), dtype=np.uint8)
    labels = np.full((n, MAX_OBJECTS), -1, dtype=np.int64)
    boxes = np.zeros((n, MAX_OBJECTS, 4), dtype=np.int64)
    for i in range(n):
        k = int(gen.integers(1, MAX_OBJECTS + 1))
        s = render_sample(gen, gen.choice(len(CLASSES), size=k, replace=False))
        images[i] = s.image
        for j, lab in enumerate(s.labels):
            classes[i][s.masks[j] >= 128] = lab + 1
            labels[i, j] = lab
            boxes[i, j] = s.boxes[j]
    return DenseData(images, classes, labels, boxes)


# ------------------------------------------------------------------------------------------------
# the model folders


def folder_task(folder: Path | str) -> str:
    """``handler.task`` of a model folder's config."""
    from camserve.models import ModelSpec, load_model_config

    return ModelSpec.from_config(load_model_config(folder).get("handler")).task


def read_spec(folder: Path | str, task: str) -> "ModelSpec":
    """The folder's validated ``handler:`` block, checked to describe a dense shapes model of
    ``task`` (segmentation: 9 classes; multilabel: 8 labels)."""
    from camserve.models import ConfigError, ModelSpec, load_model_config

    spec = ModelSpec.from_config(load_model_config(folder).get("handler"))
    n = len(SEG_CLASSES) if task == "segmentation" else len(CLASSES)
    if spec.task != task or spec.num_classes != n:
        raise ConfigError(f"{Path(folder) / CONFIG_NAME}: not a shapes {task} model (task "
                          f"{spec.task}, {spec.num_classes} classes; expected task {task} with "
                          f"{n} classes)")
    if not spec.weights or not spec.labels:
        raise ConfigError(f"{Path(folder) / CONFIG_NAME}: handler.weights and handler.labels name "
                          f"the files training writes; both are needed")
    return spec


def _names(task: str) -> tuple[str, ...]:
    return SEG_CLASSES if task == "segmentation" else CLASSES


def load_model(folder: Path | str) -> "LoadedModel":
    """A dense shapes folder as the server loads it (:func:`camserve.models.load_model_dir`),
    checked to carry the shapes classes of its task."""
    from camserve.models import ConfigError, load_model_dir

    loaded = load_model_dir(folder)
    task = loaded.spec.task
    if task not in TASKS or tuple(loaded.labels) != _names(task):
        raise ConfigError(f"{Path(folder)}: {task} with classes {loaded.labels[:4]}... is not a "
                          f"dense shapes model (segmentation over {list(SEG_CLASSES)}, or "
                          f"multilabel over {list(CLASSES)})")
    return loaded


# ------------------------------------------------------------------------------------------------
# training


@dataclass(frozen=True)
class TrainReport:
    """What :func:`train` did: wall and CPU time, epochs and steps, the held-out figure (mIoU or
    mAP on a slice of the training stream), the files written."""

    task: str
    seconds: float
    cpu_seconds: float
    epochs: int
    steps: int
    held_out: float
    files: tuple[Path, ...]


def _outputs(model: "torch.nn.Module", images: np.ndarray, spec: "ModelSpec",
             batch_size: int = 64) -> "torch.Tensor":
    import torch

    parts = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            parts.append(model(to_batch(images[i:i + batch_size], spec)))
    return torch.cat(parts)


def iou_per_class(pred: np.ndarray, truth: np.ndarray, n: int) -> np.ndarray:
    """IoU of each class over a whole set of masks (NaN for a class in neither).

    Example::

        >>> iou_per_class(np.array([[0, 1], [1, 1]]), np.array([[0, 1], [0, 1]]), 3).tolist()
        [0.5, 0.6666666666666666, nan]
    """
    p, t = pred.ravel().astype(np.int64), truth.ravel().astype(np.int64)
    inter = np.bincount(p[p == t], minlength=n)[:n].astype(np.float64)
    union = (np.bincount(p, minlength=n)[:n] + np.bincount(t, minlength=n)[:n]).astype(np.float64) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / union, np.nan)


def average_precision(scores: np.ndarray, truth: np.ndarray) -> float:
    """Average precision of one label: the mean of the precision at each positive, ranked by
    score (ties broken by a stable sort); NaN without positives.

    Example::

        >>> average_precision(np.array([0.9, 0.8, 0.3, 0.1]), np.array([1, 0, 1, 0]))
        0.8333333333333333
    """
    order = np.argsort(-scores, kind="stable")
    hits = truth[order] > 0
    if not hits.any():
        return float("nan")
    precision = np.cumsum(hits) / (np.arange(len(hits)) + 1)
    return float(precision[hits].mean())


def _held_out(task: str, model: "torch.nn.Module", data: DenseData, spec: "ModelSpec") -> float:
    out = _outputs(model, data.images, spec)
    if task == "segmentation":
        return float(np.nanmean(iou_per_class(out.argmax(1).numpy(), data.classes,
                                              len(SEG_CLASSES))))
    truth = data.multi_hot()
    scores = out.numpy()
    return float(np.nanmean([average_precision(scores[:, k], truth[:, k])
                             for k in range(truth.shape[1])]))


def train(out: Path | str, task: str, *, seed: int = 0, epochs: Optional[int] = None, n: int = 8000,
          batch_size: int = 64, lr: float = 3e-3, max_seconds: Optional[float] = None) -> TrainReport:
    """Train the dense shapes model of folder ``out`` (its ``model-config.yaml`` names the arch
    and ``task``) on ``n`` fresh images of one to three shapes, seen ``epochs`` times
    (:func:`tools.shapes.fit`: random 90° turns and flips, AdamW, cosine decay); write the
    weights and labels the config names. Segmentation minimises the per-pixel cross-entropy,
    multilabel the binary cross-entropy of each label. ``epochs``: default the task's
    (:data:`EPOCHS`)."""
    import torch
    import torch.nn.functional as F

    from camserve.models import build_model

    if task not in TASKS:
        raise ValueError(f"invalid value for task: {task!r} (known: {', '.join(TASKS)})")
    epochs = EPOCHS[task] if epochs is None else epochs
    for name, value, lo in (("epochs", epochs, 1), ("n", n, 8), ("batch_size", batch_size, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"invalid value for {name}: {value!r} (an int >= {lo})")
    out = Path(out)
    spec = read_spec(out, task)
    t0, c0 = time.monotonic(), time.process_time()
    torch.manual_seed(seed)
    model = build_model(dataclasses.replace(spec, weights=None), out)
    for p in model.parameters():
        p.requires_grad_(True)
    model = model.to(memory_format=torch.channels_last)
    rng = rng_for(seed, "train")
    data = make_dense_dataset(seed, n, rng=rng)
    val = make_dense_dataset(seed, min(400, n), rng=rng)
    log.info("generated %d training images in %.1f s", n, time.monotonic() - t0)
    if task == "segmentation":
        targets = torch.from_numpy(data.classes.astype(np.int64))
        loss_fn = F.cross_entropy
    else:
        targets = torch.from_numpy(data.multi_hot())
        loss_fn = F.binary_cross_entropy_with_logits

    def batch(idx: np.ndarray) -> tuple["torch.Tensor", "torch.Tensor"]:
        return to_batch(data.images[idx], spec), targets[idx]

    metric = "mIoU" if task == "segmentation" else "mAP"
    done, steps = fit(model, n, batch, loss_fn, epochs=epochs, batch_size=batch_size, lr=lr,
                      seed=seed, max_seconds=max_seconds, t0=t0, c0=c0,
                      held_out=lambda m: (f"held-out {metric}", _held_out(task, m, val, spec)))
    model = model.to(memory_format=torch.contiguous_format).eval()
    score = _held_out(task, model, val, spec)
    weights, labels = out / str(spec.weights), out / str(spec.labels)
    torch.save(model.state_dict(), weights)
    labels.write_text(json.dumps({str(i): c for i, c in enumerate(_names(task))}, indent=2) + "\n")
    secs, cpu = time.monotonic() - t0, time.process_time() - c0
    log.info("wrote %s and %s (%.1f s, %.1f CPU s)", weights, labels, secs, cpu)
    return TrainReport(task, secs, cpu, done, steps, score, (weights, labels))


# ------------------------------------------------------------------------------------------------
# evaluation


def _rounded(v: float) -> Optional[float]:
    """4 digits; None for NaN (a class absent from the set), so the line stays JSON."""
    return None if np.isnan(v) else round(float(v), 4)


def _methods(methods: Optional[Sequence[str]]) -> list[str]:
    from camserve.methods import available_methods

    names = list(methods) if methods else available_methods()
    unknown = [m for m in names if m not in available_methods()]
    if unknown:
        raise ValueError(f"invalid value for methods: {unknown[0]!r} (known: "
                         f"{', '.join(available_methods())})")
    return names


def evaluate(model_dir: Path | str, seed: int = 1234, *, n: int = 480,
             methods: Optional[Sequence[str]] = None, batch_size: int = 32,
             tolerance: int = POINTING_TOLERANCE) -> dict[str, Any]:
    """The quality of a dense shapes folder on ``n`` unseen images of ``rng_for(seed,
    "evaluate")`` (see the module docstring), every CAM method (default: all registered) on the
    folder's target layer; one JSON-ready dict."""
    import torch

    from camserve.engine import CamEngine
    from camserve.tasks import make_task

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"invalid value for n: {n!r} (a positive integer)")
    t0 = time.monotonic()
    loaded = load_model(model_dir)
    spec, task_name = loaded.spec, loaded.spec.task
    task = make_task(task_name, loaded.labels, spec.task_settings)
    engine = CamEngine(loaded.model, loaded.layer, reshape=loaded.reshape, task=task)
    data = make_dense_dataset(seed, n, stream="evaluate")
    names = _methods(methods)
    size = (IMAGE_SIZE, IMAGE_SIZE)
    out = _outputs(loaded.model, data.images, spec)
    report: dict[str, Any] = {"model": str(model_dir), "task": task_name, "seed": int(seed),
                              "n": n, "layer": loaded.layer}
    if task_name == "segmentation":
        ious = iou_per_class(out.argmax(1).numpy(), data.classes, len(SEG_CLASSES))
        report["miou"] = round(float(np.nanmean(ious)), 4)
        report["iou"] = {c: _rounded(v) for c, v in zip(SEG_CLASSES, ious)}
    else:
        truth = data.multi_hot()
        aps = [average_precision(out[:, k].numpy(), truth[:, k]) for k in range(len(CLASSES))]
        report["map"] = round(float(np.nanmean(aps)), 4)
        report["ap"] = {c: _rounded(v) for c, v in zip(CLASSES, aps)}
    per_method: dict[str, float] = {}
    rows, cols = np.nonzero(data.labels >= 0)  # one (image, object) per explained map
    for method in names:
        values: list[np.ndarray] = []
        for i in range(0, len(rows), batch_size):
            r = torch.from_numpy(rows[i:i + batch_size])
            lab = data.labels[rows[i:i + batch_size], cols[i:i + batch_size]]
            x = to_batch(data.images[r.numpy()], spec)
            if task_name == "segmentation":  # the class over its predicted mask (the default)
                targets: Any = torch.from_numpy(lab + 1)
            else:
                targets = torch.from_numpy(lab)
            heat = engine(x, targets=targets, method=method).heatmaps(size)
            if task_name == "segmentation":
                truth_masks = data.classes[r.numpy()] == (lab + 1)[:, None, None]
                h = heat.numpy().astype(np.float64)
                inside = (h * truth_masks).sum(axis=(1, 2))
                values.append(inside / np.maximum(h.sum(axis=(1, 2)), 1e-12))
            else:
                boxes = data.boxes[rows[i:i + batch_size], cols[i:i + batch_size]]
                values.append(pointing_hits(heat, boxes, tolerance).astype(np.float64))
        per_method[method] = round(float(np.concatenate(values).mean()), 4)
    report["energy_in_mask" if task_name == "segmentation" else "pointing_game"] = per_method
    report["maps"] = int(len(rows))
    report["seconds"] = round(time.monotonic() - t0, 1)
    log.info("evaluated %s on seed %d in %.1f s", model_dir, seed, report["seconds"])
    return report


# ------------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.dense_shapes",
                                description="The dense shapes models: train and evaluate.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a dense shapes folder, write its weights + labels")
    t.add_argument("--task", choices=TASKS, required=True)
    t.add_argument("--out", type=Path, default=None, help="model folder (default: the task's)")
    add_train_options(t, n=8000, n_help="training images", lr=3e-3, epochs=None)
    e = sub.add_parser("evaluate", help="miou / map and the CAM methods' energy / pointing game")
    e.add_argument("--model", type=Path, required=True, help="model folder")
    e.add_argument("--seed", type=int, required=True)
    e.add_argument("--n", type=int, default=480, help="evaluation images")
    e.add_argument("--methods", default=None, help="comma-separated CAM methods (default: all)")
    e.add_argument("--tolerance", type=int, default=POINTING_TOLERANCE, help="px around a box")
    e.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; the last line of ``evaluate`` is its JSON."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    try:
        import torch

        if args.threads < 1:
            raise ValueError(f"invalid value for --threads: {args.threads} (>= 1)")
        torch.set_num_threads(args.threads)
        if args.command == "train":
            done = train(args.out or DEFAULT_DIRS[args.task], args.task, seed=args.seed,
                         epochs=args.epochs, n=args.n, batch_size=args.batch_size, lr=args.lr,
                         max_seconds=args.max_seconds)
            print(f"trained {done.task}: {done.epochs} epochs ({done.steps} steps) in "
                  f"{done.seconds:.1f} s ({done.cpu_seconds:.1f} CPU s), held-out "
                  f"{'mIoU' if done.task == 'segmentation' else 'mAP'} {done.held_out:.4f}")
            for f in done.files:
                print(f"wrote {f}")
            return 0
        rep = evaluate(args.model, args.seed, n=args.n, tolerance=args.tolerance,
                       methods=args.methods.split(",") if args.methods else None)
        print(json.dumps(rep))
        return 0
    except (ValueError, OSError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

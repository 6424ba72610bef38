"""Synthetic shapes scenes for detection: the dataset, training and evaluation of the default
detector (``models/shapes-det``).

A scene has one to four shapes of different classes (:func:`tools.shapes.render_sample`), whose
boxes are known exactly; seeds select independent streams as in :mod:`tools.shapes`, so
evaluation always runs on scenes training never saw. Training fits the folder's ``ShapesDet``
(a CenterNet-style one-stage head: a focal loss on per-class centre heatmaps, GIoU + L1 on the box
at the centre cell). Evaluation loads the folder as the server does and reports one JSON line:
``map50`` (COCO-style AP at IoU 0.5 — 101-point interpolation — averaged over the classes) and
``box_pointing`` per CAM method (the share of correct detections — right label, IoU >= 0.5 with a
ground-truth box — whose map peak lies in that box, ``POINTING_TOLERANCE`` px around it counting).
Every detection is explained by its own score (``box_target: score``) through the serving engine.

CLI (``make train-det``, ``make evaluate MODEL=models/shapes-det SEED=N``)::

    python -m tools.shapes_det train --out models/shapes-det
    python -m tools.shapes_det evaluate --model models/shapes-det --seed 1234

Example::

    >>> scenes = make_scenes(seed=0, n=3)
    >>> [len(s.labels) >= 1 for s in scenes], scenes[0].image.shape
    ([True, True, True], (96, 96, 3))
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np

from tools.shapes import (CLASSES, MAX_OBJECTS, POINTING_TOLERANCE, SCENE_RADIUS, Sample, render_sample,
                          rng_for)

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "shapes-det"
STRIDE = 8
#: score threshold of the detections that enter the AP (the served threshold is the folder's)
EVAL_THRESHOLD = 0.05


def make_scenes(seed: int, n: int, *, stream: str = "train",
                rng: Optional[np.random.Generator] = None) -> list[Sample]:
    """``n`` scenes of 1..:data:`tools.shapes.MAX_OBJECTS` shapes of different classes (the count
    uniform), from ``rng_for(seed, stream)`` (or ``rng`` to continue a stream)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"invalid value for n: {n!r} (a non-negative integer)")
    gen = rng if rng is not None else rng_for(seed, stream)
    out = []
    for _ in range(n):
        k = int(gen.integers(1, MAX_OBJECTS + 1))
        out.append(render_sample(gen, gen.choice(len(CLASSES), size=k, replace=False),
                                 radius=SCENE_RADIUS if k >= 3 else None))
    return out


def write_samples(out: Path | str, seed: int, n: int) -> dict[str, list[dict[str, Any]]]:
    """Write ``n`` scene PNGs (``scene_<i:03d>.png``) of the ``samples`` stream and ``boxes.json``
    mapping each file name to its objects ``[{"label": <class name>, "box": [x0, y0, x1, y1]}]``;
    returns that mapping."""
    from PIL import Image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    index: dict[str, list[dict[str, Any]]] = {}
    for i, s in enumerate(make_scenes(seed, n, stream="samples")):
        name = f"scene_{i:03d}.png"
        Image.fromarray(s.image, "RGB").save(out / name)
        index[name] = [{"label": CLASSES[lab], "box": list(b)} for lab, b in zip(s.labels, s.boxes)]
    lines = [f"  {json.dumps(name)}: {json.dumps(objs)}" for name, objs in index.items()]
    (out / "boxes.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")
    return index


# ------------------------------------------------------------------------------------------------
# training


def scene_targets(samples: Sequence[Sample], grid: tuple[int, int], stride: int = STRIDE,
                  n_classes: int = len(CLASSES)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training targets on a ``grid`` (h, w) of ``stride`` px: per-class Gaussian centre heatmaps
    (N, C, h, w) (1 at each object's centre cell, sigma a sixth of its box in cells), the
    boxes ``x0, y0, x1, y1`` to regress at centre cells (N, 4, h, w) and their mask (N, h, w)."""
    h, w = grid
    heat = np.zeros((len(samples), n_classes, h, w), np.float32)
    boxes = np.zeros((len(samples), 4, h, w), np.float32)
    mask = np.zeros((len(samples), h, w), bool)
    ys, xs = np.mgrid[0:h, 0:w]
    for i, s in enumerate(samples):
        for lab, (x0, y0, x1, y1) in zip(s.labels, s.boxes):
            cx, cy = (x0 + x1) / 2 / stride, (y0 + y1) / 2 / stride
            gx, gy = min(int(cx), w - 1), min(int(cy), h - 1)
            sigma = max(0.5, max(x1 - x0, y1 - y0) / stride / 6)
            g = np.exp(-((xs - gx) ** 2 + (ys - gy) ** 2) / (2 * sigma ** 2)).astype(np.float32)
            heat[i, lab] = np.maximum(heat[i, lab], g)
            boxes[i, :, gy, gx] = (x0, y0, x1, y1)
            mask[i, gy, gx] = True
    return heat, boxes, mask


def _focal(logits: "torch.Tensor", heat: "torch.Tensor") -> "torch.Tensor":
    """CenterNet's penalty-reduced focal loss, summed and divided by the number of centres."""
    import torch
    import torch.nn.functional as F

    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = heat.eq(1).float()
    pos_loss = -F.logsigmoid(logits) * (1 - p) ** 2 * pos
    neg_loss = -F.logsigmoid(-logits) * p ** 2 * (1 - heat) ** 4 * (1 - pos)
    return (pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1)


@dataclass(frozen=True)
class TrainReport:
    """What :func:`train` did: wall time, epochs, steps, the last loss, the files written."""

    seconds: float
    epochs: int
    steps: int
    loss: float
    files: tuple[Path, ...]


def train(out: Path | str = DEFAULT_MODEL_DIR, *, seed: int = 0, epochs: int = 10, n: int = 6400,
          batch_size: int = 64, lr: float = 4e-3, max_seconds: Optional[float] = None) -> TrainReport:
    """Train the folder's detector (its ``model-config.yaml`` and ``model.py``) on ``n`` scenes of
    the ``train`` stream for ``epochs`` (AdamW, one-cycle); writes ``weights.pt`` (a state_dict)
    and ``index_to_name.json``."""
    import torch
    from torchvision.ops import generalized_box_iou_loss

    from camserve.models import ModelSpec, load_model_config
    from camserve.sources import build_from_source
    from tools.shapes import to_batch

    out = Path(out)
    spec = ModelSpec.from_config(load_model_config(out).get("handler"))
    torch.manual_seed(seed)
    model, _ = build_from_source(spec.arch, num_classes=spec.num_classes, arch_args=spec.arch_args,
                                 model_dir=out)  # random init: no weights file is read
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    t0 = time.monotonic()
    scenes = make_scenes(seed, n)
    images = np.stack([s.image for s in scenes])
    x_all = to_batch(images, spec)
    with torch.no_grad():
        grid = tuple(model.raw(x_all[:1])[0].shape[-2:])
    heat, boxes, mask = (torch.from_numpy(a) for a in scene_targets(scenes, grid))  # type: ignore[arg-type]
    log.info("%d scenes and targets ready in %.1f s (grid %s)", n, time.monotonic() - t0, grid)
    steps_per_epoch = math.ceil(n / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.15)
    gen = torch.Generator().manual_seed(seed)
    step, loss_v, done = 0, float("nan"), 0
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            x = x_all[idx]
            flip = torch.rand(len(idx), generator=gen) < 0.5  # horizontal flips: boxes mirrored
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            hm, bx, mk = heat[idx], boxes[idx], mask[idx]
            hm = torch.where(flip[:, None, None, None], hm.flip(-1), hm)
            mk = torch.where(flip[:, None, None], mk.flip(-1), mk)
            w_img = float(x.shape[-1])
            fb = torch.stack([w_img - bx[:, 2], bx[:, 1], w_img - bx[:, 0], bx[:, 3]], 1).flip(-1)
            bx = torch.where(flip[:, None, None, None], fb, bx)
            logits, reg = model.raw(x)
            pred = model.boxes(reg, x.shape[-2:])  # (B, h, w, 4)
            sel = mk.nonzero(as_tuple=True)
            p_box = pred[sel]
            t_box = bx.permute(0, 2, 3, 1)[sel]
            cy = (sel[1].float() + 0.5) * STRIDE
            cx = (sel[2].float() + 0.5) * STRIDE
            t_dist = torch.stack([cx - t_box[:, 0], cy - t_box[:, 1], t_box[:, 2] - cx,
                                  t_box[:, 3] - cy], 1).clamp(min=1.0) / STRIDE
            l1 = (reg.permute(0, 2, 3, 1)[sel] - t_dist.log()).abs().mean()
            giou = generalized_box_iou_loss(p_box, t_box, reduction="mean")
            loss = _focal(logits, hm) + giou + 0.5 * l1
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            loss_v = float(loss.detach())
        done = epoch + 1
        log.info("epoch %d/%d: loss %.4f, %.0f s", done, epochs, loss_v, time.monotonic() - t0)
        if max_seconds is not None and time.monotonic() - t0 > max_seconds and done < epochs:
            log.warning("stopping after %d of %d epochs: --max-seconds %.0f reached", done, epochs,
                        max_seconds)
            break
    model.eval()
    weights = out / (spec.weights or "weights.pt")
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, weights)
    labels = out / "index_to_name.json"
    labels.write_text(json.dumps({str(i): c for i, c in enumerate(CLASSES)}, indent=2) + "\n")
    return TrainReport(time.monotonic() - t0, done, step, loss_v, (weights, labels))


# ------------------------------------------------------------------------------------------------
# evaluation


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """COCO-style AP: the precision envelope sampled at 101 recall points 0, 0.01, ..., 1.

    Example::

        >>> average_precision(np.array([0.5, 1.0]), np.array([1.0, 0.5]))
        0.7524752475247525
    """
    if recall.size == 0:
        return 0.0
    env = np.maximum.accumulate(precision[::-1])[::-1]
    points = np.linspace(0.0, 1.0, 101)
    idx = np.searchsorted(recall, points, side="left")
    return float(np.mean([env[i] if i < env.size else 0.0 for i in idx]))


def _iou(box: Sequence[float], boxes: np.ndarray) -> np.ndarray:
    if boxes.size == 0:
        return np.zeros(0)
    x0 = np.maximum(box[0], boxes[:, 0]); y0 = np.maximum(box[1], boxes[:, 1])
    x1 = np.minimum(box[2], boxes[:, 2]); y1 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def match_detections(dets: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                     scenes: Sequence[Sample], iou: float = 0.5) -> list[np.ndarray]:
    """Per image, the ground-truth object each detection matches (-1: a false positive): greedy
    in score order, same label, IoU >= ``iou``, each object once (COCO's rule)."""
    out = []
    for (boxes, scores, labels), s in zip(dets, scenes):
        gt = np.asarray(s.boxes, dtype=np.float64).reshape(-1, 4)
        gl = np.asarray(s.labels)
        used = np.zeros(len(gl), bool)
        m = np.full(len(scores), -1)
        for j in np.argsort(-scores, kind="stable"):
            ious = np.where((gl == labels[j]) & ~used, _iou(boxes[j], gt), -1.0)
            if ious.size and ious.max() >= iou:
                k = int(ious.argmax())
                used[k] = True
                m[j] = k
        out.append(m)
    return out


def map50(dets: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], scenes: Sequence[Sample],
          n_classes: int = len(CLASSES)) -> float:
    """Mean over classes of the AP at IoU 0.5 (:func:`average_precision`) of ``dets`` (per image
    boxes, scores, labels) against the scenes' boxes."""
    matched = match_detections(dets, scenes)
    aps = []
    for c in range(n_classes):
        n_gt = sum(int(np.sum(np.asarray(s.labels) == c)) for s in scenes)
        sc = np.concatenate([d[1][d[2] == c] for d in dets]) if dets else np.zeros(0)
        tp = np.concatenate([m[d[2] == c] >= 0 for d, m in zip(dets, matched)]) if dets else \
            np.zeros(0, bool)
        if n_gt == 0:
            continue
        order = np.argsort(-sc, kind="stable")
        tp = tp[order].astype(np.float64)
        ctp = np.cumsum(tp)
        aps.append(average_precision(ctp / n_gt, ctp / np.arange(1, len(tp) + 1)))
    return float(np.mean(aps)) if aps else 0.0


def peak_in_box(heatmap: np.ndarray, box: Sequence[float], tolerance: int) -> bool:
    """The (first) maximum of ``heatmap`` (H, W) lies in ``box`` grown by ``tolerance`` px."""
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return (box[0] - tolerance <= x < box[2] + tolerance and
            box[1] - tolerance <= y < box[3] + tolerance)


@dataclass(frozen=True)
class DetEval:
    """What :func:`evaluate` measured."""

    seed: int
    n: int
    objects: int
    map50: float
    box_pointing: dict[str, float]
    explained: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "scenes": self.n, "objects": self.objects,
                "map50": round(self.map50, 4),
                "box_pointing": {k: round(v, 4) for k, v in self.box_pointing.items()},
                "explained": self.explained, "seconds": round(self.seconds, 1)}


def evaluate(model_dir: Path | str = DEFAULT_MODEL_DIR, seed: int = 1234, *, n: int = 400,
             methods: Optional[Sequence[str]] = None, tolerance: int = POINTING_TOLERANCE,
             batch_size: int = 32) -> DetEval:
    """Detect and explain ``n`` fresh scenes of ``rng_for(seed, "evaluate")`` (see the module
    docstring). The AP uses detections above :data:`EVAL_THRESHOLD`; the pointing uses the
    detections the folder serves (its ``score_threshold``) that are correct."""
    import torch

    from camserve.engine import CamEngine
    from camserve.methods import available_methods, get_method
    from camserve.models import load_model_dir
    from camserve.tasks import make_task
    from camserve.tasks.detection import detection_targets
    from tools.shapes import to_batch

    t0 = time.monotonic()
    loaded = load_model_dir(model_dir, overrides={"score_threshold": EVAL_THRESHOLD})
    served = make_task("detection", loaded.labels,
                       {**loaded.spec.task_settings,
                        "score_threshold": _served_threshold(model_dir)})
    low = make_task("detection", loaded.labels, loaded.spec.task_settings)
    methods = [m for m in (methods or available_methods())  # a gradient-free map is the same
               if get_method(m).pure and get_method(m).gradients]  # for every box
    engine = CamEngine(loaded.model, loaded.layer, reshape=loaded.reshape, task=low)
    scenes = make_scenes(seed, n, stream="evaluate")
    dets: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    hits = {m: 0 for m in methods}
    explained = 0
    for i in range(0, n, batch_size):
        part = scenes[i:i + batch_size]
        x = to_batch(np.stack([s.image for s in part]), loaded.spec)
        out = low.to_host(engine.predict(x))
        batch = [(d.boxes.numpy().astype(np.float64), d.scores.numpy(), d.labels.numpy())
                 for d in out]
        dets.extend(batch)
        matched = match_detections(batch, part)
        rows = []
        for d, m in zip(batch, matched):
            ok = [j for j in range(len(m)) if m[j] >= 0 and d[1][j] >= served.score_threshold]
            rows.append([(int(d[2][j]), d[0][j].tolist(), "score") for j in ok][:16])
        if not any(rows):
            continue
        keep = [r for r, items in enumerate(rows) if items]
        tb = detection_targets([rows[r] for r in keep])
        for name in methods:
            res = engine(x, targets=tb, method=name, rows=keep)
            maps = res.heatmaps(tuple(x.shape[-2:])).numpy()
            for slot, r in enumerate(keep):
                for k, (_, box, _) in enumerate(rows[r]):
                    j = next(j for j in range(len(batch[r][0]))
                             if batch[r][0][j].tolist() == box)
                    gt = part[r].boxes[int(matched[r][j])]
                    hits[name] += int(peak_in_box(maps[slot, k], gt, tolerance))
        explained += sum(len(rows[r]) for r in keep)
    report = DetEval(int(seed), n, sum(len(s.labels) for s in scenes), map50(dets, scenes),
                     {m: hits[m] / max(explained, 1) for m in methods}, explained,
                     time.monotonic() - t0)
    log.info("evaluated %s on seed %d: %s", model_dir, seed, report.to_json())
    return report


def _served_threshold(model_dir: Path | str) -> float:
    from camserve.models import ModelSpec, load_model_config

    spec = ModelSpec.from_config(load_model_config(model_dir).get("handler"))
    return float(spec.task_settings.get("score_threshold", 0.5))


# ------------------------------------------------------------------------------------------------
# CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.shapes_det",
                                description="Synthetic shapes scenes: train and evaluate a detector.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the detector of a folder, write weights.pt + labels")
    t.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--epochs", type=int, default=10)
    t.add_argument("--n", type=int, default=6400, help="training scenes")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=4e-3)
    t.add_argument("--max-seconds", type=float, default=None)
    t.add_argument("--threads", type=int, default=2)
    e = sub.add_parser("evaluate", help="map50 and box pointing per CAM method on fresh scenes")
    e.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR)
    e.add_argument("--seed", type=int, required=True)
    e.add_argument("--n", type=int, default=400, help="scenes")
    e.add_argument("--methods", default=None, help="comma list (default: every pure method)")
    e.add_argument("--threads", type=int, default=2)
    s = sub.add_parser("samples", help="write scene PNGs and boxes.json")
    s.add_argument("--seed", type=int, required=True)
    s.add_argument("--n", type=int, default=6)
    s.add_argument("--out", type=Path, required=True)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; the last line of ``evaluate`` is its JSON."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    import torch

    try:
        if args.command == "samples":
            index = write_samples(args.out, args.seed, args.n)
            print(f"wrote {len(index)} scenes and boxes.json to {args.out}")
            return 0
        if args.threads < 1:
            raise ValueError(f"invalid value for --threads: {args.threads} (>= 1)")
        torch.set_num_threads(args.threads)
        if args.command == "train":
            rep = train(args.out, seed=args.seed, epochs=args.epochs, n=args.n,
                        batch_size=args.batch_size, lr=args.lr, max_seconds=args.max_seconds)
            print(f"trained {rep.epochs} epochs ({rep.steps} steps) in {rep.seconds:.1f} s, "
                  f"last loss {rep.loss:.4f}")
            for f in rep.files:
                print(f"wrote {f}")
            return 0
        methods = None if args.methods is None else [m.strip() for m in args.methods.split(",")]
        res = evaluate(args.model, args.seed, n=args.n, methods=methods)
        print(json.dumps(res.to_json()))
        return 0
    except (ValueError, OSError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

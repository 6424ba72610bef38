"""Synthetic shapes: the dataset, training and evaluation of the project's default model.

The generator draws one to four coloured shapes of 8 classes (:data:`CLASSES`, the order is the
class index) on a cluttered, noisy 96×96 RGB background and knows the ground-truth box of every shape, so
the answer to "where is the circle?" is known exactly. Generation needs only numpy and Pillow; every
random choice is drawn from one ``numpy.random.Generator``, so a seed gives identical images.

Boxes are ``[x0, y0, x1, y1]`` in pixels with exclusive ends (the Pillow crop convention): the shape
covers pixels ``x0 <= x < x1``, ``y0 <= y < y1``, a pixel counting as covered when at least half of
it lies inside the shape (shapes are drawn 4× supersampled and box-filtered down, which antialiases
their edges deterministically).

Seeds select independent streams for each use (:func:`rng_for`): ``train`` with seed 0 and
``evaluate`` with seed 0 draw different images, so evaluation is always on held-out data.

This is project tooling, not part of the installed ``camserve`` package: it lives in the checkout
(``tools/``) and runs from the repository root. The model folder is loaded the way the server loads
it, through :func:`camserve.models.load_model_dir`. The CLI is thin, over :func:`train`,
:func:`evaluate` and :func:`write_samples` (``make train``, ``make evaluate``, ``make samples``)::

    python -m tools.shapes train --out models/shapes            # writes weights.pt + labels
    python -m tools.shapes evaluate --model models/shapes --seed 1234  # + the CAM methods' faithfulness
    python -m tools.shapes samples --seed 7 --n 8 --out models/shapes/samples

Example::

    >>> from tools.shapes import CLASSES, make_dataset
    >>> data = make_dataset(seed=0, n=4, n_objects=2)
    >>> data.images.shape, data.labels.shape, data.boxes.shape
    ((4, 96, 96, 3), (4, 2), (4, 2, 4))
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

if TYPE_CHECKING:  # torch is needed for training and evaluation only
    import torch
    from torch import nn

    from camserve.models import LoadedModel, ModelSpec

log = logging.getLogger(__name__)

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring", "diamond",
                            "hexagon")
IMAGE_SIZE = 96
SUPERSAMPLE = 4
STREAMS: tuple[str, ...] = ("train", "evaluate", "samples")
POINTING_TOLERANCE = 3  # px: a heatmap peak this close to a box still counts as inside
DEFAULT_METRICS_N = 64  # images of the faithfulness comparison in `evaluate` (CLI default)
DEFAULT_ROAD_N = 8  # of which ROAD runs on the first ones (it costs seconds per image and row)

Box = tuple[int, int, int, int]

# radius ranges (px, circumscribed circle) for one object alone and for two objects together
_RADIUS_SINGLE = (12.0, 24.0)
_RADIUS_PAIR = (11.0, 18.0)
_RADIUS_TRIPLE = (10.0, 15.0)
SCENE_RADIUS = (9.0, 15.0)  # three or four objects (detection scenes)
MAX_OBJECTS = 4
_MIN_CONTRAST = 110.0  # minimum RGB distance between a shape and the background under it
_PAIR_GAP = 2  # px between the boxes of the two objects


# ------------------------------------------------------------------------------------------------
# geometry


def _regular(n: int, radius: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    """Vertices of a regular n-gon of the given circumradius, first vertex at ``phase``."""
    t = phase + 2.0 * math.pi * np.arange(n) / n
    return np.stack([np.cos(t), np.sin(t)], axis=1) * radius


def _outlines(label: int, rng: np.random.Generator) -> tuple[list[np.ndarray], float]:
    """Unit outlines (circumradius 1) of a shape of class ``label`` and its rotation (radians).

    Returns ``(polygons, angle)``: the first polygon is filled, the others (a ring's hole) cleared.
    Squares and diamonds turn at most 20° so that one never looks like the other; a diamond is a
    rhombus whose width is 55-72% of its height.
    """
    name = CLASSES[label]
    full_turn = float(rng.uniform(0.0, 2.0 * math.pi))
    if name == "circle":
        return [_regular(96)], 0.0
    if name == "ring":
        return [_regular(96), _regular(96, float(rng.uniform(0.45, 0.62)))], 0.0
    if name == "square":
        return [_regular(4, phase=math.pi / 4)], float(rng.uniform(-1.0, 1.0) * math.radians(20))
    if name == "diamond":
        a = float(rng.uniform(0.55, 0.72))
        poly = np.array([[0.0, -1.0], [a, 0.0], [0.0, 1.0], [-a, 0.0]])
        return [poly], float(rng.uniform(-1.0, 1.0) * math.radians(20))
    if name == "triangle":
        return [_regular(3)], full_turn
    if name == "hexagon":
        return [_regular(6)], full_turn
    if name == "star":
        inner = float(rng.uniform(0.38, 0.5))
        outer = _regular(5)
        inner_pts = _regular(5, inner, phase=-math.pi / 2 + math.pi / 5)
        return [np.stack([outer, inner_pts], axis=1).reshape(10, 2)], full_turn
    if name == "cross":
        w = float(rng.uniform(0.28, 0.38))
        poly = np.array([[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w], [w, 1], [-w, 1],
                         [-w, w], [-1, w], [-1, -w], [-w, -w]], dtype=float)
        return [poly], full_turn
    raise ValueError(f"invalid value for label: {label} (known: 0..{len(CLASSES) - 1})")


def _shape_mask(label: int, center: tuple[float, float], radius: float, size: int,
                rng: np.random.Generator) -> np.ndarray:
    """Coverage mask (size×size uint8, 0..255) of one shape, drawn supersampled and box-filtered.

    Only the pixel-aligned square around the shape is drawn (at ``SUPERSAMPLE``×) and filtered;
    the rest of the mask is zero.
    """
    polys, angle = _outlines(label, rng)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    x0 = max(int(math.floor(center[0] - radius)) - 1, 0)
    y0 = max(int(math.floor(center[1] - radius)) - 1, 0)
    x1 = min(int(math.ceil(center[0] + radius)) + 1, size)
    y1 = min(int(math.ceil(center[1] + radius)) + 1, size)
    big = Image.new("L", ((x1 - x0) * SUPERSAMPLE, (y1 - y0) * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(big)
    origin = np.array([x0, y0], dtype=float)
    for i, poly in enumerate(polys):
        pts = ((poly @ rot.T) * radius + np.asarray(center) - origin) * SUPERSAMPLE
        draw.polygon([(float(x), float(y)) for x, y in pts], fill=255 if i == 0 else 0)
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[y0:y1, x0:x1] = np.asarray(big.resize((x1 - x0, y1 - y0), Image.Resampling.BOX))
    return mask


def mask_box(mask: np.ndarray, threshold: int = 128) -> Box:
    """Tight box ``[x0, y0, x1, y1]`` (exclusive ends) of the pixels where ``mask >= threshold``."""
    ys, xs = np.nonzero(mask >= threshold)
    if xs.size == 0:
        raise ValueError("invalid value for mask: no pixel reaches the threshold")
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


# ------------------------------------------------------------------------------------------------
# rendering


@dataclass(frozen=True)
class Sample:
    """One generated image.

    ``image`` (H, W, 3) uint8; ``labels`` class indices (one to four, all different); ``boxes`` one
    ``[x0, y0, x1, y1]`` per label (exclusive ends); ``masks`` (k, H, W) uint8 coverage per label.
    """

    image: np.ndarray
    labels: tuple[int, ...]
    boxes: tuple[Box, ...]
    masks: np.ndarray

    @property
    def label(self) -> int:
        """The first (for single-object images: the only) label."""
        return self.labels[0]

    @property
    def box(self) -> Box:
        """The first (for single-object images: the only) box."""
        return self.boxes[0]


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0.0, 255.0, size=3)


def _background(rng: np.random.Generator, size: int, clutter: bool) -> np.ndarray:
    """A float32 (size, size, 3) background: a flat colour, or a gradient with blurred blobs and
    crisp lines when ``clutter``."""
    base = _random_color(rng)
    if not clutter:
        return np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    other = np.clip(base + rng.uniform(-60.0, 60.0, size=3), 0.0, 255.0)
    theta = float(rng.uniform(0.0, 2.0 * math.pi))
    ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32) / math.sqrt(0.5)
    t = np.clip(math.cos(theta) * ramp[None, :] + math.sin(theta) * ramp[:, None] + 0.5, 0.0, 1.0)
    bg = base.astype(np.float32) + t[..., None] * (other - base).astype(np.float32)
    img = Image.fromarray(np.clip(bg, 0, 255).round().astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 7))):  # soft blobs
        cx, cy = rng.uniform(0, size, size=2)
        rx, ry = rng.uniform(4.0, 16.0, size=2)
        color = tuple(int(c) for c in np.clip(base + rng.uniform(-90, 90, size=3), 0, 255))
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=color)
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(2.5, 4.5))))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 7))):  # crisp lines
        x0, y0, x1, y1 = rng.uniform(-10, size + 10, size=4)
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.line([(x0, y0), (x1, y1)], fill=color, width=int(rng.integers(1, 3)))
    return np.asarray(img, dtype=np.float32)


def _object_color(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A colour at least ``_MIN_CONTRAST`` away (RGB distance) from ``under`` (mean background)."""
    best, best_d = _random_color(rng), -1.0
    for _ in range(64):
        c = _random_color(rng)
        d = float(np.linalg.norm(c - under))
        if d >= _MIN_CONTRAST:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


def _place(rng: np.random.Generator, radius: float, size: int,
           avoid: Sequence[Box]) -> Optional[tuple[float, float]]:
    """A centre for a shape of circumradius ``radius`` fully inside the image whose circumscribed
    square keeps ``_PAIR_GAP`` px from every box in ``avoid``; None after 200 tries."""
    lo, hi = radius + 1.0, size - radius - 1.0
    for _ in range(200):
        cx, cy = (float(v) for v in rng.uniform(lo, hi, size=2))
        sq = (cx - radius, cy - radius, cx + radius, cy + radius)
        if all(sq[2] + _PAIR_GAP <= b[0] or b[2] + _PAIR_GAP <= sq[0] or
               sq[3] + _PAIR_GAP <= b[1] or b[3] + _PAIR_GAP <= sq[1] for b in avoid):
            return cx, cy
    return None


def render_sample(rng: np.random.Generator, labels: Sequence[int], *, size: int = IMAGE_SIZE,
                  clutter: bool = True, radius: Optional[tuple[float, float]] = None) -> Sample:
    """Draw the shapes ``labels`` (one to :data:`MAX_OBJECTS` different classes) on a new
    background.

    With ``clutter`` the background has a colour gradient, blurred blobs, 2-6 random lines and
    Gaussian noise (sigma 2-10) over the whole image; without it, a flat colour and no noise (used
    by tests to see the drawn pixels). Shapes never overlap: their boxes are >= 2 px apart.
    ``radius``: the (low, high) range of the shapes' radii at 96 px; by default it shrinks with the
    number of shapes (the detection scenes use :data:`SCENE_RADIUS` from three shapes on).
    """
    labels = tuple(int(v) for v in labels)
    if not 1 <= len(labels) <= MAX_OBJECTS:
        raise ValueError(f"invalid value for labels: {labels} (1 to {MAX_OBJECTS} class indices)")
    if len(set(labels)) != len(labels):
        raise ValueError(f"invalid value for labels: {labels} (the classes must be different)")
    for v in labels:
        if not 0 <= v < len(CLASSES):
            raise ValueError(f"invalid value for labels: {v} (known: 0..{len(CLASSES) - 1})")
    if size < 48:
        raise ValueError(f"invalid value for size: {size} (at least 48 px)")
    r_lo, r_hi = radius or (_RADIUS_SINGLE, _RADIUS_PAIR, _RADIUS_TRIPLE, SCENE_RADIUS)[len(labels) - 1]
    scale = size / IMAGE_SIZE
    img = _background(rng, size, clutter)
    while True:  # a pair that does not fit is redrawn smaller; one shape always fits
        boxes: list[Box] = []
        masks: list[np.ndarray] = []
        for lab in labels:
            radius = float(rng.uniform(r_lo, r_hi)) * scale
            center = _place(rng, radius, size, boxes)
            if center is None:
                break
            mask = _shape_mask(lab, center, radius, size, rng)
            boxes.append(mask_box(mask))
            masks.append(mask)
        if len(boxes) == len(labels):
            break
        r_hi = max(r_lo, r_hi * 0.9)
    out = img.copy()
    for mask, box in zip(masks, boxes):
        under = img[box[1]:box[3], box[0]:box[2]].reshape(-1, 3).mean(axis=0)
        color = _object_color(rng, under)
        alpha = mask.astype(np.float32)[..., None] * np.float32(1.0 / 255.0)
        out += alpha * (color.astype(np.float32) - out)
    if clutter:
        sigma = float(rng.uniform(2.0, 10.0))
        out += rng.standard_normal(size=out.shape, dtype=np.float32) * np.float32(sigma)
    image = np.clip(out, 0.0, 255.0).round().astype(np.uint8)
    return Sample(image=image, labels=labels, boxes=tuple(boxes), masks=np.stack(masks))


def rng_for(seed: int, stream: str = "train") -> np.random.Generator:
    """The random generator of ``stream`` (one of :data:`STREAMS`) for ``seed``.

    Streams are independent: training and evaluation with the same seed never share images.
    """
    if stream not in STREAMS:
        raise ValueError(f"invalid value for stream: {stream!r} (known: {', '.join(STREAMS)})")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"invalid value for seed: {seed!r} (a non-negative integer)")
    return np.random.default_rng(np.random.SeedSequence([int(seed), STREAMS.index(stream)]))


@dataclass(frozen=True)
class ShapesData:
    """A batch of generated images: ``images`` (N, H, W, 3) uint8, ``labels`` (N, k) int64,
    ``boxes`` (N, k, 4) int64 with k = objects per image."""

    images: np.ndarray
    labels: np.ndarray
    boxes: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])


def make_dataset(seed: int, n: int, *, n_objects: int = 1, stream: str = "train",
                 size: int = IMAGE_SIZE, clutter: bool = True,
                 rng: Optional[np.random.Generator] = None) -> ShapesData:
    """``n`` images of ``n_objects`` (1 or 2) shapes each, from ``rng_for(seed, stream)``.

    Single-object classes are balanced (each class ``n // 8`` or one more times, in a shuffled
    order); pairs are two different classes drawn uniformly. Pass ``rng`` to continue a stream.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"invalid value for n: {n!r} (a non-negative integer)")
    if n_objects not in (1, 2):
        raise ValueError(f"invalid value for n_objects: {n_objects!r} (1 or 2)")
    gen = rng if rng is not None else rng_for(seed, stream)
    k = len(CLASSES)
    if n_objects == 1:
        label_rows = gen.permutation(np.arange(n) % k)[:, None]
    else:
        label_rows = np.stack([gen.choice(k, size=2, replace=False) for _ in range(n)]) \
            if n else np.zeros((0, 2), dtype=np.int64)
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    boxes = np.zeros((n, n_objects, 4), dtype=np.int64)
    for i in range(n):
        s = render_sample(gen, label_rows[i], size=size, clutter=clutter)
        images[i] = s.image
        boxes[i] = np.asarray(s.boxes)
    return ShapesData(images=images, labels=label_rows.astype(np.int64), boxes=boxes)


def write_samples(out: Path | str, seed: int, n: int) -> dict[str, dict[str, Any]]:
    """Write ``n`` single-object PNGs (``<label>_<i:03d>.png``, classes in :data:`CLASSES` order, so
    ``n=8`` gives one per class) and ``boxes.json`` mapping each file name to
    ``{"label": <class name>, "box": [x0, y0, x1, y1]}``; returns that mapping."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"invalid value for n: {n!r} (a positive integer)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rng = rng_for(seed, "samples")
    index: dict[str, dict[str, Any]] = {}
    for i in range(n):
        label = i % len(CLASSES)
        s = render_sample(rng, [label])
        name = f"{CLASSES[label]}_{i:03d}.png"
        Image.fromarray(s.image, "RGB").save(out / name)
        index[name] = {"label": CLASSES[label], "box": list(s.box)}
    lines = [f"  {json.dumps(name)}: {json.dumps(entry)}" for name, entry in index.items()]
    (out / "boxes.json").write_text("{\n" + ",\n".join(lines) + "\n}\n")
    log.info("wrote %d samples and boxes.json to %s", n, out)
    return index


# ------------------------------------------------------------------------------------------------
# the model folder (torch from here on; loading goes through camserve.models like the server's)

#: The checkout's default model folder (this file lives in ``<repo>/tools``).
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "shapes"
CONFIG_NAME = "model-config.yaml"


def read_spec(folder: Path | str) -> "ModelSpec":
    """The validated ``handler:`` block of ``<folder>/model-config.yaml``, checked to describe a
    shapes classifier (``num_classes`` = 8). Training needs it before any weights exist."""
    from camserve.models import ConfigError, ModelSpec, load_model_config

    doc = load_model_config(folder)
    spec = ModelSpec.from_config(doc.get("handler"))
    if spec.num_classes != len(CLASSES):
        raise ConfigError(f"invalid value for handler.num_classes in {Path(folder) / CONFIG_NAME}: "
                          f"{spec.num_classes!r} (the shapes dataset has {len(CLASSES)} classes)")
    return spec


def load_model(folder: Path | str) -> "LoadedModel":
    """The model of a folder as the server loads it (:func:`camserve.models.load_model_dir`:
    weights with ``weights_only=True``, eval mode, frozen parameters, labels, target layer),
    checked to be a shapes classifier: 8 classes named as in :data:`CLASSES`."""
    from camserve.models import ConfigError, load_model_dir

    loaded = load_model_dir(folder)
    if loaded.num_classes != len(CLASSES):
        raise ConfigError(f"invalid value for handler.num_classes in {Path(folder) / CONFIG_NAME}: "
                          f"{loaded.num_classes!r} (the shapes dataset has {len(CLASSES)} classes)")
    if tuple(loaded.labels) != CLASSES:
        raise ConfigError(f"{Path(folder)}: classes {_cut(loaded.labels)} are not the shapes "
                          f"classes {list(CLASSES)}")
    return loaded


def _cut(value: Any, limit: int = 100) -> str:
    """``repr`` of a value cut to ``limit`` characters (for messages)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def preprocess_images(images: np.ndarray, spec: "ModelSpec") -> "torch.Tensor":
    """(N, H, W, 3) uint8 -> (N, 3, h, w) float32 through :func:`camserve.images.preprocess`, the
    server's path (bilinear resize to ``spec.input_size`` if needed, ``(x / 255 - mean) / std``)."""
    import torch

    from camserve.images import preprocess

    _check_images(images)
    return torch.stack([preprocess(Image.fromarray(im, "RGB"), spec.input_size, spec.mean, spec.std)
                        for im in images])


def to_batch(images: np.ndarray, spec: "ModelSpec") -> "torch.Tensor":
    """A vectorised :func:`preprocess_images` for training: the same arithmetic in one tensor op
    when the images already have the input size (the generated ones do); otherwise it falls back
    to :func:`preprocess_images`. A test checks that both give the same tensor."""
    import torch

    _check_images(images)
    if tuple(images.shape[1:3]) != tuple(spec.input_size):
        return preprocess_images(images, spec)
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


def _check_images(images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[-1] != 3 or \
            images.dtype != np.uint8:
        desc = f"{images.shape} {images.dtype}" if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"invalid value for images: expected (N, H, W, 3) uint8, got {desc}")


# ------------------------------------------------------------------------------------------------
# training


@dataclass(frozen=True)
class TrainReport:
    """What :func:`train` did: wall time, epochs and steps run, accuracy on a held-out slice of the
    training stream, and the files written."""

    seconds: float
    cpu_seconds: float
    epochs: int
    steps: int
    val_accuracy: float
    files: tuple[Path, ...]


def _prepare_folder(out: Path) -> None:
    """Give a new output folder the default model's ``model.py`` and config (never overwritten)."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / CONFIG_NAME).is_file():
        return
    for name in (CONFIG_NAME, "model.py"):
        src = DEFAULT_MODEL_DIR / name
        if not src.is_file():
            raise FileNotFoundError(f"{out} has no {CONFIG_NAME} and the default {src} is missing")
        if not (out / name).exists():
            (out / name).write_bytes(src.read_bytes())
    log.info("copied %s and model.py from %s to %s", CONFIG_NAME, DEFAULT_MODEL_DIR, out)


def _accuracy(model: "nn.Module", data: ShapesData, spec: "ModelSpec",
              batch_size: int = 128) -> float:
    import torch

    hits = 0
    with torch.inference_mode():
        for i in range(0, len(data), batch_size):
            logits = model(to_batch(data.images[i:i + batch_size], spec))
            hits += int((logits.argmax(1).numpy() == data.labels[i:i + batch_size, 0]).sum())
    return hits / max(len(data), 1)


def fit(model: "nn.Module", n_total: int, batch: Any, loss_fn: Any, *, epochs: int,
        batch_size: int, lr: float, seed: int, max_seconds: Optional[float] = None,
        t0: Optional[float] = None, c0: Optional[float] = None, held_out: Any = None
        ) -> tuple[int, int]:
    """The training loop of the shapes models: AdamW (weight decay 5e-4), a short warm-up then
    cosine decay. Each epoch visits the ``n_total`` training rows in a new order, in batches of
    ``batch_size``: ``batch(idx)`` (sorted row indices) gives ``(x, target)``; each batch is
    turned by a random multiple of 90° and flipped at random, its target too when it is a map
    (N, H, W); ``loss_fn(model(x), target)`` is minimised. Stops early (with a warning) after
    ``max_seconds`` since ``t0``; ``held_out(model) -> (name, value)`` is logged after each epoch.
    Returns the epochs and the steps run (the model is left in eval mode)."""
    import torch

    t0 = time.monotonic() if t0 is None else t0
    c0 = time.process_time() if c0 is None else c0
    steps_per_epoch = max(1, n_total // batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    total_steps = epochs * steps_per_epoch
    warmup = max(1, total_steps // 30)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min((i + 1) / warmup, 0.5 * (
        1.0 + math.cos(math.pi * min(i / total_steps, 1.0)))))
    gen = torch.Generator().manual_seed(seed)
    steps, done, stopped = 0, 0, False
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(n_total, generator=gen).numpy()
        total = 0.0
        for b in range(steps_per_epoch):
            x, y = batch(np.sort(order[b * batch_size:(b + 1) * batch_size]))
            turns, flip = (int(v) for v in torch.randint(0, 4, (2,), generator=gen))
            x = torch.rot90(x, turns, dims=(2, 3))
            if y.dim() == 3:
                y = torch.rot90(y, turns, dims=(1, 2))
            if flip % 2:
                x = x.flip(3)
                y = y.flip(2) if y.dim() == 3 else y
            x = x.contiguous(memory_format=torch.channels_last)
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            steps += 1
            total += float(loss.detach())
            if max_seconds is not None and time.monotonic() - t0 > max_seconds:
                log.warning("stopping early: %.0f s time budget spent in epoch %d step %d",
                            max_seconds, epoch + 1, b + 1)
                stopped = True
                break
        model.eval()
        done = epoch + 1
        name, value = held_out(model) if held_out is not None else ("held-out", float("nan"))
        log.info("epoch %d/%d: loss %.4f, %s %.4f, %.0f s (%.0f CPU s)", done, epochs,
                 total / max(b + 1, 1), name, value, time.monotonic() - t0,
                 time.process_time() - c0)
        if stopped:
            break
    return done, steps


def train(out: Path | str, *, seed: int = 0, epochs: int = 8, n: int = 9600,
          pair_fraction: float = 0.25, batch_size: int = 64, lr: float = 2e-3,
          max_seconds: Optional[float] = None) -> TrainReport:
    """Train the model of folder ``out`` on freshly generated shapes; write ``weights.pt`` and
    ``index_to_name.json`` there.

    ``n`` single-object images plus ``n * pair_fraction`` two-object images are generated once
    from ``rng_for(seed, "train")`` and seen ``epochs`` times under random 90° turns and flips.
    Two-object images train towards probability 0.5 for each of their classes, which keeps the
    evidence for each class on its own shape. AdamW, a short warm-up then cosine decay; stops
    early (with a warning) after ``max_seconds``. A folder without ``model-config.yaml`` first gets
    the default model's config and ``model.py``.
    """
    import torch
    import torch.nn.functional as F

    for name, value, lo in (("epochs", epochs, 1), ("n", n, 8), ("batch_size", batch_size, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise ValueError(f"invalid value for {name}: {value!r} (an int >= {lo})")
    if not 0.0 <= pair_fraction <= 1.0:
        raise ValueError(f"invalid value for pair_fraction: {pair_fraction!r} (0..1)")
    from camserve.models import build_model

    out = Path(out)
    _prepare_folder(out)
    spec = read_spec(out)
    if not spec.weights or not spec.labels:
        raise ValueError(f"{out / CONFIG_NAME}: handler.weights and handler.labels name the files "
                         f"train writes; both are needed")
    t0, c0 = time.monotonic(), time.process_time()
    torch.manual_seed(seed)
    model = build_model(dataclasses.replace(spec, weights=None), out)  # fresh initialisation
    for p in model.parameters():
        p.requires_grad_(True)
    model = model.to(memory_format=torch.channels_last)  # ~15% faster convolutions on CPU

    rng = rng_for(seed, "train")
    n_pairs = int(round(n * pair_fraction))
    single = make_dataset(seed, n, rng=rng)
    pairs = make_dataset(seed, n_pairs, n_objects=2, rng=rng)
    val = make_dataset(seed, min(400, n), rng=rng)
    n_total = n + n_pairs
    targets = torch.zeros(n_total, len(CLASSES))
    targets[torch.arange(n), torch.from_numpy(single.labels[:, 0])] = 1.0
    if n_pairs:
        rows = torch.arange(n, n + n_pairs)[:, None].expand(-1, 2)
        targets[rows, torch.from_numpy(pairs.labels)] = 0.5
    log.info("generated %d + %d training images in %.1f s (%.1f CPU s)", n, n_pairs,
             time.monotonic() - t0, time.process_time() - c0)

    def batch(idx: np.ndarray) -> tuple["torch.Tensor", "torch.Tensor"]:
        # idx is sorted: the single-object rows come first, as in ``targets``
        x = to_batch(np.concatenate([single.images[idx[idx < n]],
                                     pairs.images[idx[idx >= n] - n]]), spec)
        return x, targets[idx]

    done, steps = fit(model, n_total, batch, F.cross_entropy, epochs=epochs,
                      batch_size=batch_size, lr=lr, seed=seed, max_seconds=max_seconds, t0=t0,
                      c0=c0, held_out=lambda m: ("held-out accuracy", _accuracy(m, val, spec)))
    model = model.to(memory_format=torch.contiguous_format).eval()
    val_acc = _accuracy(model, val, spec)
    weights = out / spec.weights
    labels = out / spec.labels
    torch.save(model.state_dict(), weights)
    labels.write_text(json.dumps({str(i): c for i, c in enumerate(CLASSES)}, indent=2) + "\n")
    secs, cpu = time.monotonic() - t0, time.process_time() - c0
    log.info("wrote %s and %s (%.1f s, %.1f CPU s)", weights, labels, secs, cpu)
    return TrainReport(seconds=secs, cpu_seconds=cpu, epochs=done, steps=steps,
                       val_accuracy=val_acc, files=(weights, labels))


# ------------------------------------------------------------------------------------------------
# evaluation


@dataclass(frozen=True)
class EvalReport:
    """Quality of a model folder on fresh images of one seed.

    ``accuracy``: top-1 on the single-object images; ``pointing_game``: share of their Grad-CAM
    maps (true class as target) whose peak lies in the box; ``pointing_game_two_objects``: the same
    over both maps of every two-object image (each class explained, each must point into its own
    box); ``per_class``: class name -> (accuracy, pointing game) on single-object images.
    """

    seed: int
    n_single: int
    n_pairs: int
    tolerance: int
    accuracy: float
    pointing_game: float
    pointing_game_two_objects: float
    per_class: dict[str, tuple[float, float]]
    seconds: float
    comparison: Optional["Comparison"] = None

    def metrics(self) -> dict[str, float]:
        """The three headline numbers, rounded to 4 digits."""
        return {"accuracy": round(self.accuracy, 4), "pointing_game": round(self.pointing_game, 4),
                "pointing_game_two_objects": round(self.pointing_game_two_objects, 4)}

    def to_json(self) -> dict[str, Any]:
        """:meth:`metrics` plus, when the comparison ran, ``"metrics": {row: {key: value}}``
        (:meth:`Comparison.rounded`): the last line of ``python -m tools.shapes evaluate``."""
        out: dict[str, Any] = dict(self.metrics())
        if self.comparison is not None:
            out["metrics"] = self.comparison.rounded()
            out["method_cost"] = {row: {k: round(v, 2) for k, v in c.items()}
                                  for row, c in self.comparison.method_cost.items()}
        return out


def pointing_hits(heatmaps: "torch.Tensor", boxes: np.ndarray, tolerance: int) -> np.ndarray:
    """Whether each map's peak (first argmax) lies in its box grown by ``tolerance`` px.

    ``heatmaps`` (..., H, W); ``boxes`` (..., 4) ``[x0, y0, x1, y1]`` with exclusive ends.
    """
    h, w = heatmaps.shape[-2:]
    flat = heatmaps.reshape(-1, h * w).argmax(dim=1).cpu().numpy()
    ys, xs = flat // w, flat % w
    b = np.asarray(boxes).reshape(-1, 4)
    if b.shape[0] != ys.shape[0]:
        raise ValueError(f"invalid value for boxes: {b.shape[0]} boxes for {ys.shape[0]} maps")
    inside = (xs >= b[:, 0] - tolerance) & (xs < b[:, 2] + tolerance) & \
             (ys >= b[:, 1] - tolerance) & (ys < b[:, 3] + tolerance)
    return inside.reshape(np.asarray(boxes).shape[:-1])


#: The metric keys of the method comparison, in table order (see :mod:`camserve.metrics`).
COMPARISON_KEYS: tuple[str, ...] = ("deletion", "insertion", "road_morf", "road_lerf", "avg_drop",
                                    "avg_increase", "energy_in_box", "pointing_game",
                                    "randomization_rank_corr")
#: The two reference rows of the comparison: maps that know nothing of the model.
BASELINE_ROWS: tuple[str, ...] = ("random", "center")
#: Perturbation substrates of ``--baseline`` (what replaces the removed pixels).
PERTURBATION_BASELINES: tuple[str, ...] = ("mean", "blur")
_CHEAP_KEYS = ("deletion", "insertion", "avg_drop", "avg_increase", "energy_in_box", "pointing_game")
_ROAD_KEYS = ("road_morf", "road_lerf")


@dataclass(frozen=True)
class Comparison:
    """Faithfulness of each CAM method and of two baseline maps on the evaluation images.

    ``values[row][key]``: the mean over the images of metric ``key`` (:data:`COMPARISON_KEYS`) for
    ``row`` (a CAM method, ``random`` or ``center``); ``None`` where the metric is not defined
    (``randomization_rank_corr`` of the baselines, which do not depend on the model). ``n``: images
    for deletion, insertion, avg_drop, avg_increase, energy_in_box and the randomisation check;
    ``road_n``: the first ``road_n`` of them for ROAD. ``cost``: forward passes per image and row
    (:func:`camserve.metrics.cost`). ``method_cost[row]``: what one map costs, ``forwards`` (the
    method's declared cost in whole-forward units, the shared forward included:
    :meth:`camserve.methods.Cost.units` with the measured suffix share) and ``ms`` (measured
    milliseconds per image of the engine call, batch of the comparison, this run).
    """

    n: int
    road_n: int
    steps: int
    baseline: str
    values: dict[str, dict[str, Optional[float]]]
    cost: dict[str, int]
    seconds: float
    method_cost: dict[str, dict[str, float]] = field(default_factory=dict)

    def rounded(self, digits: int = 4) -> dict[str, dict[str, Optional[float]]]:
        """``values`` rounded to ``digits`` (the JSON of ``evaluate``)."""
        return {row: {k: None if v is None else round(v, digits) for k, v in vals.items()}
                for row, vals in self.values.items()}

    def table(self) -> str:
        """The comparison as a text table: rows = methods then baselines, columns = metrics with
        their direction (↓ lower is better, ↑ higher is better); ``*`` marks the best row of each
        column, ``-`` a metric that is not defined for the row.

        Example::

            >>> c = Comparison(n=2, road_n=1, steps=10, baseline="mean", cost={},
            ...                values={"gradcam": {"deletion": 0.1, "randomization_rank_corr": 0.2},
            ...                        "random": {"deletion": 0.5, "randomization_rank_corr": None}},
            ...                seconds=0.0)
            >>> print(c.table())
            method    deletion ↓  randomization_rank_corr ↓
            gradcam      0.1000*                    0.2000*
            random       0.5000                     -
        """
        from camserve.metrics import LOWER_IS_BETTER

        keys = [k for k in COMPARISON_KEYS if any(k in v for v in self.values.values())]
        best: dict[str, Optional[float]] = {}
        for k in keys:
            vals = [v[k] for v in self.values.values() if v.get(k) is not None]
            best[k] = (min(vals) if k in LOWER_IS_BETTER else max(vals)) if vals else None
        heads = [f"{k} {'↓' if k in LOWER_IS_BETTER else '↑'}" for k in keys]
        width0 = max([len("method")] + [len(r) for r in self.values])
        costs = ["forwards/img", "ms/img"] if self.method_cost else []
        lines = ["  ".join([f"{'method':<{width0}}"] + heads + costs).rstrip()]
        for row, vals in self.values.items():
            cells = [f"{row:<{width0}}"]
            for k, head in zip(keys, heads):
                v = vals.get(k)
                text = "-" if v is None else (f"{v:.2f}" if k == "avg_drop" else f"{v:.4f}")
                mark = "*" if v is not None and v == best[k] else " "
                cells.append(f"{text:>{len(head) - 1}}{mark}" if v is not None else
                             f"{text:>{len(head) - 1}} ")
            if costs:
                mc = self.method_cost.get(row)
                cells += [f"{mc['forwards']:>12.4g}", f"{mc['ms']:>6.1f}"] if mc else \
                    [f"{'-':>12}", f"{'-':>6}"]
            lines.append("  ".join(cells).rstrip())
        return "\n".join(lines)


def _check_count(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"invalid value for {name}: {_cut(value)} (an int >= {lo})")


def compare_methods(loaded: "LoadedModel", data: ShapesData, *, n: int = 64, road_n: int = 8,
                    steps: int = 50, baseline: str = "mean", seed: int = 0,
                    methods: Optional[Sequence[str]] = None, batch_size: int = 64) -> Comparison:
    """Faithfulness metrics (:mod:`camserve.metrics`) of every CAM method and of the ``random``
    and ``center`` maps on the first ``n`` single-object images of ``data``, the true class as
    the target.

    Protocols (targets = the true class; maps at the CAM's resolution, 12×12 for the default
    model, upsampled bilinearly to the image by the metrics):

    - rows: each method of :func:`camserve.methods.available_methods` (or ``methods``) through
      :class:`camserve.CamEngine` on the config's target layer; ``random``: uniform noise at the
      CAM's resolution (seeded by ``seed``), so that it differs from a CAM only by its order;
      ``center``: a centred Gaussian (:func:`camserve.metrics.center_map`);
    - deletion / insertion: ``steps`` steps, removed pixels replaced by ``baseline`` (``"mean"``:
      the image's mean colour; ``"blur"``: a Gaussian blur of the image);
    - ROAD (most and least relevant first, 9 percentiles 10..90, noisy linear imputation with
      the same ROAD noise for every row, seeded by ``seed``) on the first ``road_n`` images only (ROAD costs seconds per
      image);
    - avg_drop / avg_increase (Grad-CAM++), energy_in_box (ground-truth box of the shape);
    - randomization_rank_corr: Spearman correlation of each method's maps with those of a copy
      whose top parameterised layer (the classifier) is re-initialised; ``None`` for the
      baselines, which never look at the model.
    """
    import torch

    from camserve import metrics as M
    from camserve.engine import CamEngine
    from camserve.methods import available_methods

    _check_count("n", n, 1)
    _check_count("road_n", road_n, 0)
    _check_count("steps", steps, 1)
    _check_count("batch_size", batch_size, 1)
    if n > len(data):
        raise ValueError(f"invalid value for n: {n} (at most the {len(data)} evaluation images)")
    if road_n > n:
        raise ValueError(f"invalid value for road_n: {road_n} (at most n = {n}: ROAD runs on the "
                         f"first road_n of the n images)")
    if baseline not in PERTURBATION_BASELINES:
        raise ValueError(f"invalid value for baseline: {_cut(baseline)} "
                         f"(allowed: {', '.join(PERTURBATION_BASELINES)})")
    methods = list(available_methods() if methods is None else methods)
    rows = methods + list(BASELINE_ROWS)
    t0 = time.monotonic()
    spec, model, layer = loaded.spec, loaded.model, loaded.layer
    engine = CamEngine(model, layer)
    engine.measure_suffix_share(preprocess_images(data.images[:1], spec))
    map_gen = torch.Generator().manual_seed(seed)
    map_seconds = {name: 0.0 for name in methods}
    settings = dict(steps=steps, baseline=baseline)
    cost = M.cost(_CHEAP_KEYS + ("randomization_rank_corr",) + (_ROAD_KEYS if road_n else ()),
                  steps=steps)
    log.info("comparison: %d rows on %d images (ROAD on %d), %s; forward passes per image and row: "
             "%s (randomization: +1 backward)", len(rows), n, road_n,
             f"{steps} steps, baseline {baseline}", cost)

    per_image: dict[str, dict[str, list["torch.Tensor"]]] = {r: {} for r in rows}
    for i in range(0, n, batch_size):
        j = min(i + batch_size, n)
        x = preprocess_images(data.images[i:j], spec)
        t = torch.from_numpy(data.labels[i:j, 0])
        boxes = torch.from_numpy(data.boxes[i:j, 0])
        road_rows = max(0, min(road_n, j) - i)
        maps: dict[str, "torch.Tensor"] = {}
        for name in methods:
            t_map = time.perf_counter()
            maps[name] = engine(x, targets=t, method=name).cams
            map_seconds[name] += time.perf_counter() - t_map
        cam_size = tuple(next(iter(maps.values())).shape[-2:]) if maps else tuple(x.shape[-2:])
        maps["random"] = M.random_map((j - i, *cam_size), map_gen)
        maps["center"] = M.center_map((j - i, *cam_size))
        for row in rows:
            keys = _CHEAP_KEYS + (("randomization_rank_corr",) if row in methods else ())

            def explain(m: "nn.Module", xx: "torch.Tensor", tt: "torch.Tensor",
                        _method: str = row) -> "torch.Tensor":
                return CamEngine(m, layer)(xx, targets=tt, method=_method).cams

            out = M.compute_metrics(model, x, maps[row], t, keys=keys, boxes=boxes,
                                    explain=explain if row in methods else None, **settings)
            if road_rows:
                out.update(M.compute_metrics(model, x[:road_rows], maps[row][:road_rows],
                                             t[:road_rows], keys=_ROAD_KEYS,
                                             generator=torch.Generator().manual_seed(seed + i)))
            for k, v in out.items():
                per_image[row].setdefault(k, []).append(v.detach().cpu())
        log.info("comparison: %d/%d images, %.0f s", j, n, time.monotonic() - t0)

    values: dict[str, dict[str, Optional[float]]] = {}
    for row in rows:
        got = {k: float(torch.cat(v).double().mean()) for k, v in per_image[row].items()}
        values[row] = {k: got.get(k) for k in COMPARISON_KEYS
                       if k not in _ROAD_KEYS or road_n > 0}
    from camserve.methods import get_method

    size = engine.layer_size
    method_cost = {name: {"forwards": 1.0 + get_method(name).spec().cost(size, 1).units(
                              engine.suffix_share),
                          "ms": 1000.0 * map_seconds[name] / n} for name in methods}
    return Comparison(n=n, road_n=road_n, steps=steps, baseline=baseline, values=values,
                      cost=cost, seconds=time.monotonic() - t0, method_cost=method_cost)


def evaluate(model_dir: Path | str = DEFAULT_MODEL_DIR, seed: int = 1234, *, n: int = 640,
             n_pairs: Optional[int] = None, tolerance: int = POINTING_TOLERANCE,
             batch_size: int = 64, metrics_n: int = 0, road_n: int = 0, steps: int = 50,
             baseline: str = "mean") -> EvalReport:
    """Classify and explain fresh images of ``rng_for(seed, "evaluate")``: ``n`` single-object
    images (classes balanced) and ``n_pairs`` (default ``n // 2``) two-object images.

    Images go through the server's preprocessing (:func:`preprocess_images`, the config's size,
    mean and std) and :class:`camserve.CamEngine` with Grad-CAM on the config's target layer; heatmaps are
    taken at the image size (96×96). A peak counts as inside a box when it is at most
    ``tolerance`` px (default 3) outside it. Two-object images explain both classes at once
    (targets of shape (B, 2), one backward).

    ``metrics_n`` > 0 adds the faithfulness comparison of every CAM method and the two baseline
    maps (:func:`compare_methods`) on the first ``metrics_n`` single-object images, ROAD on the
    first ``road_n`` of them, ``steps`` deletion/insertion steps and perturbation ``baseline``.
    """
    from camserve.engine import CamEngine

    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"invalid value for n: {n!r} (a positive integer)")
    n_pairs = n // 2 if n_pairs is None else n_pairs
    if isinstance(n_pairs, bool) or not isinstance(n_pairs, int) or n_pairs < 1:
        raise ValueError(f"invalid value for n_pairs: {n_pairs!r} (a positive integer)")
    if isinstance(tolerance, bool) or not isinstance(tolerance, int) or tolerance < 0:
        raise ValueError(f"invalid value for tolerance: {tolerance!r} (an int >= 0)")
    _check_count("metrics_n", metrics_n, 0)
    _check_count("road_n", road_n, 0)
    if metrics_n > n:
        raise ValueError(f"invalid value for metrics_n: {metrics_n} (at most n = {n})")
    if road_n > metrics_n:
        raise ValueError(f"invalid value for road_n: {road_n} (at most metrics_n = {metrics_n}: "
                         f"ROAD runs on the first road_n of the metrics_n images)")
    if baseline not in PERTURBATION_BASELINES:
        raise ValueError(f"invalid value for baseline: {_cut(baseline)} "
                         f"(allowed: {', '.join(PERTURBATION_BASELINES)})")
    import torch

    t0 = time.monotonic()
    loaded = load_model(model_dir)
    spec = loaded.spec
    engine = CamEngine(loaded.model, loaded.layer)
    rng = rng_for(seed, "evaluate")
    single = make_dataset(seed, n, rng=rng)
    pairs = make_dataset(seed, n_pairs, n_objects=2, rng=rng)
    size = single.images.shape[1:3]

    correct = np.zeros(n, dtype=bool)
    hit1 = np.zeros(n, dtype=bool)
    for i in range(0, n, batch_size):
        sl = slice(i, i + batch_size)
        labels = torch.from_numpy(single.labels[sl, 0])
        res = engine(preprocess_images(single.images[sl], spec), targets=labels)
        correct[sl] = res.logits.argmax(1).numpy() == single.labels[sl, 0]
        hit1[sl] = pointing_hits(res.heatmaps(tuple(size)), single.boxes[sl, 0], tolerance)
    hit2 = np.zeros((n_pairs, 2), dtype=bool)
    for i in range(0, n_pairs, batch_size):
        sl = slice(i, i + batch_size)
        x = preprocess_images(pairs.images[sl], spec)
        res = engine(x, targets=torch.from_numpy(pairs.labels[sl]))
        hit2[sl] = pointing_hits(res.heatmaps(tuple(size)), pairs.boxes[sl], tolerance)

    per_class = {}
    for k, name in enumerate(CLASSES):
        sel = single.labels[:, 0] == k
        per_class[name] = (float(correct[sel].mean()) if sel.any() else float("nan"),
                           float(hit1[sel].mean()) if sel.any() else float("nan"))
    comparison = None
    if metrics_n:
        comparison = compare_methods(loaded, single, n=metrics_n, road_n=road_n, steps=steps,
                                     baseline=baseline, seed=int(seed), batch_size=batch_size)
    report = EvalReport(seed=int(seed), n_single=n, n_pairs=n_pairs, tolerance=tolerance,
                        accuracy=float(correct.mean()), pointing_game=float(hit1.mean()),
                        pointing_game_two_objects=float(hit2.mean()), per_class=per_class,
                        seconds=time.monotonic() - t0, comparison=comparison)
    log.info("evaluated %s on seed %d: %s", model_dir, seed, report.metrics())
    return report


# ------------------------------------------------------------------------------------------------
# CLI


def add_train_options(p: argparse.ArgumentParser, *, n: int, n_help: str, lr: float,
                      epochs: Optional[int] = 8) -> None:
    """The options of a shapes training command (:func:`fit`'s settings), for every default."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=epochs,
                   help="passes over the training images" + ("" if epochs else
                                                             " (default: the task's)"))
    p.add_argument("--n", type=int, default=n, help=n_help)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate (AdamW)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="stop early (with a warning) after this many seconds")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.shapes",
                                description="Synthetic shapes: train, evaluate, write samples.")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the model of a folder, write weights.pt + labels")
    t.add_argument("--out", type=Path, required=True, help="model folder (e.g. models/shapes)")
    add_train_options(t, n=9600, n_help="single-object training images", lr=2e-3)
    e = sub.add_parser("evaluate", help="accuracy + Grad-CAM pointing game on fresh images")
    e.add_argument("--model", type=Path, default=DEFAULT_MODEL_DIR, help="model folder")
    e.add_argument("--seed", type=int, required=True)
    e.add_argument("--n", type=int, default=640, help="single-object images (pairs: n // 2)")
    e.add_argument("--tolerance", type=int, default=POINTING_TOLERANCE, help="px around a box")
    e.add_argument("--metrics-n", type=int, default=DEFAULT_METRICS_N,
                   help="single-object images for the faithfulness comparison of the CAM methods "
                        "and the random/center maps (deletion, insertion, avg_drop, avg_increase, "
                        "energy_in_box, randomization_rank_corr); 0 skips the comparison "
                        "(default %(default)s)")
    e.add_argument("--road-n", type=int, default=DEFAULT_ROAD_N,
                   help="the first ROAD_N of those images also get ROAD (road_morf, road_lerf; "
                        "seconds per image and row; default %(default)s)")
    e.add_argument("--steps", type=int, default=50,
                   help="deletion/insertion steps (forward passes per image; default %(default)s)")
    e.add_argument("--baseline", choices=PERTURBATION_BASELINES, default="mean",
                   help="what replaces removed pixels: the image's mean colour or a blur of it "
                        "(default %(default)s)")
    e.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    s = sub.add_parser("samples", help="write single-object PNGs and boxes.json")
    s.add_argument("--seed", type=int, required=True)
    s.add_argument("--n", type=int, default=8)
    s.add_argument("--out", type=Path, required=True)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; returns the exit status. The last line of ``evaluate`` is its JSON."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        stream=sys.stderr)
    try:
        if args.command == "samples":
            index = write_samples(args.out, args.seed, args.n)
            print(f"wrote {len(index)} images and boxes.json to {args.out}")
            return 0
        import torch

        if args.threads < 1:
            raise ValueError(f"invalid value for --threads: {args.threads} (>= 1)")
        torch.set_num_threads(args.threads)
        if args.command == "train":
            done = train(args.out, seed=args.seed, epochs=args.epochs, n=args.n,
                         batch_size=args.batch_size, lr=args.lr, max_seconds=args.max_seconds)
            print(f"trained {done.epochs} epochs ({done.steps} steps) in {done.seconds:.1f} s "
                  f"({done.cpu_seconds:.1f} CPU s), held-out accuracy {done.val_accuracy:.4f}")
            for f in done.files:
                print(f"wrote {f}")
            return 0
        from tools.dense_shapes import TASKS, folder_task

        if folder_task(args.model) in TASKS:  # a dense-task folder has its own evaluation
            from tools import dense_shapes

            return dense_shapes.main(["evaluate", "--model", str(args.model), "--seed",
                                      str(args.seed), "--threads", str(args.threads)])
        metrics_n = min(args.metrics_n, args.n)
        rep = evaluate(args.model, args.seed, n=args.n, tolerance=args.tolerance,
                       metrics_n=metrics_n, road_n=min(args.road_n, metrics_n),
                       steps=args.steps, baseline=args.baseline)
        print(f"model {args.model}, seed {rep.seed}: {rep.n_single} single-object and "
              f"{rep.n_pairs} two-object images, pointing tolerance {rep.tolerance} px")
        for name, (acc, pg) in rep.per_class.items():
            print(f"  {name:<8} accuracy {acc:.4f}  pointing game {pg:.4f}")
        print(f"accuracy {rep.accuracy:.4f}, pointing game {rep.pointing_game:.4f}, "
              f"two objects {rep.pointing_game_two_objects:.4f} ({2 * rep.n_pairs} maps), "
              f"{rep.seconds:.1f} s")
        if rep.comparison is not None:
            c = rep.comparison
            road = f", ROAD on the first {c.road_n}" if c.road_n else ", no ROAD"
            print(f"faithfulness on the first {c.n} single-object images{road}; target = true "
                  f"class; {c.steps} deletion/insertion steps, removed pixels -> {c.baseline}; "
                  f"randomization: top layer re-initialised (not defined for the baselines); "
                  f"{c.seconds:.1f} s")
            print(c.table())
        print(json.dumps(rep.to_json()))
        return 0
    except (ValueError, OSError, ImportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

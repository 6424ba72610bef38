"""Detector families: what the detection task needs to know about each kind of detector.

A family (:class:`DetectorFamily`) says for the models it recognises: how to apply the task's
``handler:`` keys (score threshold, max detections, NMS IoU) and the served input size to the
model's own knobs (:meth:`DetectorFamily.prepare`, called once by the loader on its serving copy),
how many labels the model has, and which layer a practitioner would explain (the one feature map
every detection depends on; :func:`detector_layer`, used by :mod:`camserve.families` for
``target_layer: null``). Every family makes the model return torchvision-style
``[{"boxes", "scores", "labels"}]`` (boxes in input pixels, differentiable scores) — torchvision's
detectors do already; Hugging Face and Ultralytics models get a ``forward`` that does
(:mod:`camserve.tasks.detectors.hf`, :mod:`camserve.tasks.detectors.yolo`).

=====================================  =============================  ==========================
family                                 target layer (auto)            why
=====================================  =============================  ==========================
torchvision Faster / Mask R-CNN,       ``backbone.body.<last>``       the last backbone stage:
RetinaNet, FCOS (FPN backbones)        (``layer4``; MobileNetV3:      every FPN level depends
                                       ``backbone.body.16``)          on it (stride 32)
torchvision SSD (VGG16)                ``backbone.features``          feeds every SSD level
torchvision SSDlite (MobileNetV3)      ``backbone.features.0``        feeds every SSD level
Hugging Face DETR                      ``model.input_projection``     the one map the
                                                                      transformer reads
Hugging Face RT-DETR                   the backbone's last stage      feeds every encoder level
Ultralytics YOLO v8 / 11               the layer before the neck's    every head level
                                       first upsample (SPPF / C2PSA)  depends on it
=====================================  =============================  ==========================

Any other model whose output is torchvision-style detections works too (:class:`Generic`; name
its ``target_layer``).

Example::

    >>> import torchvision
    >>> m = torchvision.models.detection.fcos_resnet50_fpn(weights=None, weights_backbone=None,
    ...                                                    num_classes=3).eval()
    >>> fam = family_of(m)
    >>> fam.name, fam.layer(m), fam.count_labels(m)
    ('torchvision FCOS', 'backbone.body.layer4', 3)
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from ..base import TaskError

if TYPE_CHECKING:
    from ...families import LayerChoice
    from ..detection import Detection


class GraphError(TaskError):
    """A detector whose detections cannot be computed inside a CAM graph the way asked."""


class DetectorFamily:
    """One kind of detector (see the module docstring). Subclasses override what differs."""

    name = "detector"
    #: why the default layer is the one a practitioner would explain
    why = ""

    def matches(self, model: nn.Module) -> bool:
        """This family knows ``model``."""
        return False

    def prepare(self, model: nn.Module, spec: Any, task: "Detection") -> None:
        """Apply the task's keys and the served input size to the model's own knobs."""

    def count_labels(self, model: nn.Module) -> int:
        """The number of labels (class indices the model may output)."""
        n = getattr(model, "num_classes", None)
        if isinstance(n, int) and n > 0:
            return n
        raise TaskError(f"cannot tell how many labels {type(model).__name__} has (give it a "
                        f"'num_classes' attribute)")

    def layer(self, model: nn.Module) -> Optional[str]:
        """The default target layer's dotted name (None: the config must name one)."""
        return None

    def fixed_detections(self, model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"boxes": (B, M, 4), "scores": (B, M), "labels": (B, M)}`` of ``model`` on ``x`` with
        tensor operations only (a CAM graph traces it, gradients included): M detections per
        image, best first, padded with label -1 and score 0. A model provides it as its own
        ``fixed_detections(x)`` method (the shapes detector does); :class:`GraphError` when it
        has none."""
        fn = getattr(model, "fixed_detections", None)
        if not callable(fn):
            raise GraphError(f"{self.name} {type(model).__name__}: no fixed_detections(x) method, "
                             f"so its decoding (NMS) cannot be traced with gradients; export it "
                             f"with a gradient-free method (eigencam) instead")
        out = fn(x)
        if not isinstance(out, dict) or any(k not in out for k in ("boxes", "scores", "labels")):
            raise GraphError(f"{type(model).__name__}.fixed_detections must return a dict with "
                             f"'boxes', 'scores' and 'labels'")
        return out


def set_knobs(obj: Any, task: "Detection", score: str, count: str, nms: str) -> None:
    """Set ``obj``'s score threshold, detection count and NMS IoU attributes (where it has them)
    from the task's keys (the NMS IoU only when ``nms_iou`` is set)."""
    if hasattr(obj, score):
        setattr(obj, score, float(task.score_threshold))
    if hasattr(obj, count):
        setattr(obj, count, int(task.max_detections))
    if task.nms_iou is not None and hasattr(obj, nms):
        setattr(obj, nms, float(task.nms_iou))


class Generic(DetectorFamily):
    """A model that returns torchvision-style detections itself (e.g. the shapes detector):
    knobs ``score_thresh``, ``detections_per_img``, ``nms_thresh`` and ``num_classes`` when it has
    them; ``target_layer`` named in the config."""

    name = "detector"

    def matches(self, model: nn.Module) -> bool:
        return True

    def prepare(self, model: nn.Module, spec: Any, task: "Detection") -> None:
        set_knobs(model, task, "score_thresh", "detections_per_img", "nms_thresh")


def _families() -> list[DetectorFamily]:
    from .hf import HF_FAMILIES
    from .torchvision import TV_FAMILIES
    from .yolo import YOLO_FAMILIES

    return [*TV_FAMILIES, *HF_FAMILIES, *YOLO_FAMILIES]


def known_family(model: nn.Module) -> Optional[DetectorFamily]:
    """The family that knows ``model`` by its type (None for any other model, detectors of
    the :class:`Generic` kind included); never runs the model."""
    return next((f for f in _families() if f.matches(model)), None)


def family_of(model: nn.Module) -> DetectorFamily:
    """``model``'s family: a known one, else :class:`Generic`."""
    return known_family(model) or Generic()


def detector_layer(model: nn.Module, size: tuple[int, int],
                   name: Optional[str] = None) -> Optional["LayerChoice"]:
    """The target layer of a known detector (``name``: the configured one, else the family's
    default) as a :class:`camserve.families.LayerChoice` (NCHW, its grid at input ``size``); None
    for models of no known detector family (the generic rules decide)."""
    from ...families import ChannelsFirst, FamilyError, LayerChoice
    from ...layers import capture_layer

    fam = known_family(model)
    if fam is None:
        return None
    chosen = name or fam.layer(model)
    if chosen is None:
        raise FamilyError(f"{fam.name}: no default target layer; name handler.target_layer")
    p = next(iter(model.parameters()), None)
    x = torch.zeros(1, 3, *size, device=p.device if p is not None else "cpu",
                    dtype=p.dtype if p is not None and p.is_floating_point() else torch.float32)
    was = model.training
    model.eval()
    try:
        with capture_layer(model, chosen, "record") as cap, torch.no_grad():
            model(x)
    finally:
        model.train(was)
    shape = tuple(cap.output.shape)
    if len(shape) != 4:
        raise FamilyError(f"{fam.name}: layer {chosen!r} gives {shape}, not a (B, C, h, w) map; "
                          f"name another handler.target_layer")
    why = "named in the config" if name else fam.why
    return LayerChoice(chosen, "nchw", ChannelsFirst(), (shape[2], shape[3]), shape, fam.name,
                       why)

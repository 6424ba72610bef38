"""torchvision detectors: Faster R-CNN (ResNet-50 FPN v1/v2, MobileNetV3 FPN), Mask R-CNN (its
boxes), RetinaNet, FCOS, SSD and SSDlite.

Their output is already ``[{"boxes", "scores", "labels"}]`` with differentiable scores (the class
softmax / sigmoid at the proposal or anchor). :meth:`prepare` sets their own knobs from the task:
the score threshold, the detections per image, the NMS IoU (when ``nms_iou`` is set); and it makes
their resize a no-op at the served input size (``min_size``/``max_size`` = the input size, no
padding), so the detections and the maps are in the pixels of the served input, which the
serving core maps back to the original image. SSD keeps its fixed square resize (a stretch that
maps back exactly). The model's own normalisation is turned off (mean 0, std 1): the served input
is normalised with ``handler.mean``/``handler.std``, whose defaults are the model's
(:func:`source_defaults`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from torch import nn

from . import DetectorFamily, set_knobs

if TYPE_CHECKING:
    from ...sources import SourceDefaults
    from ..detection import Detection


def _tv():
    from torchvision.models import detection as D

    return D


def _identity_normalisation(model: nn.Module) -> None:
    tr = model.transform  # type: ignore[attr-defined]
    tr.image_mean = [0.0, 0.0, 0.0]
    tr.image_std = [1.0, 1.0, 1.0]


def _last_body(model: nn.Module) -> str:
    names = [n for n, _ in model.backbone.body.named_children()]  # type: ignore[attr-defined]
    return f"backbone.body.{names[-1]}"


class _FPN(DetectorFamily):
    """FPN detectors: the served input size becomes the model's own size, without padding."""

    why = ("the last backbone stage, a plain tensor every FPN level depends on (the FPN's own "
           "output is a dict)")

    def layer(self, model: nn.Module) -> Optional[str]:
        return _last_body(model)

    def _resize(self, model: nn.Module, spec: Any) -> None:
        h, w = (int(v) for v in spec.input_size)
        tr = model.transform  # type: ignore[attr-defined]
        tr.min_size = (min(h, w),)
        tr.max_size = max(h, w)
        tr.size_divisible = 1
        _identity_normalisation(model)


class RCNN(_FPN):
    name = "torchvision Faster R-CNN"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, _tv().FasterRCNN)  # MaskRCNN is one

    def prepare(self, model: nn.Module, spec: Any, task: "Detection") -> None:
        self._resize(model, spec)
        set_knobs(model.roi_heads, task, "score_thresh", "detections_per_img", "nms_thresh")  # type: ignore[attr-defined]

    def count_labels(self, model: nn.Module) -> int:
        return int(model.roi_heads.box_predictor.cls_score.out_features)  # type: ignore[attr-defined]


class OneStage(_FPN):
    """RetinaNet and FCOS (``kind``: the torchvision class name)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.name = f"torchvision {kind}"

    def matches(self, model: nn.Module) -> bool:
        from torchvision.models.detection import fcos, retinanet

        return isinstance(model, retinanet.RetinaNet if self.kind == "RetinaNet" else fcos.FCOS)

    def prepare(self, model: nn.Module, spec: Any, task: "Detection") -> None:
        self._resize(model, spec)
        set_knobs(model, task, "score_thresh", "detections_per_img", "nms_thresh")

    def count_labels(self, model: nn.Module) -> int:
        return int(model.head.classification_head.num_classes)  # type: ignore[attr-defined]


class SSD(DetectorFamily):
    name = "torchvision SSD"
    why = "the backbone's first feature map, which every SSD level is computed from"

    def matches(self, model: nn.Module) -> bool:
        from torchvision.models.detection.ssd import SSD as _SSD

        return isinstance(model, _SSD)

    def prepare(self, model: nn.Module, spec: Any, task: "Detection") -> None:
        _identity_normalisation(model)
        set_knobs(model, task, "score_thresh", "detections_per_img", "nms_thresh")

    def count_labels(self, model: nn.Module) -> int:
        return int(model.head.classification_head.num_columns)  # type: ignore[attr-defined]

    def layer(self, model: nn.Module) -> Optional[str]:
        feats = model.backbone.features  # type: ignore[attr-defined]
        nested = isinstance(feats, nn.Sequential) and len(feats) and isinstance(feats[0], nn.Sequential)
        return "backbone.features.0" if nested else "backbone.features"  # SSDlite: two parts


TV_FAMILIES: tuple[DetectorFamily, ...] = (RCNN(), OneStage("RetinaNet"), OneStage("FCOS"), SSD())


def source_defaults(model: nn.Module) -> Optional["SourceDefaults"]:
    """What a torchvision detector knows of its preprocessing: its mean/std and its size (SSD:
    its fixed square; FPN detectors: ``min_size`` square); None for other models."""
    from ...sources import SourceDefaults

    if not any(f.matches(model) for f in TV_FAMILIES):
        return None
    tr = model.transform  # type: ignore[attr-defined]
    fixed = getattr(tr, "fixed_size", None)
    size = (int(fixed[0]), int(fixed[1])) if fixed else (int(tr.min_size[0]), int(tr.min_size[0]))
    return SourceDefaults(mean=tuple(float(v) for v in tr.image_mean),  # type: ignore[arg-type]
                          std=tuple(float(v) for v in tr.image_std),  # type: ignore[arg-type]
                          input_size=size, interpolation="bilinear")

"""Hugging Face detectors (``AutoModelForObjectDetection`` ``save_pretrained`` folders): DETR and
RT-DETR, and their relatives whose image processor has ``post_process_object_detection``.

:func:`ensure_detections` gives the model a ``forward`` that returns torchvision-style
``[{"boxes", "scores", "labels"}]`` in input pixels through the folder's own image processor's
``post_process_object_detection`` (DETR: softmax without the no-object class, the best class per
query; RT-DETR: sigmoid, the top queries × classes), which is plain differentiable torch, so a
detection's score keeps its autograd history back to the target layer. Module names and
``state_dict`` keys do not change (the class is swapped, as
:func:`camserve.sources.ensure_logits` does). The threshold is the task's ``score_threshold``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from torch import nn

from . import DetectorFamily

if TYPE_CHECKING:
    from ..detection import Detection

_CLASSES: dict[type, type] = {}
#: the image processor of a model type, for folders without a ``preprocessor_config.json``
PROCESSORS = {"detr": "DetrImageProcessor", "conditional_detr": "ConditionalDetrImageProcessor",
              "deformable_detr": "DeformableDetrImageProcessor", "rt_detr": "RTDetrImageProcessor",
              "rt_detr_v2": "RTDetrImageProcessor"}
#: model types and the layer a practitioner explains (``None``: name it in the config)
LAYERS = {"detr": "model.input_projection", "conditional_detr": "model.input_projection",
          "rt_detr": "backbone-last", "rt_detr_v2": "backbone-last"}


def _detections_class(cls: type) -> type:
    sub = _CLASSES.get(cls)
    if sub is None:
        def forward(self, pixel_values, *args: Any, **kwargs: Any):
            out = cls.forward(self, pixel_values, *args, **kwargs)
            h, w = (int(v) for v in pixel_values.shape[-2:])
            return self._camserve_processor.post_process_object_detection(
                out, threshold=float(self._camserve_threshold),
                target_sizes=[(h, w)] * int(pixel_values.shape[0]))

        sub = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                           "__qualname__": cls.__qualname__,
                                           "_camserve_detections": True})
        _CLASSES[cls] = sub
    return sub


def ensure_detections(model: nn.Module, processor: Any, threshold: float = 0.5) -> nn.Module:
    """Make ``model(x)`` return ``[{"boxes", "scores", "labels"}]`` through ``processor``'s
    ``post_process_object_detection`` (in place; names and keys unchanged). Returns ``model``."""
    if not hasattr(processor, "post_process_object_detection"):
        raise TypeError(f"{type(processor).__name__} has no post_process_object_detection")
    model._camserve_processor = processor  # type: ignore[assignment]
    model._camserve_threshold = float(threshold)  # type: ignore[assignment]
    if not getattr(type(model), "_camserve_detections", False):
        model.__class__ = _detections_class(type(model))
    return model


class HFDetector(DetectorFamily):
    name = "Hugging Face detector"

    def matches(self, model: nn.Module) -> bool:
        return bool(getattr(type(model), "_camserve_detections", False))

    def prepare(self, model: nn.Module, spec: Any, task: "Detection") -> None:
        model._camserve_threshold = float(task.score_threshold)  # type: ignore[assignment]

    def count_labels(self, model: nn.Module) -> int:
        return int(model.config.num_labels)  # type: ignore[attr-defined]

    def layer(self, model: nn.Module) -> Optional[str]:
        kind = LAYERS.get(str(getattr(model.config, "model_type", "")))  # type: ignore[attr-defined]
        if kind != "backbone-last":
            return kind
        stages = [n for n, _ in model.named_modules() if n.startswith("model.backbone.")
                  and n.rsplit(".", 2)[-2] == "stages"]
        return stages[-1] if stages else None

    @property
    def why(self) -> str:  # type: ignore[override]
        return ("DETR: the projected backbone map the transformer reads; RT-DETR: the backbone's "
                "last stage, which every encoder level depends on")


HF_FAMILIES: tuple[DetectorFamily, ...] = (HFDetector(),)

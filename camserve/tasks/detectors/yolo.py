"""Ultralytics YOLO (v8 / 11 detection models), behind the ``camserve[yolo]`` extra.

Ultralytics is AGPL-3.0: camserve's core never imports it; this module imports it only to build
a model from a ``yolo:<file>`` source (:func:`build_yolo`), so a folder that is not a YOLO folder
never needs it. ``<file>`` in the model folder is either a model ``.yaml`` (built with random
weights; ``handler.weights`` may then load a state_dict) or an Ultralytics ``.pt`` checkpoint
(read with ``weights_only`` and Ultralytics' allow-list of its own classes).

:func:`ensure_detections` gives the model a ``forward`` that returns torchvision-style
``[{"boxes", "scores", "labels"}]`` in input pixels: the head's decoded boxes (xywh -> xyxy), the
best class per anchor (its sigmoid score, differentiable back to the target layer), the task's
``score_threshold``, class-wise NMS (``nms_iou``, default 0.7 as Ultralytics') and at most
``max_detections``. The input is the served image resized to ``handler.input_size`` (sides
multiples of the model's stride, 32), values in [0, 1] (mean 0, std 1 by default).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch
from torch import nn

from . import DetectorFamily

if TYPE_CHECKING:
    from ...sources import SourceDefaults
    from ..detection import Detection

#: Ultralytics' default NMS IoU
DEFAULT_NMS_IOU = 0.7
_CLASSES: dict[type, type] = {}


def _decode(self: nn.Module, y: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    from torchvision.ops import batched_nms

    out = []
    for p in y:  # (4 + nc, A)
        xy, wh, cls = p[:2].T, p[2:4].T, p[4:].T
        boxes = torch.cat([xy - wh / 2, xy + wh / 2], dim=1)
        scores, labels = cls.max(dim=1)
        keep = (scores.detach() > self._camserve_threshold).nonzero()[:, 0]
        kept = batched_nms(boxes.detach()[keep].float(), scores.detach()[keep].float(),
                           labels[keep], float(self._camserve_iou))[:int(self._camserve_max)]
        idx = keep[kept]
        out.append({"boxes": boxes[idx], "scores": scores[idx], "labels": labels[idx]})
    return out


def _detections_class(cls: type) -> type:
    sub = _CLASSES.get(cls)
    if sub is None:
        def forward(self, x, *args: Any, **kwargs: Any):
            out = cls.forward(self, x, *args, **kwargs)
            y = out[0] if isinstance(out, (tuple, list)) else out
            return _decode(self, y)

        sub = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                           "__qualname__": cls.__qualname__,
                                           "_camserve_yolo": True})
        _CLASSES[cls] = sub
    return sub


def ensure_detections(model: nn.Module) -> nn.Module:
    """Make an Ultralytics ``DetectionModel`` return detections (in place; names and
    ``state_dict`` keys unchanged). Returns ``model``."""
    model._camserve_threshold = 0.25  # type: ignore[assignment]
    model._camserve_iou = DEFAULT_NMS_IOU  # type: ignore[assignment]
    model._camserve_max = 300  # type: ignore[assignment]
    if not getattr(type(model), "_camserve_yolo", False):
        model.__class__ = _detections_class(type(model))
    return model


def _import_ultralytics(name: str) -> tuple[Any, Any]:
    """Ultralytics' ``DetectionModel`` and ``torch_safe_load``, imported without its side effects
    on the serving process: no automatic ``pip install`` and no network checks (``YOLO_AUTOINSTALL``
    and ``YOLO_OFFLINE`` default to off / on), and Pillow's own ``Image.open`` put back (Ultralytics
    replaces it at import with one that tries to install a HEIF plugin for every file Pillow
    cannot identify — a hostile upload would trigger it)."""
    import os

    from PIL import Image

    from ...sources import SourceError

    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    os.environ.setdefault("YOLO_OFFLINE", "true")
    pillow_open = Image.open
    try:
        from ultralytics.nn.tasks import DetectionModel, torch_safe_load
        from ultralytics.utils import patches
    except ImportError:
        raise SourceError("arch", f"'yolo:{name[:80]}' needs ultralytics (pip install "
                                  f"'camserve[yolo]'; AGPL-3.0)") from None
    finally:
        if getattr(Image.open, "__module__", "").startswith("ultralytics"):
            Image.open = getattr(patches, "_image_open", pillow_open) \
                if "patches" in locals() else pillow_open
    return DetectionModel, torch_safe_load


def build_yolo(name: str, num_classes: Optional[int], arch_args: Mapping[str, Any],
               model_dir: Path) -> tuple[nn.Module, "SourceDefaults"]:
    """The model of ``yolo:<name>`` (a ``.yaml`` or ``.pt`` file in ``model_dir``) returning
    detections, and its defaults (mean 0, std 1, its label names)."""
    from ...sources import SourceDefaults, SourceError

    path = model_dir / name
    if path.suffix not in (".yaml", ".yml", ".pt") or not path.is_file():
        raise SourceError("arch", f"'yolo:{name[:80]}' needs a model .yaml or an Ultralytics .pt "
                                  f"in the model folder ({str(path)[:120]!r})")
    DetectionModel, torch_safe_load = _import_ultralytics(name)
    if path.suffix == ".pt":
        try:  # weights_only with Ultralytics' allow-list of its own classes
            ckpt, _ = torch_safe_load(str(path), safe_only=True)
        except Exception as e:  # noqa: BLE001 - torch/pickle/Ultralytics raise many kinds
            raise SourceError("arch", f"'yolo:{name[:80]}' cannot be read as an Ultralytics "
                                      f"checkpoint: {str(e).splitlines()[0][:160]}") from None
        model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, Mapping) else None
        if not isinstance(model, nn.Module):
            raise SourceError("arch", f"'yolo:{name[:80]}' holds no model ('model' or 'ema')")
        model = model.float()
    else:
        kwargs = dict(arch_args)
        if num_classes is not None:
            kwargs["nc"] = num_classes
        try:
            model = DetectionModel(str(path), verbose=False, **kwargs)
        except (TypeError, KeyError, ValueError) as e:
            raise SourceError("arch_args", f"'yolo:{name[:80]}' cannot be built with "
                                           f"{dict(kwargs)!r:.100}: {str(e)[:160]}") from None
    if not isinstance(model, DetectionModel):
        raise SourceError("arch", f"'yolo:{name[:80]}' is a {type(model).__name__}, not a "
                                  f"detection model")
    names = getattr(model, "names", None) or {}
    n = int(model.model[-1].nc)
    labels = [str(names.get(i, i)) for i in range(n)] if isinstance(names, Mapping) else None
    return ensure_detections(model.eval()), SourceDefaults(
        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), input_size=(640, 640),
        interpolation="bilinear", labels=labels)


class YOLO(DetectorFamily):
    name = "Ultralytics YOLO"
    why = ("the last backbone layer before the neck's first upsample (SPPF / C2PSA): every head "
           "level depends on it")

    def matches(self, model: nn.Module) -> bool:
        return bool(getattr(type(model), "_camserve_yolo", False))

    def prepare(self, model: nn.Module, spec: Any, task: "Detection") -> None:
        from ...models import ConfigError

        stride = int(max(float(s) for s in model.stride))  # type: ignore[attr-defined]
        if any(int(v) % stride for v in spec.input_size):
            raise ConfigError(f"invalid value for handler.input_size: {list(spec.input_size)} "
                              f"(a YOLO model needs sides that are multiples of {stride})")
        model._camserve_threshold = float(task.score_threshold)  # type: ignore[assignment]
        model._camserve_max = int(task.max_detections)  # type: ignore[assignment]
        if task.nms_iou is not None:
            model._camserve_iou = float(task.nms_iou)  # type: ignore[assignment]

    def count_labels(self, model: nn.Module) -> int:
        return int(model.model[-1].nc)  # type: ignore[index]

    def layer(self, model: nn.Module) -> Optional[str]:
        layers = list(model.model)  # type: ignore[attr-defined]
        first = next((i for i, m in enumerate(layers) if isinstance(m, nn.Upsample)), None)
        return None if not first else f"model.{first - 1}"


YOLO_FAMILIES: tuple[DetectorFamily, ...] = (YOLO(),)

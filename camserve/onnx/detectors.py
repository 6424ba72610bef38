"""Gradient-free detection graphs: detectors whose decoding has no ONNX gradient.

A detector whose post-processing runs NMS, RoIAlign or data-dependent top-k (torchvision Faster /
Mask R-CNN, RetinaNet, FCOS, SSD, SSDlite) cannot be traced into the CAM graph of
:class:`camserve.onnx.trace.CamGraph`: the trace needs tensor operations whose shapes do not
depend on the data, and those operations have no ONNX gradient anyway. What *can* be exported is
the detector as it is (``torch.onnx.export``'s TorchScript tracer, which translates NMS and
RoIAlign for inference, at batch size 1) with the target layer's activations and the
gradient-free maps (EigenCAM, KPCA-CAM: functions of the activations only) as extra outputs. The
graph has the outputs of every detection graph — ``detections`` (1, M, 6), ``activations``,
``cam`` (1, K, h, w), one ``cam_<method>`` per extra method — except ``gradients``; its one map
serves every box, and the batch job renormalises it inside each box, as the servers do for a
gradient-free method (docs/export.md, "Detection graphs").

:func:`export_detector_onnx` writes and verifies such a graph (``camserve-export`` calls it for a
detector without ``fixed_detections``); :func:`traceable_with_gradients` says which route a model
takes.
"""
from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..layers import capture_layer, nchw_converter
from ..methods import available_methods, get_method
from ..methods.projection import exportable_form
from ..models import LoadedModel
from ..tasks.detection import Detection, Detections, ImageDetections, as_detections
from .format import ExportInfo, GraphMeta, check_methods, output_names
from .session import ort_session
from .translate import ExportError, check_model
from .verify import DEFAULT_TOLERANCE, VerificationError, relative_error

log = logging.getLogger(__name__)

#: ONNX opset of the TorchScript exporter's translation (NMS and RoIAlign need 11 or newer)
DETECTOR_OPSET = 17


def traceable_with_gradients(model: nn.Module) -> bool:
    """Whether ``model``'s detections can be traced into a CAM graph with gradients: it decodes
    with tensor operations only (a ``fixed_detections(x)`` method, see
    :meth:`camserve.tasks.detectors.DetectorFamily.fixed_detections`)."""
    return callable(getattr(model, "fixed_detections", None))


def gradient_free_outputs(methods: Sequence[str], task: Detection) -> list[str]:
    """The outputs of a gradient-free detection graph: a detection graph's, without
    ``gradients``."""
    return [n for n in output_names(methods, task) if n != "gradients"]


class DetectorGraph(nn.Module):
    """``forward(x) -> (detections, activations, cam, *cams)`` for one image ``x`` (1, 3, H, W):
    the served detector's detections packed as every detection graph packs them
    (:meth:`camserve.tasks.Detection.graph_value`: the task's threshold and count), the
    target layer's activations (NCHW) and each gradient-free method's map, one per explained box
    (the same map: (1, K, h, w))."""

    def __init__(self, model: nn.Module, layer: str, methods: Sequence[str], task: Detection,
                 reshape: Any = None, layout: Optional[str] = None) -> None:
        super().__init__()
        self.model, self.layer, self.task = model, layer, task
        self.methods = tuple(methods)
        self._to_nchw = nchw_converter(layer, layout, reshape)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with capture_layer(self.model, self.layer, "record") as cap:
            raw = as_detections(self.model(x))
        # the task's threshold, keeping the detector's order (best first already: a stable sort
        # has no TorchScript translation, and the family set the detector's own count)
        out = Detections(ImageDetections(d.boxes[keep], d.scores[keep], d.labels[keep])
                         for d in raw for keep in [d.scores >= self.task.score_threshold])
        packed = self.task.graph_value(out)
        a = self._to_nchw(cap.output)
        k = self.task.graph_top
        cams = [get_method(m)(a, None)[:, None].expand(a.shape[0], k, *a.shape[2:])
                for m in self.methods]
        return (packed, a, *cams)


def _check_gradient_free(methods: Sequence[str], family: str) -> tuple[str, ...]:
    methods = check_methods(methods)
    needing = [m for m in methods if get_method(m).gradients]
    if needing:
        free = ", ".join(m for m in available_methods(exportable=True) if not get_method(m).gradients)
        raise ExportError(f"{family}: its post-processing (NMS, RoIAlign) has no ONNX gradient, so "
                          f"{needing[0]!r} cannot be computed in its graph; export it with a "
                          f"gradient-free method ({free})")
    return methods


def export_detector_onnx(loaded: LoadedModel, out: str | Path, *, methods: Sequence[str],
                         verify: bool = True, tolerance: float = DEFAULT_TOLERANCE,
                         seed: int = 0, threads: Optional[int] = None) -> ExportInfo:
    """Export ``loaded`` (a detector without tensor-only decoding) as a gradient-free detection
    graph at batch size 1 (the module docstring), with its :class:`GraphMeta`; with ``verify``
    compare it with the PyTorch detector on a random image: ``activations`` and every map within
    ``tolerance`` (relative), the detections reported (NMS and top-k ties may order nearly equal
    boxes differently). Returns :class:`camserve.onnx.format.ExportInfo`."""
    import onnx

    from ..tasks.detectors import family_of

    family = family_of(loaded.model).name
    methods = _check_gradient_free(methods, family)
    meta = GraphMeta.from_loaded(loaded, methods)
    task = meta.task
    if not isinstance(task, Detection):
        raise ValueError(f"invalid value for loaded: a {meta.spec.task} model (a detector is needed)")
    reshape = loaded.reshape if meta.layer == loaded.layer else None
    graph = DetectorGraph(loaded.model, meta.layer, methods, task, reshape, meta.spec.layout).eval()
    names = gradient_free_outputs(methods, task)
    gen = torch.Generator().manual_seed(seed)
    example = torch.rand(1, 3, *meta.spec.input_size, generator=gen)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(), exportable_form(), torch.no_grad():
            warnings.simplefilter("ignore")  # the tracer's warnings about Python values
            torch.onnx.export(graph, (example,), str(out), dynamo=False, opset_version=DETECTOR_OPSET,
                              input_names=["input"], output_names=names)
    except Exception as exc:  # the tracer's and exporter's own errors: the model does not export
        raise ExportError(f"{family}: torch.onnx.export (TorchScript) failed: "
                          f"{type(exc).__name__}: {str(exc).strip()[:300]}") from exc
    finally:
        graph.eval()  # the exporter may leave the module in training mode
    model = onnx.load(str(out))
    for key, value in meta.to_props().items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.doc_string = (f"camserve gradient-free detection graph: {meta.arch}, layer {meta.layer}, "
                        f"methods {', '.join(methods)}. Input: input float32 (1,3,"
                        f"{meta.input_size[0]},{meta.input_size[1]}). Outputs: {', '.join(names)}.")
    onnx.save(model, str(out))
    check_model(out)
    info = ExportInfo(path=out, layer=meta.layer, methods=methods, outputs=names,
                      exporter="torchscript", seconds=time.perf_counter() - t0, gradients=False)
    if verify:
        info.errors = {"random": _verify(out, graph, meta, names, tolerance, seed + 1, threads)}
    return info


def _verify(path: Path, graph: DetectorGraph, meta: GraphMeta, names: Sequence[str],
            tolerance: float, seed: int, threads: Optional[int]) -> dict[str, float]:
    """The graph on onnxruntime against the PyTorch detector on a random image: relative errors
    per output (``detections``: over the rows that agree — same label, box and score within
    ``tolerance`` — and the share of rows that do not as ``detections_mismatch``: NMS and top-k
    may order tied boxes differently); VerificationError when activations or a map are off by
    more than ``tolerance``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, *meta.input_size, generator=gen)
    sess = ort_session(path, threads=threads)
    got = dict(zip(names, sess.run(list(names), {"input": x.numpy()})))
    with torch.no_grad(), exportable_form():
        ref = dict(zip(names, (t.numpy() for t in graph(x))))
    errors = {n: relative_error(got[n], ref[n]) for n in names if n != "detections"}
    a, b = got["detections"], ref["detections"]
    scale = max(float(np.abs(b).max()), 1e-30)
    same = (a[..., 5] == b[..., 5]) & (np.abs(a - b).max(axis=-1) <= tolerance * scale)
    errors["detections"] = relative_error(a[same], b[same])
    errors["detections_mismatch"] = float(1.0 - same.mean())
    bad = [f"{n}={e:.2e}" for n, e in errors.items() if n not in ("detections", "detections_mismatch")
           and not e <= tolerance]
    if bad:
        raise VerificationError(f"{path}: the gradient-free detection graph does not match the "
                                f"PyTorch detector (relative error > {tolerance:g}): {', '.join(bad)}")
    if errors["detections_mismatch"] or errors["detections"] > tolerance:
        log.warning("%s: %.0f%% of the detection rows differ from PyTorch's (NMS / top-k order of "
                    "nearly equal boxes); relative error of the others %.1e", path,
                    100 * errors["detections_mismatch"], errors["detections"])
    return errors

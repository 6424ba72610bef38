"""int8 CAM graphs: onnxruntime's dynamic quantisation of an exported graph, and its check against
the float graph.

:func:`quantize_graph` runs ``onnxruntime.quantization.quantize_dynamic`` (int8 weights of the
convolutions and of the matrix products with a constant operand; activations quantised at run
time) and records ``quantize: "int8"`` in the graph's metadata. Only gradient-free graphs are
quantised: in a gradient graph the backward's ReLU and max-pool switches follow the int8
forward, and the gradients lose their meaning (measured on the shapes model: Grad-CAM's map
correlation with the float graph falls to 0.1; docs/export.md).

:func:`compare_quantized` runs both graphs on the same inputs and the same explicit targets (the
float graph's top-1 classes) and measures what int8 changes: the share of rows whose top-1 class
stays (``top1``), and per map output the smallest Pearson correlation of a map with the float
one (``correlation``) and the largest absolute difference of the min-max normalised maps
(``abs_error``, in [0, 1]: 1/255 is one grey level of a heatmap). :data:`INT8_TOLERANCE` is what an
export accepts.

Example::

    >>> q = QuantCheck(top1=1.0, correlation={"cam": 0.995}, abs_error={"cam": 0.04})
    >>> q.failures(QuantTolerance())
    []
    >>> q.failures(QuantTolerance(min_correlation=0.999))
    ['cam: correlation 0.995 < 0.999']
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .format import KEYS, GraphMeta
from .session import ort_session
from .translate import ExportError

log = logging.getLogger(__name__)


class QuantizationError(ExportError):
    """The int8 graph differs from the float graph by more than the tolerance (the message has
    the figures), or the graph cannot be quantised."""


@dataclass(frozen=True)
class QuantTolerance:
    """What an int8 graph may change against its float graph on the check's batch: at least
    ``min_top1`` of the rows keep their top-1 class; every map correlates at least
    ``min_correlation`` with the float map and its normalised values differ by at most
    ``max_abs_error``."""

    min_top1: float = 0.9
    min_correlation: float = 0.95
    max_abs_error: float = 0.25


#: The tolerance ``camserve-export --quantize int8`` checks (measured figures: docs/export.md).
INT8_TOLERANCE = QuantTolerance()


@dataclass
class QuantCheck:
    """What :func:`compare_quantized` measured (see the module docstring)."""

    top1: float
    correlation: dict[str, float] = field(default_factory=dict)
    abs_error: dict[str, float] = field(default_factory=dict)

    def failures(self, tol: QuantTolerance) -> list[str]:
        """What is outside ``tol``, one line each (empty: within)."""
        bad = [] if self.top1 >= tol.min_top1 else [f"top-1 agreement {self.top1:.3g} < {tol.min_top1:g}"]
        for name, c in self.correlation.items():
            if not c >= tol.min_correlation:
                bad.append(f"{name}: correlation {c:.3g} < {tol.min_correlation:g}")
        for name, e in self.abs_error.items():
            if not e <= tol.max_abs_error:
                bad.append(f"{name}: normalised abs error {e:.3g} > {tol.max_abs_error:g}")
        return bad


def quantize_graph(src: str | Path, out: str | Path) -> Path:
    """Write the dynamically quantised int8 form of the gradient-free CAM graph ``src`` to
    ``out`` (its metadata kept, ``quantize`` set to ``"int8"``); QuantizationError for a
    gradient graph."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    meta = GraphMeta.from_file(src)
    if meta.gradients:
        raise QuantizationError(f"invalid value for quantize: int8 needs a gradient-free graph, and "
                                f"{', '.join(m for m in meta.methods)} include a gradient method "
                                f"(int8 gradients lose their meaning; export gradient-free "
                                f"methods, e.g. --gradient-free)")
    out = Path(out)
    root = logging.getLogger()  # quantize_dynamic logs its pre-processing advice on the root logger
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    model = onnx.load(str(out))
    props = {p.key: p.value for p in model.metadata_props}
    props[KEYS["quantize"]] = json.dumps("int8")
    del model.metadata_props[:]
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(out))
    GraphMeta.from_file(out)  # the metadata still parses
    return out


def _normalised(maps: np.ndarray) -> np.ndarray:
    flat = maps.reshape(len(maps), -1).astype(np.float64)
    lo, hi = flat.min(axis=1, keepdims=True), flat.max(axis=1, keepdims=True)
    return (flat - lo) / np.where(hi > lo, hi - lo, 1.0)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest per-row Pearson correlation (1.0 for two constant maps that are equal)."""
    out = []
    for u, v in zip(a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)):
        su, sv = u.std(), v.std()
        if su == 0 or sv == 0:
            out.append(1.0 if np.allclose(u, v) else 0.0)
        else:
            out.append(float(((u - u.mean()) * (v - v.mean())).mean() / (su * sv)))
    return min(out) if out else 1.0


def compare_quantized(float_graph: str | Path, int8_graph: str | Path, x: np.ndarray, *,
                      threads: Optional[int] = None) -> QuantCheck:
    """Run both graphs on images ``x`` (N, 3, H, W) float32 and measure what int8 changes (see
    the module docstring); the maps are compared at the float graph's top-1 classes."""
    meta = GraphMeta.from_file(float_graph)
    first = meta.output_names[0]
    f_sess, q_sess = ort_session(float_graph, threads=threads), ort_session(int8_graph, threads=threads)
    feed = {"input": np.ascontiguousarray(x, dtype=np.float32)}
    (ref_out,) = f_sess.run([first], feed)
    if "target" in meta.input_names:
        feed["target"] = ref_out.argmax(axis=1).astype(np.int64)
    maps = list(meta.cam_outputs.values())
    names = [first, *maps]
    ref = dict(zip(names, f_sess.run(names, feed)))
    got = dict(zip(names, q_sess.run(names, feed)))
    top1 = float((ref[first].argmax(axis=1) == got[first].argmax(axis=1)).mean()) \
        if meta.spec.task in ("classification", "multilabel") else 1.0
    return QuantCheck(top1=top1,
                      correlation={n: _correlation(got[n], ref[n]) for n in maps},
                      abs_error={n: float(np.abs(_normalised(got[n]) - _normalised(ref[n])).max())
                                 for n in maps})

"""Verification of an exported CAM graph on onnxruntime, against a float64 PyTorch run.

A float32 graph cannot match float32 PyTorch to a fixed relative error on every network: over
50 layers the two runtimes' accumulation orders differ by ~1e-4 (ResNet-50), while an export bug
is off by orders of magnitude more. So both are measured against the same computation in float64
(a double copy of the model): the graph is accepted when, for every output, its error is within
``tolerance`` or within ``factor`` times PyTorch float32's own error on the same input. Both
figures are reported (:class:`Verification`).

Example::

    >>> import numpy as np
    >>> relative_error(np.array([1.0, 2.0]), np.array([1.0, 2.002]))  # doctest: +ELLIPSIS
    0.000999...
    >>> allowed_error(1e-4, 8.0, 3e-5)  # PyTorch float32 is off by 3e-5: up to 2.4e-4 is fine
    0.00024
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from ..engine import CamEngine, _per_target
from ..layers import LayerError, capture_layer, nchw_converter
from ..layouts import GRIDLESS_LAYOUTS
from ..methods import get_method
from ..models import LoadedModel
from ..tasks import GraphInput, TargetBatch, Task, make_task
from .format import cam_outputs, check_methods, output_names
from .session import ort_session
from .translate import ExportError

log = logging.getLogger(__name__)

#: Relative error (vs float64) always allowed.
DEFAULT_TOLERANCE = 1e-4
#: The graph's error may be this many times PyTorch float32's own error (both vs float64).
DEFAULT_FACTOR = 8.0
#: Batch size of the trace; verification runs another size.
TRACE_BATCH = 2


class VerificationError(ExportError):
    """The exported graph does not match the PyTorch engine (the message has the figures)."""


def allowed_error(tolerance: float, factor: float, baseline: float) -> float:
    """The error a graph output may have: ``max(tolerance, factor * baseline)`` where
    ``baseline`` is PyTorch float32's error on the same output."""
    return max(float(tolerance), float(factor) * float(baseline))


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """``max|a - b| / max(max|b|, tiny)``; infinity for shape mismatches."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return math.inf
    if a.size == 0:
        return 0.0
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30))


def _targets_as(tb: TargetBatch, dtype: torch.dtype) -> TargetBatch:
    """``tb`` with its float tensors (regions, references) in ``dtype``."""
    return dataclasses.replace(tb, **{f: getattr(tb, f).to(dtype) for f in ("region", "reference")
                                      if getattr(tb, f) is not None})


class _EngineReference:
    """What the PyTorch engine says for the outputs of one graph run (see :func:`verify_cam_onnx`),
    in float64 (the reference) and in float32 (the baseline the graph's error is compared with)."""

    def __init__(self, loaded: LoadedModel, layer: str, methods: Sequence[str], task: Task) -> None:
        self.layer, self.methods, self.task = layer, tuple(methods), task
        self.layout = loaded.spec.layout
        self.reshape = loaded.reshape if layer == loaded.layer else None
        if self.reshape is None and self.layout not in GRIDLESS_LAYOUTS:
            from ..families import choose_layer

            self.reshape = choose_layer(loaded.model, loaded.spec.input_size, layer,
                                        self.layout, score=task.probe_score).reshape
        self.model = loaded.model
        self.model64 = copy.deepcopy(loaded.model).double()
        kw = dict(layout=self.layout, reshape=self.reshape, task=task)
        self.engine = CamEngine(self.model, layer, **kw)  # type: ignore[arg-type]
        self.engine64 = CamEngine(self.model64, layer, **kw)  # type: ignore[arg-type]
        self.output = task.graph_output

    def _forward(self, model: torch.nn.Module, xb: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """The engine's forward pass (model + the layer recorded) without its backward."""
        with torch.no_grad(), capture_layer(model, self.layer, "record") as cap:
            out = self.task.graph_value(self.task.output(model(xb)))
        to_nchw = nchw_converter(self.layer, self.layout, self.reshape)  # type: ignore[arg-type]
        return out.numpy(), to_nchw(cap.output).numpy()

    def targets(self, xb: torch.Tensor, feed: Mapping[str, np.ndarray]) -> TargetBatch:
        """The targets the graph resolves from ``feed`` (its target inputs; omitted optional ones
        at their default), on the float32 engine's output."""
        inputs = {g.name: torch.from_numpy(np.asarray(feed[g.name])) if g.name in feed
                  else g.fill(1) for g in self.task.graph_inputs(tuple(xb.shape[-2:]))}
        return self.task.graph_targets(self.engine.predict(xb), inputs)

    def _maps(self, model: torch.nn.Module, engine: CamEngine, xb: torch.Tensor,
              targets: TargetBatch, pinned: torch.Tensor, g: Optional[torch.Tensor],
              k: int = 1) -> dict[str, np.ndarray]:
        """The gradients (the engine's, at the graph's activations) and every method's map: the
        first gradient method's by the engine at the graph's activations, the other pure ones by
        their formula on the graph's activations and gradients, the ones that run more forwards
        (ReciproCAM) by the engine on the input."""
        dt = next(model.parameters()).dtype
        tb = _targets_as(targets, dt)
        per_target = self.task.graph_per_target  # (N, K, ...) outputs: every target's
        out: dict[str, np.ndarray] = {}
        names = cam_outputs(self.methods)
        first = next((m for m in self.methods if get_method(m).gradients), None)
        if first is not None:
            try:
                with capture_layer(model, self.layer, "replace", activations=pinned.to(dt),
                                   layout=self.layout, reshape=self.reshape):  # type: ignore[arg-type]
                    res = engine(xb.to(dt), targets=tb, method=first)
            except LayerError as exc:
                raise VerificationError(f"graph activations do not fit the model: {exc}") from None
            assert res.gradients is not None  # a gradient method
            out["gradients"] = (res.gradients if per_target else res.gradients[:, 0]).numpy()
            out[names[first]] = (res.cams if per_target else res.cams[:, 0]).numpy()
        a = pinned.to(dt)
        for m in self.methods:
            fn = get_method(m)
            if names[m] in out:
                continue
            gd = None if g is None else g.to(dt)
            if fn.pure and per_target:  # one map per target (a gradient-free map serves them all)
                out[names[m]] = _per_target(fn(a[:, None], gd), k).numpy()
            elif fn.pure:  # the method's own formula on the graph's activations and gradients
                out[names[m]] = fn(a, gd).numpy()
            else:
                out[names[m]] = engine(xb.to(dt), targets=tb, method=m).cams[:, 0].numpy()
        return out

    def __call__(self, xb: torch.Tensor, targets: TargetBatch, got: dict[str, np.ndarray]
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """(float64 reference, float32 PyTorch) outputs for input ``xb``: the forward ones on
        ``xb``, the backward ones at the graph's activations ``got["activations"]``, the extra
        methods on the graph's A and G."""
        out, activations = self._forward(self.model, xb)
        out64, activations64 = self._forward(self.model64, xb.double())
        pinned = torch.from_numpy(got["activations"])
        g = torch.from_numpy(got["gradients"]) if "gradients" in got else None
        k = got["cam"].shape[1] if self.task.graph_per_target else 1
        ref = {self.output: out64, "activations": activations64,
               **self._maps(self.model64, self.engine64, xb, targets, pinned, g, k)}
        own = {self.output: out, "activations": activations,
               **self._maps(self.model, self.engine, xb, targets, pinned, g, k)}
        return ref, own


@dataclass
class Verification:
    """What :func:`verify_cam_onnx` found: ``errors[case][output]``, the graph's relative errors
    against float64 PyTorch (of the final draw), ``baseline[case][output]``, PyTorch float32's
    errors against the same, and how many input rows were redrawn because of a ReLU/max-pool
    kink."""

    errors: dict[str, dict[str, float]]
    redrawn: int = 0
    baseline: dict[str, dict[str, float]] = field(default_factory=dict)


def _row_errors(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row: ``max|a_i - b_i| / max|b|`` (the denominator over the whole batch)."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a64.shape != b64.shape:
        return np.full(max(len(b64), 1), math.inf)
    denom = max(float(np.abs(b64).max()) if b64.size else 0.0, 1e-30)
    return np.abs(a64 - b64).reshape(len(b64), -1).max(axis=1) / denom


def _explicit(g: GraphInput, n: int, n_labels: int, size: tuple[int, int],
              gen: torch.Generator) -> np.ndarray:
    """Explicit values of target input ``g`` for ``n`` rows, drawn by its kind: classes
    ``(3i + 1) mod n_labels`` (the last row at the default, when there is one), regions of a
    random box per row (the last row at the default), vectors from a normal distribution."""
    if g.kind == "class":
        v = np.array([(3 * i + 1) % max(n_labels, 1) for i in range(n)], dtype=np.int64)
    elif g.kind == "region":
        h, w = size
        v = np.zeros((n, h, w), dtype=np.float32)
        for i in range(n):
            y0 = int(torch.randint(0, max(1, h // 2), (1,), generator=gen))
            x0 = int(torch.randint(0, max(1, w // 2), (1,), generator=gen))
            v[i, y0:y0 + max(1, h // 3), x0:x0 + max(1, w // 3)] = 1.0
    else:
        v = torch.randn(n, *g.shape, generator=gen).numpy().astype(np.float32)
    if g.optional and n > 0:
        v[-1] = g.default
    return v


def verify_cam_onnx(path: str | Path, loaded: LoadedModel, *, methods: Sequence[str],
                    layer: Optional[str] = None, batch: int = TRACE_BATCH + 1,
                    tolerance: float = DEFAULT_TOLERANCE, factor: float = DEFAULT_FACTOR,
                    seed: int = 1, redraws: int = 3,
                    threads: Optional[int] = None) -> Verification:
    """Run the graph in onnxruntime on a random batch and compare every output with
    :class:`CamEngine` run in float64, in four cases: explicit target inputs (drawn by kind:
    classes, one of them -1; box regions, one of them -1; reference vectors), every optional
    input at its default, the optional inputs not fed, and a batch of one. The targets are the
    ones the graph resolves from its inputs (:meth:`camserve.tasks.Task.graph_targets` on the
    float32 output, so a -1 is each row's own top-1 class, or predicted mask). The same
    comparison for :class:`CamEngine` in float32 gives the baseline; an output passes when the
    graph's error is at most :func:`allowed_error` (``tolerance``, or ``factor`` times the
    baseline). Raises VerificationError naming the outputs that do not pass, with both figures.

    The task's output and ``activations`` are compared with the engine run on the same input;
    ``gradients`` and ``cam`` with the engine run at the graph's activations
    (:func:`camserve.layers.capture_layer` in ``"replace"`` mode); each extra ``cam_<method>``
    with that method's function (:func:`camserve.methods.get_method`) applied to the graph's
    activations and gradients (the Grad-CAM++ weights divide by sums that can be near zero, which
    magnifies float32 rounding in the gradients beyond any fixed tolerance); a method that runs
    more forwards (ReciproCAM) with the engine on the same input. A gradient-free graph has no
    ``gradients`` to compare. The backward pass of a ReLU or max-pool network is
    discontinuous: a ReLU mask flips when a pre-activation crosses 0, a max-pool picks another
    element when two are within rounding. A float32 rounding difference of 1e-6 — onnxruntime's
    kernels against PyTorch's — flips one such switch in one image of a few for deep random-weight
    networks; the gradient then differs by percents although both are right. Pinning the
    activations removes most of these events (the prefix no longer differs); a row whose forward
    outputs agree but whose gradients do not is drawn again, up to ``redraws`` times (counted in
    the result). An export bug fails every draw.
    """
    methods = check_methods(methods)
    sess = ort_session(path, threads=threads)
    gen = torch.Generator().manual_seed(seed)
    size = tuple(loaded.spec.input_size)
    x = torch.randn(batch, 3, *size, generator=gen)
    task = make_task(loaded.spec.task, loaded.labels, loaded.spec.task_settings)
    reference = _EngineReference(loaded, layer or loaded.layer, methods, task)
    inputs = task.graph_inputs(size)  # type: ignore[arg-type]
    names = output_names(methods, task)
    forward_outputs = (task.graph_output, "activations")
    baseline: dict[str, dict[str, float]] = {}
    explicit = {g.name: _explicit(g, batch, len(loaded.labels), size, gen)  # type: ignore[arg-type]
                for g in inputs}
    required = {g.name: v for g, v in zip(inputs, explicit.values()) if not g.optional}
    defaults = {g.name: np.asarray(g.fill(batch).numpy()) if g.optional else explicit[g.name]
                for g in inputs}
    redrawn = 0
    for attempt in range(redraws + 1):
        cases: dict[str, tuple[torch.Tensor, dict[str, np.ndarray]]] = {
            "explicit": (x, {"input": x.numpy(), **explicit}),
            "-1": (x, {"input": x.numpy(), **defaults}),
            "omitted": (x, {"input": x.numpy(), **required}),
            "batch1": (x[:1], {"input": x[:1].numpy(), **{k: v[:1] for k, v in required.items()}}),
        }
        errors: dict[str, dict[str, float]] = {}
        bad: list[str] = []
        kinked: set[int] = set()
        refs: dict[tuple[Any, ...], tuple[dict[str, np.ndarray], Any]] = {}
        for case, (xb, feed) in cases.items():
            got = dict(zip(names, sess.run(names, feed)))
            targets = reference.targets(xb, feed)
            key = (len(xb), *(t.numpy().tobytes() for t in (targets.index, targets.region,
                                                              targets.reference, targets.box)
                              if t is not None))
            if key in refs and all(np.array_equal(refs[key][0][n], got[n]) for n in names):
                ref, own = refs[key][1]  # same input, same targets, same outputs: same reference
            else:
                ref, own = reference(xb, targets, got)
                refs[key] = (got, (ref, own))
            rows = {n: _row_errors(got[n], ref[n]) for n in names}
            base = {n: float(_row_errors(own[n], ref[n]).max()) for n in names}
            limit = {n: allowed_error(tolerance, factor, base[n]) for n in names}
            errors[case] = {n: float(r.max()) for n, r in rows.items()}
            baseline[case] = base
            bad += [f"{case}/{n}={e:.2e} (PyTorch float32 {base[n]:.2e})"
                    for n, e in errors[case].items() if not e <= limit[n]]
            forward_ok = np.all([rows[n] <= limit[n] for n in forward_outputs], axis=0)
            backward_bad = np.any([rows[n] > limit[n] for n in names if n not in forward_outputs],
                                  axis=0)
            kinked |= {int(i) for i in np.nonzero(forward_ok & backward_bad)[0]}
        if not bad:
            return Verification(errors, redrawn, baseline)
        only_kinks = all(n.split("/", 1)[1].split("=")[0] not in forward_outputs for n in bad)
        if attempt == redraws or not only_kinks or not kinked:
            break
        log.info("verification: rows %s of the draw hit a ReLU/max-pool kink; drawing them again",
                 sorted(kinked))
        fresh = torch.randn(batch, 3, *size, generator=gen)
        for i in kinked:
            x[i] = fresh[i]
        redrawn += len(kinked)
    raise VerificationError(f"{path}: the ONNX graph does not match the PyTorch engine "
                            f"(relative error vs float64 > {tolerance:g} and > {factor:g} x "
                            f"PyTorch float32's): {', '.join(bad)}"
                            + (f" (after redrawing {redrawn} rows)" if redrawn else ""))

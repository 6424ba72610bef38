"""Export a classifier to an ONNX graph that computes Grad-CAM itself, and verify it.

The graph
---------
Inputs:

* ``input``  float32 (N, 3, H, W) — N dynamic, H and W the model's input size;
* ``target`` int64 (N,) — the class to explain per row; a negative value (-1) means "the row's
  top-1 class". It is optional: the graph stores ``[-1]`` as its default (an initializer that is
  also a graph input), so a session run without it explains the top-1 class of every row, and a
  (1,) tensor applies one target to every row.

Outputs: ``logits`` (N, C); ``activations`` (N, K, h, w) of the target layer (NCHW, token or
channels-last layers reshaped by :func:`camserve.layers.to_nchw`); ``gradients`` (N, K, h, w) =
d logit[target] / d activations; ``cam`` (N, h, w), the raw map (post-ReLU, not normalised) of the
first method (Grad-CAM by default); then ``cam_<method>`` per extra method, with ``+`` spelled ``p``
(``gradcam++`` -> ``cam_gradcampp``).

All of it is a trace of :class:`camserve.graph.CamGraph`, which runs the engine's own forward hook,
``torch.autograd.grad`` and the :mod:`camserve.methods` functions, so the graph computes what the
TorchServe handler computes. ``metadata_props`` carry everything a consumer needs (labels, mean,
std, input size, layer, methods, output names, camserve version): the ``.onnx`` file alone is
enough downstream (see :func:`read_cam_metadata`).

How
---
The trace (``make_fx`` with only the batch dimension symbolic) already applies the ONNX exporter's
decompositions and camserve's backward decompositions, so the translation to ONNX runs once over
that graph (the "fast" exporter, a few seconds per model). ``--exporter torch`` instead hands the
traced graph to the public ``torch.onnx.export(..., dynamo=True)``, which traces it twice more; the
default ``auto`` uses the fast path and falls back to ``torch.onnx.export`` if it fails. Every
export is then checked: ``onnx.checker.check_model(full_check=True)`` and an onnxruntime run on a
random batch of another size than the traced one, output by output against
:class:`camserve.CamEngine` (relative error ``max|a-b| / max|b|`` <= 1e-4), with an explicit target,
with -1, and without the ``target`` input.

Command line::

    python -m export.onnx_export models/shapes --out model_store/shapes.cam.onnx
    python -m export.onnx_export --arch torchvision.models.resnet18 --num-classes 10 \\
        --layer layer3 --input-size 128 --methods gradcam,gradcam++ --out /tmp/r18.cam.onnx

Exit status: 0 exported and verified; 1 export or verification failed; 2 usage error.
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import logging
import math
import re
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

import camserve
from camserve.engine import CamEngine
from camserve.methods import get_method
from camserve.graph import (
    check_methods,
    frozen_parameters,
    lift_constants,
    method_output_name,
    output_names,
    trace_cam_graph,
    trace_model_graph,
)
from camserve.layers import detect_layout, locate_layer, resolve_layer, to_nchw
from camserve.models import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ConfigError,
    ModelSpec,
    build_model,
    load_labels,
    load_model_config,
)

log = logging.getLogger(__name__)

#: The opset the ONNX translation emits; other opsets (>= 18) go through onnxscript's converter.
BASE_OPSET = 18
#: Relative error allowed between the graph and the engine.
DEFAULT_TOLERANCE = 1e-4
#: Batch size of the trace; verification runs another size.
TRACE_BATCH = 2
EXPORTERS: tuple[str, ...] = ("auto", "fast", "torch")
OPTIMIZE_LEVELS: tuple[str, ...] = ("basic", "full")
INPUT_NAMES: tuple[str, str] = ("input", "target")
BATCH_DIM = "batch"


class ExportError(RuntimeError):
    """The model could not be exported to ONNX."""


class VerificationError(ExportError):
    """The exported graph does not match the PyTorch engine (the message has the figures)."""


# -- what to export ---------------------------------------------------------------------------------

@dataclass
class CamSource:
    """A classifier ready to export, with what the graph's metadata records about it."""

    model: nn.Module
    arch: str
    input_size: tuple[int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    layer: Optional[str] = None
    labels: list[str] = field(default_factory=list)
    layout: Optional[str] = None
    method: str = "gradcam"
    topk: int = 5
    max_pixels: Optional[int] = None


def load_model_dir(model_dir: str | Path, *, layer: Optional[str] = None,
                   weights: Optional[str | Path] = None) -> CamSource:
    """A model folder (``model-config.yaml`` + model file + weights + labels) as a :class:`CamSource`;
    ``layer`` overrides the config's ``target_layer``."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"invalid value for MODEL_DIR: {str(model_dir)!r} is not a folder")
    spec = ModelSpec.from_config(load_model_config(model_dir).get("handler"))
    model = build_model(spec, model_dir, weights=weights)
    n_cls = _num_classes(model, spec.input_size)
    return CamSource(model=model, arch=spec.arch, input_size=spec.input_size, mean=spec.mean,
                     std=spec.std, layer=layer or spec.target_layer,
                     labels=load_labels(spec, model_dir, n_cls), layout=spec.layout,
                     method=spec.method, topk=spec.topk, max_pixels=spec.max_pixels)


def load_arch(arch: str, *, weights: Optional[str | Path] = None, num_classes: Optional[int] = None,
              input_size: int | Sequence[int] = 224, layer: Optional[str] = None,
              mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
              labels: Optional[str | Path] = None, layout: Optional[str] = None,
              calibrate: bool = True) -> CamSource:
    """A model without a folder: ``arch`` as in a config (``torchvision.models.resnet18``,
    ``package.module:Class``), a state_dict file or random init (then, with ``calibrate``, the
    BatchNorm statistics are recomputed on random input so the logits are not vanishingly small)."""
    cfg: dict[str, Any] = {"arch": arch, "input_size": list(input_size) if not isinstance(input_size, int)
                           else input_size, "mean": list(mean), "std": list(std)}
    if num_classes is not None:
        cfg["num_classes"] = num_classes
    if layout is not None:
        cfg["layout"] = layout
    spec = ModelSpec.from_config(cfg)
    model = build_model(spec, Path.cwd(), weights=weights)
    if weights is None and calibrate:
        recalibrate_batchnorm(model, spec.input_size)
    n_cls = _num_classes(model, spec.input_size)
    names = [str(i) for i in range(n_cls)]
    if labels is not None:
        names = load_labels(ModelSpec(arch=arch, labels=Path(labels).name), Path(labels).parent, n_cls)
    return CamSource(model=model, arch=arch, input_size=spec.input_size, mean=spec.mean, std=spec.std,
                     layer=layer, labels=names, layout=layout)


def _num_classes(model: nn.Module, size: tuple[int, int]) -> int:
    with torch.inference_mode():
        out = model(torch.zeros(2, 3, *size))
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        raise ConfigError("invalid value for arch: the model must return logits (N, classes); got "
                          f"{type(out).__name__}")
    return int(out.shape[1])


def recalibrate_batchnorm(model: nn.Module, input_size: Sequence[int], steps: int = 4,
                          batch: int = 8, seed: int = 0) -> nn.Module:
    """Recompute BatchNorm running statistics of a randomly initialised ``model`` on random normal
    input (cumulative averages, ``momentum=None``), then put it back in eval mode.

    Freshly initialised MobileNetV3/EfficientNet have running stats (0, 1) that do not match their
    activations, so their logits come out around 1e-10; with calibrated statistics every layer
    sees unit-scale activations and numerical comparisons are meaningful.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model
    saved = [(m, m.momentum) for m in bns]
    gen = torch.Generator().manual_seed(seed)
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None
        model.train()
        with torch.no_grad():
            for _ in range(steps):
                model(torch.randn(batch, 3, *[int(s) for s in input_size], generator=gen))
    finally:
        for m, mom in saved:
            m.momentum = mom
        model.eval()
    return model


# -- FX graph -> ONNX -----------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _onnx_registry(opset: int = BASE_OPSET) -> tuple[Any, dict[Any, Callable[..., Any]]]:
    """The torch.onnx registry of ATen translations and the decomposition table of the operations it
    does not translate (the exporter's own ``run_decompositions`` table)."""
    from torch.onnx._internal.exporter import _decomp, _registration

    registry = _registration.ONNXRegistry.from_torchlib(opset)
    implemented = set(_decomp.get_onnx_implemented_overloads(registry))
    return registry, _decomp.create_onnx_friendly_decomposition_table(implemented)


def onnx_decompositions() -> dict[Any, Callable[..., Any]]:
    """Decompositions that leave only operations the ONNX translation knows (pass to the trace)."""
    return dict(_onnx_registry()[1])


def _translate_fast(gm: torch.fx.GraphModule, input_names: Sequence[str],
                    outputs: Sequence[str]) -> Any:
    """Translate a traced, functional ATen graph to an ``onnx_ir.Model`` with torch.onnx's
    translation step only (the graph already has the exporter's decompositions applied).

    This calls torch.onnx's internal translation functions (``torch.onnx._internal.exporter``),
    which the pinned torch version provides; ``graph_to_onnx`` falls back to the public
    ``torch.onnx.export`` if they change or fail."""
    import onnx_ir as ir
    from torch.onnx._internal.exporter import _core, _fx_passes, _ir_passes

    registry, _ = _onnx_registry()
    gm = copy.copy(gm)  # the passes below rewrite the graph; keep the caller's intact
    gm.graph = copy.deepcopy(gm.graph)
    consts = lift_constants(gm)
    _fx_passes.insert_type_promotion_nodes(gm)
    gm = _fx_passes.remove_assertion_nodes(gm)
    for node in gm.graph.nodes:  # no module scopes in a make_fx graph; say so (else a warning per node)
        node.meta.setdefault("nn_module_stack", {})
    model = ir.Model(graph=ir.Graph([], [], nodes=[], name="main_graph"), ir_version=10,
                     producer_name="camserve", producer_version=camserve.__version__)
    _core._translate_fx_graph(gm.graph, model, graph_like=model.graph, owned_graphs={},
                              lower="at_conversion", registry=registry)
    for value in list(model.graph.inputs):
        if value.name in consts:
            model.graph.inputs.remove(value)
            value.const_value = _core.TorchTensor(consts[value.name], name=value.name)
            model.graph.initializers[value.name] = value
    if len(model.graph.inputs) != len(input_names) or len(model.graph.outputs) != len(outputs):
        raise ExportError(f"translated graph has {len(model.graph.inputs)} inputs and "
                          f"{len(model.graph.outputs)} outputs; expected {len(input_names)} and "
                          f"{len(outputs)}")
    for value, name in zip(model.graph.inputs, input_names):
        value.name = name
    for value, name in zip(model.graph.outputs, outputs):
        value.name = name
    _ir_passes.add_opset_imports(model)
    return model


def _translate_torch(gm: torch.fx.GraphModule, args: tuple[torch.Tensor, ...],
                     input_names: Sequence[str], outputs: Sequence[str]) -> Any:
    """Translate with the public ``torch.onnx.export(..., dynamo=True)`` (re-traces the graph)."""
    batch = torch.export.Dim(BATCH_DIM, min=1, max=1 << 20)
    gm.eval()
    with warnings.catch_warnings():  # "axis name batch will not be used": it is, for input 0
        warnings.filterwarnings("ignore", message=".*axis name.*", category=UserWarning)
        program = torch.onnx.export(gm, args, dynamo=True, input_names=list(input_names),
                                    output_names=list(outputs), optimize=False, verbose=False,
                                    dynamic_shapes=tuple({0: batch} for _ in args))
    return program.model


def _rename_dims(model: Any, name: str) -> None:
    """Call every symbolic dimension made of one symbol ``name`` (u0, s0, batch, ... -> batch)."""
    import onnx_ir as ir

    pattern = re.compile(r"\b([us]\d+|batch)\b")

    def fix(value: Any) -> None:
        if value is None or value.shape is None:
            return
        dims = [ir.SymbolicDim(pattern.sub(name, d.value)) if isinstance(d, ir.SymbolicDim)
                and isinstance(d.value, str) else d for d in value.shape]
        value.shape = ir.Shape(dims)

    for v in model.graph.inputs:
        fix(v)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for v in node.outputs:
            fix(v)


def _finish(model: Any, *, optimize: str, opset: int) -> Any:
    """Optimise and convert the opset.

    ``basic``: constant folding, dead code, common subexpressions, shared initializers — what
    onnxruntime cannot do as cheaply itself (its session applies the operator fusions).
    ``full``: onnxscript's ``optimize_ir`` and its fusions on top; its pattern rewriter grows with
    the square of the graph size (a minute for Swin, ViT) and gains nothing measurable on
    onnxruntime for a ResNet-50 (median batch time within 1%).
    """
    import onnx_ir as ir
    import onnx_ir.passes.common as passes
    import onnxscript.optimizer

    if optimize not in OPTIMIZE_LEVELS:
        raise ValueError(f"invalid value for optimize: {optimize!r} (allowed: "
                         f"{', '.join(OPTIMIZE_LEVELS)})")
    passes.InlinePass()(model)
    if optimize == "full":
        from onnxscript.rewriter import onnx_fusions

        onnxscript.optimizer.optimize_ir(model)
        onnx_fusions.fuse(model)
    else:
        for _ in range(2):
            onnxscript.optimizer.fold_constants(model)
            passes.RemoveUnusedNodesPass()(model)
        ir.passes.Sequential(
            passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
            passes.DeduplicateInitializersPass(),
            passes.CommonSubexpressionEliminationPass(),
            passes.RemoveUnusedNodesPass(),
            passes.OutputFixPass(),
            passes.NameFixPass(),
        )(model)
    if opset != BASE_OPSET:
        from onnxscript import version_converter

        version_converter.convert_version(model, opset, fallback=True)
    return model


@contextmanager
def _timed(timings: dict[str, float], key: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t0


def graph_to_onnx(gm_factory: Callable[[bool], torch.fx.GraphModule], args: tuple[torch.Tensor, ...],
                  input_names: Sequence[str], outputs: Sequence[str], *, exporter: str = "auto",
                  optimize: str = "basic", opset: int = BASE_OPSET,
                  timings: Optional[dict[str, float]] = None) -> tuple[Any, str]:
    """ONNX model (``onnx_ir.Model``) of a traced graph; returns it with the exporter used.

    ``gm_factory(onnx_ready)`` traces the graph: with ``onnx_ready=True`` it must apply
    :func:`onnx_decompositions` and functionalise (for the fast path). ``timings`` receives the
    seconds of each step (trace, translate, optimize).
    """
    timings = {} if timings is None else timings
    if exporter not in EXPORTERS:
        raise ValueError(f"invalid value for exporter: {exporter!r} (allowed: {', '.join(EXPORTERS)})")
    model = None
    used = exporter
    if exporter in ("auto", "fast"):
        try:
            with _timed(timings, "trace"):
                gm = gm_factory(True)
            with _timed(timings, "translate"):
                model = _translate_fast(gm, input_names, outputs)
            used = "fast"
        except Exception as exc:
            if exporter == "fast":
                raise ExportError(f"fast ONNX translation failed: {type(exc).__name__}: {exc}") from exc
            log.warning("fast ONNX translation failed (%s: %s); retrying with torch.onnx.export",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    if model is None:
        try:
            with _timed(timings, "trace"):
                gm = gm_factory(False)
            with _timed(timings, "translate"):
                model = _translate_torch(gm, args, input_names, outputs)
            used = "torch"
        except Exception as exc:
            raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}") from exc
    _rename_dims(model, BATCH_DIM)
    with _timed(timings, "optimize"):
        model = _finish(model, optimize=optimize, opset=opset)
    return model, used


def _set_target_default(model: Any) -> None:
    """Make the ``target`` input optional: an initializer ``[-1]`` that is also a graph input (ORT
    uses it when the input is not fed), with its own dimension name so that (1,) is accepted."""
    import onnx_ir as ir

    target = next(v for v in model.graph.inputs if v.name == "target")
    target.shape = ir.Shape(["target_batch"])
    target.const_value = ir.tensor(np.array([-1], dtype=np.int64), name="target")
    model.graph.register_initializer(target)


def cam_metadata(src: CamSource, layer: str, methods: Sequence[str]) -> dict[str, str]:
    """The ``metadata_props`` of a CAM graph (all values are strings; lists and maps are JSON)."""
    meta = {
        "camserve_version": camserve.__version__,
        "arch": src.arch,
        "layer": layer,
        "methods": json.dumps(list(methods)),
        "cam_outputs": json.dumps({m: ("cam" if i == 0 else method_output_name(m))
                                   for i, m in enumerate(methods)}),
        "labels": json.dumps(list(src.labels)),
        "num_classes": str(len(src.labels)),
        "mean": json.dumps([float(v) for v in src.mean]),
        "std": json.dumps([float(v) for v in src.std]),
        "input_size": json.dumps([int(v) for v in src.input_size]),
        "topk": str(src.topk),
        "target": "int64 (N,) or (1,); negative = top-1 class; optional, default [-1]",
    }
    if src.max_pixels is not None:
        meta["max_pixels"] = str(src.max_pixels)
    return meta


@dataclass
class CamMetadata:
    """What a CAM graph's ``metadata_props`` say, parsed (see :func:`cam_metadata`)."""

    layer: str
    methods: list[str]
    cam_outputs: dict[str, str]
    labels: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: tuple[int, int]
    topk: int = 5
    arch: str = ""
    version: str = ""
    max_pixels: Optional[int] = None

    def output_for(self, method: str) -> str:
        """Output name of ``method``'s map; ValueError naming the methods the graph has."""
        key = str(method).lower()
        if key not in self.cam_outputs:
            raise ValueError(f"invalid value for method: {method!r} is not in this graph "
                             f"(available: {', '.join(self.methods)}; export with --methods)")
        return self.cam_outputs[key]


def parse_cam_metadata(props: Mapping[str, str]) -> CamMetadata:
    """Parse a CAM graph's metadata map; ValueError naming a missing or invalid key."""
    def get(key: str) -> str:
        if key not in props:
            raise ValueError(f"not a camserve CAM graph: metadata key {key!r} is missing "
                             f"(export the model with python -m export.onnx_export)")
        return props[key]

    try:
        methods = [str(m) for m in json.loads(get("methods"))]
        size = [int(v) for v in json.loads(get("input_size"))]
        mean = tuple(float(v) for v in json.loads(get("mean")))
        std = tuple(float(v) for v in json.loads(get("std")))
        labels = [str(v) for v in json.loads(get("labels"))]
        outs = {str(k): str(v) for k, v in json.loads(get("cam_outputs")).items()}
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise ValueError(f"not a camserve CAM graph: invalid metadata: {exc}") from None
    if len(size) != 2 or len(mean) != 3 or len(std) != 3:
        raise ValueError("not a camserve CAM graph: invalid input_size/mean/std metadata")
    return CamMetadata(layer=get("layer"), methods=methods, cam_outputs=outs, labels=labels,
                       mean=mean, std=std, input_size=(size[0], size[1]),  # type: ignore[arg-type]
                       topk=int(props.get("topk", "5")), arch=props.get("arch", ""),
                       version=props.get("camserve_version", ""),
                       max_pixels=int(props["max_pixels"]) if "max_pixels" in props else None)


def read_cam_metadata(path: str | Path) -> CamMetadata:
    """:func:`parse_cam_metadata` of an ``.onnx`` file (reads the header, not the weights)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return parse_cam_metadata({p.key: p.value for p in proto.metadata_props})


# -- export + verify --------------------------------------------------------------------------------

@dataclass
class ExportInfo:
    """What :func:`export_cam_onnx` did."""

    path: Path
    layer: str
    methods: tuple[str, ...]
    outputs: list[str]
    exporter: str
    seconds: float
    errors: dict[str, dict[str, float]] = field(default_factory=dict)
    redrawn: int = 0
    timings: dict[str, float] = field(default_factory=dict)


def export_cam_onnx(src: CamSource, out: str | Path, *, methods: Sequence[str] = ("gradcam",),
                    opset: int = BASE_OPSET, exporter: str = "auto", optimize: str = "basic",
                    verify: bool = True, tolerance: float = DEFAULT_TOLERANCE,
                    seed: int = 0, threads: Optional[int] = None) -> ExportInfo:
    """Trace, translate, check and save the CAM graph of ``src`` to ``out``; with ``verify`` also
    compare it with :class:`CamEngine` (:func:`verify_cam_onnx`, raising VerificationError;
    ``threads``: onnxruntime intra-op threads for it)."""
    if opset < BASE_OPSET:
        raise ValueError(f"invalid value for opset: {opset} (allowed: {BASE_OPSET} or newer)")
    methods = check_methods(methods)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    example = torch.randn(TRACE_BATCH, 3, *src.input_size, generator=gen)
    layer = src.layer or locate_layer(src.model, example)
    outputs = output_names(methods)

    def trace(onnx_ready: bool) -> torch.fx.GraphModule:
        return trace_cam_graph(src.model, layer, example, methods, layout=src.layout,  # type: ignore[arg-type]
                               decompositions=onnx_decompositions() if onnx_ready else None,
                               functional=onnx_ready)

    target = torch.full((TRACE_BATCH,), -1, dtype=torch.long)
    timings: dict[str, float] = {}
    model, used = graph_to_onnx(trace, (example, target), INPUT_NAMES, outputs, exporter=exporter,
                                optimize=optimize, opset=opset, timings=timings)
    _set_target_default(model)
    model.metadata_props.update(cam_metadata(src, layer, methods))
    model.doc_string = (f"camserve CAM graph: {src.arch}, layer {layer}, methods {', '.join(methods)}. "
                        f"Inputs: input float32 (N,3,{src.input_size[0]},{src.input_size[1]}), "
                        f"target int64 (N,) optional, negative = top-1. Outputs: {', '.join(outputs)}.")
    with _timed(timings, "save"):
        out = _save(model, out)
    with _timed(timings, "check"):
        _check(out)
    info = ExportInfo(path=out, layer=layer, methods=methods, outputs=outputs, exporter=used,
                      seconds=time.perf_counter() - t0, timings=timings)
    log.info("exported %s (layer %s, %s exporter) in %.1fs", out, layer, used, info.seconds)
    if verify:
        with _timed(timings, "verify"):
            checked = verify_cam_onnx(out, src, layer=layer, methods=methods,
                                      tolerance=tolerance, seed=seed + 1, threads=threads)
        info.errors, info.redrawn = checked.errors, checked.redrawn
    return info


def export_plain_onnx(model: nn.Module, out: str | Path, input_size: Sequence[int], *,
                      exporter: str = "auto", optimize: str = "basic",
                      opset: int = BASE_OPSET) -> Path:
    """The plain classifier (``input`` -> ``logits``) through the same trace and translation as the
    CAM graph — the baseline the CAM graph's cost is measured against."""
    example = torch.randn(TRACE_BATCH, 3, *[int(s) for s in input_size])

    def trace(onnx_ready: bool) -> torch.fx.GraphModule:
        with frozen_parameters(model):
            return trace_model_graph(model, example,
                                     decompositions=onnx_decompositions() if onnx_ready else None,
                                     functional=onnx_ready)

    onnx_model, _ = graph_to_onnx(trace, (example,), ("input",), ("logits",), exporter=exporter,
                                  optimize=optimize, opset=opset)
    path = _save(onnx_model, out)
    _check(path)
    return path


def _save(model: Any, out: str | Path) -> Path:
    import onnx_ir as ir

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values()
               if v.const_value is not None)
    if size > 1_800_000_000:  # protobuf's 2 GB limit: weights go to a side file
        ir.save(model, out, external_data=out.name + ".data")
    else:
        ir.save(model, out)
    return out


def _check(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path}: onnx.checker rejected the graph: {exc}") from None


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    """``max|a - b| / max(max|b|, tiny)``; infinity for shape mismatches."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return math.inf
    if a.size == 0:
        return 0.0
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-30))


def ort_session(path: str | Path, device: str = "cpu", threads: Optional[int] = None,
                spinning: bool = True) -> Any:
    """An onnxruntime session on ``device`` (``cuda`` when its provider is available, else CPU)
    with ``threads`` intra-op threads; ``spinning=False`` lets idle pool threads sleep at once
    (better when other threads of the process need the CPU between runs)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: the optional "target" input is an initializer
    if threads:
        opts.intra_op_num_threads = int(threads)
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        else:
            log.warning("CUDAExecutionProvider is not available (onnxruntime %s has %s); using CPU",
                        ort.__version__, ", ".join(ort.get_available_providers()))
    elif device != "cpu":
        raise ValueError(f"invalid value for device: {device!r} (allowed: cpu, cuda)")
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


@contextmanager
def pinned_layer_output(model: nn.Module, layer: str, activations: torch.Tensor,
                        layout: Optional[str] = None) -> Iterator[None]:
    """Inside the block, ``layer``'s output is replaced by ``activations`` (N, K, h, w) — written
    through the :func:`camserve.layers.to_nchw` view of the output, so token and channels-last
    layers keep their other entries (e.g. a ViT class token). The engine then computes gradients
    and CAMs *at these activations*."""
    _, module = resolve_layer(model, layer)

    def pin(_mod: nn.Module, _inp: Any, out: Any) -> torch.Tensor:
        new = out.detach().clone()
        view = to_nchw(new, layout or detect_layout(new.shape))  # type: ignore[arg-type]
        if view.shape != activations.shape:
            raise VerificationError(f"graph activations of shape {tuple(activations.shape)} do not "
                                    f"fit layer {layer!r} ({tuple(view.shape)})")
        view.copy_(activations.to(view.dtype))
        if not torch.equal(to_nchw(new, layout or detect_layout(new.shape)), view):  # type: ignore[arg-type]
            raise VerificationError(f"cannot pin layer {layer!r}: its NCHW form is not a view")
        return new

    handle = module.register_forward_hook(pin)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class Verification:
    """What :func:`verify_cam_onnx` found: ``errors[case][output]`` (relative errors of the final
    draw) and how many input rows were redrawn because of a ReLU/max-pool kink."""

    errors: dict[str, dict[str, float]]
    redrawn: int = 0


def _row_errors(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row: ``max|a_i - b_i| / max|b|`` (the denominator over the whole batch)."""
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a64.shape != b64.shape:
        return np.full(max(len(b64), 1), math.inf)
    denom = max(float(np.abs(b64).max()) if b64.size else 0.0, 1e-30)
    return np.abs(a64 - b64).reshape(len(b64), -1).max(axis=1) / denom


def verify_cam_onnx(path: str | Path, src: CamSource, *, layer: str, methods: Sequence[str],
                    batch: int = TRACE_BATCH + 1, tolerance: float = DEFAULT_TOLERANCE,
                    seed: int = 1, redraws: int = 3, threads: Optional[int] = None) -> Verification:
    """Run the graph in onnxruntime on a random batch and compare every output with
    :class:`CamEngine`, in four cases: explicit targets (one of them -1), all -1, no ``target``
    input, and a batch of one. Raises VerificationError when an error exceeds ``tolerance``.

    ``logits`` and ``activations`` are compared with the engine run on the same input;
    ``gradients`` and ``cam`` with the engine run at the graph's activations
    (:func:`pinned_layer_output`); each extra ``cam_<method>`` with that method's function
    (:func:`camserve.methods.get_method`) applied to the graph's activations and gradients (the
    Grad-CAM++ weights divide by sums that can be near zero, which magnifies float32 rounding in
    the gradients beyond any fixed tolerance). The backward pass of a ReLU or max-pool network is
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
    x = torch.randn(batch, 3, *src.input_size, generator=gen)
    engine = CamEngine(src.model, layer, layout=src.layout)  # type: ignore[arg-type]
    names = output_names(methods)
    forward_outputs = ("logits", "activations")

    _, module = resolve_layer(src.model, layer)

    def forward(xb: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """The engine's forward pass (model + a hook on the layer) without its backward."""
        seen: list[torch.Tensor] = []
        handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out.clone()))
        try:
            with torch.inference_mode():
                logits = src.model(xb)
        finally:
            handle.remove()
        acts = to_nchw(seen[0], src.layout or detect_layout(seen[0].shape))  # type: ignore[arg-type]
        return logits.numpy(), acts.numpy()

    def reference(xb: torch.Tensor, targets: Optional[list[int]],
                  got: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        logits, activations = forward(xb)
        ref = {"logits": logits, "activations": activations}
        tg = targets if targets is not None else [int(t) for t in logits.argmax(axis=1)]
        with pinned_layer_output(src.model, layer, torch.from_numpy(got["activations"]), src.layout):
            res = engine(xb, targets=tg, method=methods[0])
        ref.update(gradients=res.gradients.numpy(), cam=res.cams.numpy())
        a, g = torch.from_numpy(got["activations"]), torch.from_numpy(got["gradients"])
        for m in methods[1:]:  # the method's own formula on the graph's activations and gradients
            ref[method_output_name(m)] = get_method(m)(a, g).numpy()
        return ref

    n_cls = len(src.labels) or int(engine.predict(x[:1]).shape[1])
    explicit = np.array([(3 * i + 1) % n_cls for i in range(batch)], dtype=np.int64)
    explicit[-1] = -1
    redrawn = 0
    for attempt in range(redraws + 1):
        cases: dict[str, tuple[torch.Tensor, dict[str, np.ndarray], Optional[np.ndarray]]] = {
            "explicit": (x, {"input": x.numpy(), "target": explicit}, explicit),
            "-1": (x, {"input": x.numpy(), "target": np.full(batch, -1, np.int64)}, None),
            "omitted": (x, {"input": x.numpy()}, None),
            "batch1": (x[:1], {"input": x[:1].numpy()}, None),
        }
        errors: dict[str, dict[str, float]] = {}
        bad: list[str] = []
        kinked: set[int] = set()
        refs: dict[tuple[Any, ...], tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = {}
        top1 = engine.predict(x).argmax(dim=1).numpy()
        for case, (xb, feed, tgt) in cases.items():
            got = dict(zip(names, sess.run(names, feed)))
            targets = None if tgt is None else [int(t) for t in np.where(tgt < 0, top1, tgt)]
            key = (len(xb), None if targets is None else tuple(targets))
            if key in refs and all(np.array_equal(refs[key][0][n], got[n]) for n in names):
                ref = refs[key][1]  # same input, same targets, same outputs: same reference
            else:
                ref = reference(xb, targets, got)
                refs[key] = (got, ref)
            rows = {n: _row_errors(got[n], ref[n]) for n in names}
            errors[case] = {n: float(r.max()) for n, r in rows.items()}
            bad += [f"{case}/{n}={e:.2e}" for n, e in errors[case].items() if not e <= tolerance]
            forward_ok = np.all([rows[n] <= tolerance for n in forward_outputs], axis=0)
            backward_bad = np.any([rows[n] > tolerance for n in names if n not in forward_outputs],
                                  axis=0)
            kinked |= {int(i) for i in np.nonzero(forward_ok & backward_bad)[0]}
        if not bad:
            return Verification(errors, redrawn)
        only_kinks = all(n.split("/", 1)[1].split("=")[0] not in forward_outputs for n in bad)
        if attempt == redraws or not only_kinks or not kinked:
            break
        log.info("verification: rows %s of the draw hit a ReLU/max-pool kink; drawing them again",
                 sorted(kinked))
        fresh = torch.randn(batch, 3, *src.input_size, generator=gen)
        for i in kinked:
            x[i] = fresh[i]
        redrawn += len(kinked)
    raise VerificationError(f"{path}: the ONNX graph does not match the PyTorch engine "
                            f"(relative error > {tolerance:g}): {', '.join(bad)}"
                            + (f" (after redrawing {redrawn} rows)" if redrawn else ""))


# -- command line -----------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m export.onnx_export",
        description="Export a classifier to an ONNX graph that outputs logits, the target layer's "
                    "activations and gradients, and CAMs; then verify it against the PyTorch engine.",
        epilog="Exit status: 0 exported and verified, 1 export or verification failed, 2 usage error.")
    p.add_argument("model_dir", nargs="?", help="model folder with model-config.yaml (or use --arch)")
    p.add_argument("--out", required=True, help="output .onnx file")
    p.add_argument("--arch", help="build this architecture instead of a model folder, e.g. "
                                  "torchvision.models.resnet18 or package.module:Class")
    p.add_argument("--weights", help="state_dict file (default: the folder's, or random init for --arch)")
    p.add_argument("--num-classes", type=int, help="number of classes (--arch)")
    p.add_argument("--input-size", help="H or H,W (--arch; default 224)")
    p.add_argument("--mean", help="3 comma-separated numbers (--arch; default ImageNet)")
    p.add_argument("--std", help="3 comma-separated numbers (--arch; default ImageNet)")
    p.add_argument("--labels", help="index_to_name.json (--arch)")
    p.add_argument("--layer", help="target layer, dotted module name (default: the config's, or "
                                   "auto-located)")
    p.add_argument("--layout", choices=["nchw", "nhwc", "tokens"], help="force the layer output layout")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated CAM methods, the first one is output 'cam' (default: the "
                        f"config's method; known: {', '.join(camserve.available_methods())})")
    p.add_argument("--opset", type=int, default=BASE_OPSET, help=f"ONNX opset (>= {BASE_OPSET})")
    p.add_argument("--exporter", choices=EXPORTERS, default="auto",
                   help="fast (one trace), torch (torch.onnx.export) or auto (fast, then torch)")
    p.add_argument("--optimize", choices=OPTIMIZE_LEVELS, default="basic",
                   help="basic: constant folding and clean-up (default); full: also onnxscript's "
                        "pattern rewrites and fusions (slow on large graphs)")
    p.add_argument("--no-verify", action="store_true", help="skip the comparison with PyTorch")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="max relative error of the verification (default 1e-4)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _floats(text: str, what: str, parser: argparse.ArgumentParser) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        parser.error(f"invalid value for {what}: {text!r} (comma-separated numbers)")
    return vals


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if bool(args.model_dir) == bool(args.arch):
        parser.error("give either MODEL_DIR or --arch (not both)")
    if args.opset < BASE_OPSET:
        parser.error(f"invalid value for --opset: {args.opset} (allowed: {BASE_OPSET} or newer)")
    try:
        if args.arch:
            size: Any = 224
            if args.input_size:
                dims = [int(round(v)) for v in _floats(args.input_size, "--input-size", parser)]
                size = dims[0] if len(dims) == 1 else dims
            src = load_arch(args.arch, weights=args.weights, num_classes=args.num_classes,
                            input_size=size, layer=args.layer, labels=args.labels, layout=args.layout,
                            mean=_floats(args.mean, "--mean", parser) if args.mean else IMAGENET_MEAN,
                            std=_floats(args.std, "--std", parser) if args.std else IMAGENET_STD)
        else:
            for opt in ("num_classes", "input_size", "mean", "std", "labels"):
                if getattr(args, opt) is not None:
                    parser.error(f"--{opt.replace('_', '-')} is for --arch; a model folder's "
                                 f"model-config.yaml sets it")
            src = load_model_dir(args.model_dir, layer=args.layer, weights=args.weights)
            if args.layout:
                src.layout = args.layout
        methods = check_methods(args.methods.split(",") if args.methods else [src.method])
        if src.layer:
            resolve_layer(src.model, src.layer)  # ValueError naming the known children
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        info = export_cam_onnx(src, args.out, methods=methods, opset=args.opset,
                               exporter=args.exporter, optimize=args.optimize,
                               verify=not args.no_verify, tolerance=args.tolerance)
    except VerificationError as exc:
        print(f"error: verification failed: {exc}", file=sys.stderr)
        return 1
    except (ExportError, ValueError) as exc:
        print(f"error: export failed: {exc}", file=sys.stderr)
        return 1
    size_mb = info.path.stat().st_size / 1e6
    print(f"wrote {info.path} ({size_mb:.1f} MB) in {info.seconds:.1f}s: {src.arch}, layer "
          f"{info.layer}, outputs {', '.join(info.outputs)} ({info.exporter} exporter)")
    if info.errors:
        print(f"verified against the PyTorch engine (relative error, tolerance {args.tolerance:g}):")
        width = max(len(n) for n in info.outputs)
        print(f"  {'output':<{width}}  " + "  ".join(f"{c:>9}" for c in info.errors))
        for name in info.outputs:
            print(f"  {name:<{width}}  " + "  ".join(f"{info.errors[c][name]:9.1e}" for c in info.errors))
        if info.redrawn:
            print(f"  ({info.redrawn} input rows were drawn again: their gradients sat on a "
                  f"ReLU/max-pool switch where float32 rounding decides)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

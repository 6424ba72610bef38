"""Export a classifier to an ONNX graph that computes Grad-CAM itself, and verify it: the
``camserve-export`` command.

Owns :func:`export_cam_onnx` (a loaded model -> trace of :class:`camserve.onnx.trace.CamGraph` ->
ONNX with its :class:`camserve.onnx.format.GraphMeta` metadata -> checked and verified against the
engine by :func:`camserve.onnx.verify.verify_cam_onnx`) and the command line. The graph's inputs,
outputs and metadata, the verification rule, the command line and its exit status:
docs/export.md.

Example::

    >>> import tempfile, torch
    >>> from torch import nn
    >>> from camserve.models import ModelSpec, from_module
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ...                     nn.Linear(4, 3)).eval()
    >>> lm = from_module(net, ModelSpec(arch="tiny", target_layer="0", input_size=(16, 16)))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     info = export_cam_onnx(lm, f"{d}/tiny.cam.onnx", methods=("gradcam", "layercam"))
    ...     meta = GraphMeta.from_file(info.path)
    >>> info.outputs, meta.layer, meta.labels
    (['logits', 'activations', 'gradients', 'cam', 'cam_layercam'], '0', ('0', '1', '2'))
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .. import available_methods
from ..methods import get_method
from ..layouts import LAYOUTS
from ..models import (
    ConfigError,
    LoadedModel,
    ModelSpec,
    load_model,
    load_model_dir,
)
from ..tasks import GraphInput, get_task
from .format import QUANTIZE, ExportInfo, GraphMeta, check_methods, needs_gradients
from .quantize import INT8_TOLERANCE, QuantizationError, QuantTolerance, compare_quantized, quantize_graph
from .trace import GRAPH_CHUNK, frozen_parameters, trace_cam_graph, trace_model_graph
from .translate import (
    BASE_OPSET,
    EXPORTERS,
    OPTIMIZE_LEVELS,
    ExportError,
    _translate_fast,
    check_model,
    graph_to_onnx,
    onnx_decompositions,
    save_model,
    timed,
)
from .verify import DEFAULT_FACTOR, DEFAULT_TOLERANCE, TRACE_BATCH, VerificationError, verify_cam_onnx

log = logging.getLogger(__name__)

#: Images the int8 graph is compared with the float graph on.
QUANT_BATCH = 8

__all__ = ["BackwardExportError", "ExportError", "ExportInfo", "QuantizationError", "VerificationError",
           "export_cam_onnx", "export_plain_onnx", "gradient_free_methods", "load_arch", "main"]


class BackwardExportError(ExportError):
    """The model's forward exports but the backward of its CAM graph does not: ``methods`` are
    the gradient-free methods whose graph (no backward) it can have instead
    (``camserve-export ... --gradient-free``)."""

    def __init__(self, message: str, methods: Sequence[str]) -> None:
        self.methods = tuple(methods)
        super().__init__(message)


def gradient_free_methods(loaded: LoadedModel) -> tuple[str, ...]:
    """The methods of a gradient-free graph when none are named (``--gradient-free``): the
    folder's method when it is gradient-free, else EigenCAM (class-agnostic, one projection) and
    ReciproCAM (class-specific, one suffix forward per position; ViT-ReciproCAM for a token
    layer); a per-target graph (a detector's) takes functions of the activations only (EigenCAM,
    KPCA-CAM), as :class:`camserve.onnx.trace.CamGraph` requires."""
    own = str(loaded.spec.method).lower()
    per_target = get_task(loaded.spec.task).graph_per_target
    if own in available_methods(exportable=True, gradients=False) and \
            not (per_target and not get_method(own).pure):
        return (own,)
    if per_target:
        return ("eigencam",)
    tokens = loaded.spec.layout == "tokens" or getattr(loaded, "layout", None) == "tokens" or \
        getattr(getattr(loaded, "reshape", None), "prefix", None) is not None
    return ("eigencam", "vitreciprocam" if tokens else "reciprocam")


def load_arch(arch: str, *, weights: Optional[str | Path] = None, num_classes: Optional[int] = None,
              input_size: int | Sequence[int] = 224, layer: Optional[str] = None,
              mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
              labels: Optional[str | Path] = None, layout: Optional[str] = None,
              calibrate: bool = True) -> LoadedModel:
    """A model without a folder, as the same :class:`~camserve.models.LoadedModel` a folder gives:
    ``arch`` as in a config (``torchvision.models.resnet18``, ``package.module:Class``), a
    state_dict file or random init (then, with ``calibrate``, the BatchNorm statistics are
    recomputed on random input so the logits are not vanishingly small). ``labels``: an
    ``index_to_name.json`` file (default: the class indices). ``mean``/``std`` default to the
    model's own (timm, Hugging Face), else ImageNet's.

    Example::

        >>> lm = load_arch("torchvision.models.resnet18", num_classes=3, input_size=64)
        >>> lm.layer, lm.labels, lm.spec.input_size
        ('layer4', ['0', '1', '2'], (64, 64))
    """
    cfg: dict[str, Any] = {"arch": arch, "input_size": list(input_size) if not isinstance(input_size, int)
                           else input_size}
    for key, value in (("num_classes", num_classes), ("layout", layout), ("target_layer", layer),
                       ("labels", None if labels is None else str(labels)),
                       ("mean", None if mean is None else list(mean)),
                       ("std", None if std is None else list(std))):
        if value is not None:
            cfg[key] = value
    spec = ModelSpec.from_config(cfg)
    loaded = load_model(spec, Path.cwd(), weights=weights, calibrate=calibrate)
    if labels is None:  # no folder: an index_to_name.json in the working folder is not this model's
        loaded = dataclasses.replace(loaded, labels=[str(i) for i in range(loaded.num_classes)])
    return loaded


# -- export -----------------------------------------------------------------------------------------

def _set_defaults(model: Any, inputs: Sequence[GraphInput]) -> None:
    """Make the optional target inputs optional: each becomes an initializer of shape (1, ...)
    holding its default that is also a graph input (ORT uses it when the input is not fed), with
    dimension names of its own so that (1, ...) is accepted (``target``: ``target_batch``)."""
    import onnx_ir as ir

    for g in inputs:
        if not g.optional:
            continue
        value = next(v for v in model.graph.inputs if v.name == g.name)
        dims = [f"{g.name}_batch"] + [f"{g.name}_{i + 1}" for i in range(len(g.shape))]
        value.shape = ir.Shape(dims)
        default = np.full((1,) * (1 + len(g.shape)), g.default,
                          dtype=np.int64 if g.dtype == torch.int64 else np.float32)
        value.const_value = ir.tensor(default, name=g.name)
        model.graph.register_initializer(value)
    _forget_shapes_after(model, [g.name for g in inputs if g.optional])


def _forget_shapes_after(model: Any, names: Sequence[str]) -> None:
    """Drop the recorded shapes of the intermediate values computed from the inputs ``names``:
    the trace gave them the images' batch dimension, which a (1, ...) input does not have
    (onnxruntime would reuse a buffer of the wrong size); onnxruntime infers them again."""
    import onnx_ir as ir

    outputs = {id(v) for v in model.graph.outputs}
    seen = {id(v) for v in model.graph.inputs if v.name in names}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if any(v is not None and id(v) in seen for v in node.inputs):
            for v in node.outputs:
                seen.add(id(v))
                if id(v) not in outputs:
                    v.shape = None


def export_cam_onnx(loaded: LoadedModel, out: str | Path, *, methods: Sequence[str] = ("gradcam",),
                    opset: int = BASE_OPSET, exporter: str = "auto", optimize: str = "basic",
                    verify: bool = True, tolerance: float = DEFAULT_TOLERANCE,
                    factor: float = DEFAULT_FACTOR, seed: int = 0, threads: Optional[int] = None,
                    chunk: int = GRAPH_CHUNK, quantize: Optional[str] = None,
                    quant_tolerance: QuantTolerance = INT8_TOLERANCE) -> ExportInfo:
    """Trace, translate, check and save the CAM graph of ``loaded`` (at ``loaded.layer``) to
    ``out``, with its :class:`~camserve.onnx.format.GraphMeta` as metadata; with ``verify`` also
    compare it with :class:`camserve.CamEngine` (:func:`~camserve.onnx.verify.verify_cam_onnx`,
    raising VerificationError; ``threads``: onnxruntime intra-op threads for it).

    Gradient-free ``methods`` only give a graph without a backward. ``chunk``: positions per
    suffix run of a ReciproCAM. ``quantize="int8"`` (gradient-free graphs): the verified float
    graph is quantised (:func:`camserve.onnx.quantize.quantize_graph`) and, with ``verify``,
    compared with it within ``quant_tolerance`` (QuantizationError otherwise). A gradient graph
    whose backward does not export while the forward does raises :class:`BackwardExportError`
    naming the gradient-free methods to export instead."""
    if opset < BASE_OPSET:
        raise ValueError(f"invalid value for opset: {opset} (allowed: {BASE_OPSET} or newer)")
    methods = check_methods(methods)
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"invalid value for quantize: {str(quantize)[:40]!r} (allowed: "
                         f"{', '.join(QUANTIZE)})")
    if quantize is not None and needs_gradients(methods):
        raise ValueError(f"invalid value for quantize: {quantize} graphs are gradient-free, and "
                         f"{', '.join(m for m in methods if get_method(m).gradients)} need gradients "
                         f"(graph methods without: {', '.join(available_methods(exportable=True, gradients=False))})")
    if quantize is not None:
        final = Path(out)
        with tempfile.TemporaryDirectory(prefix="camserve-export-") as tmp:
            info = export_cam_onnx(loaded, Path(tmp) / final.name, methods=methods, opset=opset,
                                   exporter=exporter, optimize=optimize, verify=verify,
                                   tolerance=tolerance, factor=factor, seed=seed, threads=threads,
                                   chunk=chunk)
            t0 = time.perf_counter()
            with timed(info.timings, "quantize"):
                final.parent.mkdir(parents=True, exist_ok=True)
                quantize_graph(info.path, final)
            if verify:
                with timed(info.timings, "verify_int8"):
                    gen = torch.Generator().manual_seed(seed + 2)
                    x = torch.randn(QUANT_BATCH, 3, *loaded.spec.input_size, generator=gen).numpy()
                    info.quantized = compare_quantized(info.path, final, x, threads=threads)
                bad = info.quantized.failures(quant_tolerance)
                if bad:
                    raise QuantizationError(f"{final}: the int8 graph differs from the float graph "
                                            f"beyond the tolerance: {'; '.join(bad)}")
        info.path, info.quantize = final, quantize
        info.seconds += time.perf_counter() - t0
        return info
    meta = GraphMeta.from_loaded(loaded, methods)
    if meta.task.graph_per_target:
        from .detectors import export_detector_onnx, traceable_with_gradients

        if not traceable_with_gradients(loaded.model):  # NMS/RoIAlign decoding: gradient-free
            return export_detector_onnx(loaded, out, methods=methods, verify=verify,
                                        tolerance=tolerance, seed=seed, threads=threads)
    spec, layer = meta.spec, meta.layer
    reshape = loaded.reshape if layer == loaded.layer else None
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    example = torch.randn(TRACE_BATCH, 3, *spec.input_size, generator=gen)
    task, inputs, outputs = meta.task, meta.inputs, meta.output_names

    def trace(onnx_ready: bool) -> torch.fx.GraphModule:
        return trace_cam_graph(loaded.model, layer, example, methods, layout=spec.layout,  # type: ignore[arg-type]
                               reshape=reshape, decompositions=onnx_decompositions() if onnx_ready else None,
                               functional=onnx_ready, task=task, chunk=chunk)

    timings: dict[str, float] = {}
    try:
        model, used = graph_to_onnx(trace, (example, *(g.fill(TRACE_BATCH) for g in inputs)),
                                    meta.input_names, outputs, exporter=exporter, optimize=optimize,
                                    opset=opset, timings=timings)
    except ExportError as exc:
        if meta.gradients and _forward_exports(loaded.model, example, task):
            free = gradient_free_methods(loaded)
            raise BackwardExportError(
                f"the backward of the CAM graph does not export ({exc}); the forward does, so a "
                f"gradient-free graph (no backward; methods {', '.join(free)}) can be exported "
                f"instead (--gradient-free, or gradient-free --methods)", free) from exc
        raise
    _set_defaults(model, inputs)
    model.metadata_props.update(meta.to_props())
    model.doc_string = (f"camserve CAM graph ({spec.task}): {spec.arch}, layer {layer}, methods "
                        f"{', '.join(methods)}. Inputs: input float32 (N,3,{spec.input_size[0]},"
                        f"{spec.input_size[1]}); " + "; ".join(f"{g.name} {g.doc}" for g in inputs)
                        + f". Outputs: {', '.join(outputs)}.")
    with timed(timings, "save"):
        out = save_model(model, out)
    with timed(timings, "check"):
        check_model(out)
    info = ExportInfo(path=out, layer=layer, methods=methods, outputs=outputs, exporter=used,
                      seconds=time.perf_counter() - t0, timings=timings, gradients=meta.gradients)
    log.info("exported %s (layer %s, %s exporter) in %.1fs", out, layer, used, info.seconds)
    if verify:
        with timed(timings, "verify"):
            checked = verify_cam_onnx(out, loaded, layer=layer, methods=methods,
                                      tolerance=tolerance, factor=factor, seed=seed + 1,
                                      threads=threads)
        info.errors, info.redrawn, info.baseline = checked.errors, checked.redrawn, checked.baseline
    return info


def _forward_exports(model: nn.Module, example: torch.Tensor, task: Any) -> bool:
    """Whether the plain forward of ``model`` traces and translates (the fast path, no
    optimisation): tells a failing backward from a failing forward."""
    try:
        with frozen_parameters(model):
            gm = trace_model_graph(model, example, decompositions=onnx_decompositions(), task=task)
        _translate_fast(gm, ("input",), (task.graph_output,))
    except Exception as exc:  # any failure means: the forward does not export either
        log.info("the forward does not export either: %s: %s", type(exc).__name__,
                 str(exc).splitlines()[0] if str(exc) else "")
        return False
    return True


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
    path = save_model(onnx_model, out)
    check_model(path)
    return path


# -- command line -----------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="camserve-export",
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
    p.add_argument("--layout", choices=LAYOUTS, help="force the layer output layout")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated CAM methods, the first one is output 'cam' (default: the "
                        f"config's method; known: {', '.join(available_methods())})")
    p.add_argument("--gradient-free", action="store_true",
                   help="a graph without backward (no gradients output), for models whose backward "
                        "does not export and for int8: gradient-free methods only (default: the "
                        "config's method if gradient-free, else eigencam and reciprocam; "
                        f"known: {', '.join(available_methods(exportable=True, gradients=False))})")
    p.add_argument("--quantize", choices=QUANTIZE, default=None,
                   help="int8: onnxruntime dynamic quantisation of a gradient-free graph, checked "
                        "against the float graph (docs/export.md)")
    p.add_argument("--chunk", type=int, default=GRAPH_CHUNK,
                   help=f"positions per suffix run of ReciproCAM in the graph (each run holds "
                        f"batch x chunk copies of the layer output; default {GRAPH_CHUNK})")
    p.add_argument("--opset", type=int, default=BASE_OPSET, help=f"ONNX opset (>= {BASE_OPSET})")
    p.add_argument("--exporter", choices=EXPORTERS, default="auto",
                   help="fast (one trace), torch (torch.onnx.export) or auto (fast, then torch)")
    p.add_argument("--optimize", choices=OPTIMIZE_LEVELS, default="basic",
                   help="basic: constant folding and clean-up (default); full: also onnxscript's "
                        "pattern rewrites and fusions (slow on large graphs)")
    p.add_argument("--no-verify", action="store_true", help="skip the comparison with PyTorch")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help=f"relative error vs float64 PyTorch always allowed (default {DEFAULT_TOLERANCE:g})")
    p.add_argument("--factor", type=float, default=DEFAULT_FACTOR,
                   help=f"or up to this many times PyTorch float32's own error vs float64 "
                        f"(default {DEFAULT_FACTOR:g}; 0: the tolerance alone)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _floats(text: str, what: str, parser: argparse.ArgumentParser) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        parser.error(f"invalid value for {what}: {text!r} (comma-separated numbers)")
    return vals


def _load(args: argparse.Namespace, parser: argparse.ArgumentParser) -> LoadedModel:
    """The model the command line names: a folder (:func:`camserve.models.load_model_dir`, with
    ``--layer``/``--layout`` as overrides) or ``--arch`` (:func:`load_arch`)."""
    if args.arch:
        size: Any = 224
        if args.input_size:
            dims = [int(round(v)) for v in _floats(args.input_size, "--input-size", parser)]
            size = dims[0] if len(dims) == 1 else dims
        return load_arch(args.arch, weights=args.weights, num_classes=args.num_classes,
                         input_size=size, layer=args.layer, labels=args.labels, layout=args.layout,
                         mean=_floats(args.mean, "--mean", parser) if args.mean else None,
                         std=_floats(args.std, "--std", parser) if args.std else None)
    for opt in ("num_classes", "input_size", "mean", "std", "labels"):
        if getattr(args, opt) is not None:
            parser.error(f"--{opt.replace('_', '-')} is for --arch; a model folder's "
                         f"model-config.yaml sets it")
    return load_model_dir(args.model_dir, weights=args.weights,
                          overrides={"target_layer": args.layer, "layout": args.layout})


def _report(info: ExportInfo, arch: str, tolerance: float, factor: float = DEFAULT_FACTOR) -> None:
    """What was written, and the verification table."""
    size_mb = info.path.stat().st_size / 1e6
    kind = ("gradient" if info.gradients else "gradient-free") + \
        (f", {info.quantize}" if info.quantize else "")
    print(f"wrote {info.path} ({size_mb:.1f} MB) in {info.seconds:.1f}s: {arch}, layer "
          f"{info.layer}, {kind} graph, outputs {', '.join(info.outputs)} ({info.exporter} exporter)")
    if info.errors:
        print(f"verified against the PyTorch engine in float64 (relative error of the graph / of "
              f"PyTorch float32; allowed: {tolerance:g} or {factor:g} x PyTorch float32's):")
        width = max(len(n) for n in info.outputs)
        print(f"  {'output':<{width}}  " + "  ".join(f"{c:>17}" for c in info.errors))
        for name in info.outputs:
            print(f"  {name:<{width}}  " + "  ".join(
                f"{info.errors[c][name]:8.1e}/{info.baseline.get(c, {}).get(name, float('nan')):8.1e}"
                for c in info.errors))
        if info.redrawn:
            print(f"  ({info.redrawn} input rows were drawn again: their gradients sat on a "
                  f"ReLU/max-pool switch where float32 rounding decides)")
    if info.quantized is not None:
        q = info.quantized
        print(f"{info.quantize} graph against the float graph: top-1 agreement {q.top1:.3f}; "
              + "; ".join(f"{n}: correlation {q.correlation[n]:.4f}, normalised abs error "
                          f"{q.abs_error[n]:.3f}" for n in q.correlation))


def gradient_free_command(argv: Sequence[str]) -> str:
    """The command line ``argv`` with its ``--methods`` replaced by ``--gradient-free``: what the
    exporter proposes when the backward does not export.

    Example::

        >>> gradient_free_command(["m", "--out", "a b.onnx", "--methods=gradcam", "--methods", "x"])
        "camserve-export m --out 'a b.onnx' --gradient-free"
    """
    import shlex

    kept: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--methods":
            skip = True
        elif not a.startswith("--methods=") and a != "--gradient-free":
            kept.append(a)
    return shlex.join(["camserve-export", *kept, "--gradient-free"])


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
    if not 1 <= args.chunk <= 1 << 16:
        parser.error(f"invalid value for --chunk: {args.chunk} (allowed: 1..{1 << 16})")
    try:
        loaded = _load(args, parser)
        if args.methods:
            methods = check_methods(args.methods.split(","))
        elif args.gradient_free or args.quantize:
            methods = gradient_free_methods(loaded)
        else:
            methods = check_methods([loaded.spec.method])
        if args.gradient_free and needs_gradients(methods):
            raise ValueError(f"invalid value for --methods: --gradient-free takes gradient-free "
                             f"methods, and {', '.join(m for m in methods if get_method(m).gradients)} "
                             f"need gradients (allowed: "
                             f"{', '.join(available_methods(exportable=True, gradients=False))})")
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        info = export_cam_onnx(loaded, args.out, methods=methods, opset=args.opset,
                               exporter=args.exporter, optimize=args.optimize,
                               verify=not args.no_verify, tolerance=args.tolerance,
                               factor=args.factor, chunk=args.chunk, quantize=args.quantize)
    except BackwardExportError as exc:
        print(f"error: export failed: {exc}\n  export the gradient-free graph with:\n  "
              f"{gradient_free_command(sys.argv[1:] if argv is None else argv)}", file=sys.stderr)
        return 1
    except VerificationError as exc:
        print(f"error: verification failed: {exc}", file=sys.stderr)
        return 1
    except (ExportError, ValueError) as exc:
        print(f"error: export failed: {exc}", file=sys.stderr)
        return 1
    _report(info, loaded.spec.arch, args.tolerance, args.factor)
    return 0

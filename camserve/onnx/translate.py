"""FX graph -> ONNX model: the one module of camserve that uses ``torch.onnx``'s internals.

The trace (``make_fx`` with only the batch dimension symbolic) already applies the ONNX exporter's
decompositions (:func:`onnx_decompositions`) and camserve's backward decompositions, so the
translation to ONNX runs once over that graph (the "fast" exporter, a few seconds per model,
through ``torch.onnx._internal.exporter``, which the pinned torch version provides). ``torch``
instead hands the traced graph to the public ``torch.onnx.export(..., dynamo=True)``, which traces
it twice more; ``auto`` uses the fast path and falls back to ``torch.onnx.export`` if it fails
(:func:`graph_to_onnx`). Then the graph is optimised and converted to the asked opset, saved
(:func:`save_model`) and checked (:func:`check_model`).

Example::

    >>> import torch
    >>> from camserve.onnx.trace import trace_model_graph
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Flatten()).eval()
    >>> ex = torch.rand(2, 3, 4, 4)
    >>> model, used = graph_to_onnx(
    ...     lambda ready: trace_model_graph(net, ex, decompositions=onnx_decompositions() if ready
    ...                                     else None, functional=ready),
    ...     (ex,), ("input",), ("logits",), exporter="fast")
    >>> used, [v.name for v in model.graph.outputs]
    ('fast', ['logits'])
"""
from __future__ import annotations

import copy
import functools
import logging
import re
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

from .. import __version__
from .format import BATCH_DIM
from .passes import lift_constants, numel_from_sizes

log = logging.getLogger(__name__)

#: The opset the ONNX translation emits; other opsets (>= 18) go through onnxscript's converter.
BASE_OPSET = 18
EXPORTERS: tuple[str, ...] = ("auto", "fast", "torch")
OPTIMIZE_LEVELS: tuple[str, ...] = ("basic", "full")


class ExportError(RuntimeError):
    """The model could not be exported to ONNX."""


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
    numel_from_sizes(gm)
    _fx_passes.insert_type_promotion_nodes(gm)
    gm = _fx_passes.remove_assertion_nodes(gm)
    for node in gm.graph.nodes:  # no module scopes in a make_fx graph; say so (else a warning per node)
        node.meta.setdefault("nn_module_stack", {})
    model = ir.Model(graph=ir.Graph([], [], nodes=[], name="main_graph"), ir_version=10,
                     producer_name="camserve", producer_version=__version__)
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
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Add the seconds the block takes to ``timings[key]``."""
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
            with timed(timings, "trace"):
                gm = gm_factory(True)
            with timed(timings, "translate"):
                model = _translate_fast(gm, input_names, outputs)
            used = "fast"
        except Exception as exc:
            if exporter == "fast":
                raise ExportError(f"fast ONNX translation failed: {type(exc).__name__}: {exc}") from exc
            log.warning("fast ONNX translation failed (%s: %s); retrying with torch.onnx.export",
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
    if model is None:
        try:
            with timed(timings, "trace"):
                gm = gm_factory(False)
            with timed(timings, "translate"):
                model = _translate_torch(gm, args, input_names, outputs)
            used = "torch"
        except Exception as exc:
            raise ExportError(f"torch.onnx.export failed: {type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}") from exc
    _rename_dims(model, BATCH_DIM)
    with timed(timings, "optimize"):
        model = _finish(model, optimize=optimize, opset=opset)
    return model, used


def save_model(model: Any, out: str | Path) -> Path:
    """Save an ``onnx_ir.Model`` (weights in a side file beyond protobuf's 2 GB limit)."""
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


def check_model(path: Path) -> None:
    """``onnx.checker.check_model(full_check=True)``; :class:`ExportError` when it refuses."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{path}: onnx.checker rejected the graph: {exc}") from None

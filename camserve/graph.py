"""The whole CAM computation as one traceable module, and its trace to a static FX graph.

:class:`CamGraph` runs the very code the engine runs — :class:`~camserve.engine.CamEngine`'s forward
hook on the target layer, ``torch.autograd.grad`` of the selected logit to that layer's output, the
layout reshape of :func:`camserve.layers.to_nchw`, and the pure CAM functions of
:mod:`camserve.methods` — but with the target class as a tensor input: ``target < 0`` selects each
row's top-1 class inside the computation, so nothing data-dependent happens in Python.

:func:`trace_cam_graph` turns it into an FX graph of ATen operations with ``make_fx`` and a
symbolic batch size: the backward pass is recorded as ordinary operations, so the graph (and an
ONNX graph exported from it) computes logits, activations, exact gradients and CAMs in one run.
What it takes for every operation to have a functional, exportable form:

* backward operations without an ONNX translation are decomposed during the trace
  (:func:`backward_decompositions`): ``convolution_backward`` (input gradient) is the transposed
  convolution with the same weight, stride, padding, dilation and groups and the
  ``output_padding`` that restores the input size; ``_adaptive_avg_pool2d_backward`` and
  ``avg_pool2d_backward`` use that average pooling is separable, ``y = P_h x P_w^T`` with
  row-stochastic pooling matrices built from the static spatial size, so the gradient is
  ``P_h^T g P_w``; the others use :mod:`torch._decomp`'s decompositions;
* module outputs are made contiguous during the trace (strides mean nothing in ONNX, and a
  channels-last view reaching a 1×1 adaptive pool would otherwise restride in place);
* attention runs as matmul + softmax (the fused CPU kernel's backward has no translation);
* in-place operations are rewritten out of place afterwards (:func:`functionalize_inplace`), and
  :func:`lift_constants` turns the weights into graph inputs for an exporter to store.

Example::

    >>> import torch, torchvision
    >>> m = torchvision.models.resnet18(num_classes=10).eval()
    >>> gm = trace_cam_graph(m, "layer3", torch.rand(2, 3, 64, 64), methods=("gradcam",))
    >>> logits, acts, grads, cam = gm(torch.rand(3, 3, 64, 64), torch.tensor([-1, 2, 5]))
    >>> cam.shape
    torch.Size([3, 4, 4])
"""
from __future__ import annotations

import logging
import math
import operator
import re
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .engine import CamEngine
from .layers import Layout, LayerSpec, Reshape, locate_layer
from .methods import available_methods, get_method

log = logging.getLogger(__name__)

aten = torch.ops.aten

#: Names of the fixed outputs of a CAM graph, in order; ``cam_<method>`` outputs follow.
BASE_OUTPUTS: tuple[str, ...] = ("logits", "activations", "gradients", "cam")


def method_output_name(method: str) -> str:
    """Graph output name for an extra CAM method: ``cam_`` + the method name with ``+`` spelled
    ``p`` and any other character outside ``[A-Za-z0-9_]`` dropped (``gradcam++`` ->
    ``cam_gradcampp``)."""
    name = str(method).lower().replace("+", "p")
    return "cam_" + re.sub(r"[^a-z0-9_]", "", name)


def output_names(methods: Sequence[str]) -> list[str]:
    """Output names of a CAM graph for ``methods`` (the first one is ``cam``)."""
    return list(BASE_OUTPUTS) + [method_output_name(m) for m in methods[1:]]


def check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    """Validate and normalise a method list (lower case, no repeats, at least one)."""
    out: list[str] = []
    for m in methods:
        key = str(m).strip().lower()
        if not key:
            continue
        get_method(key)  # ValueError naming the known methods
        if key not in out:
            out.append(key)
    if not out:
        raise ValueError(f"invalid value for methods: {list(methods)!r} is empty "
                         f"(known: {', '.join(available_methods())})")
    names = [method_output_name(m) for m in out]
    if len(set(names)) != len(names):
        raise ValueError(f"invalid value for methods: {out!r} map to clashing output names {names}")
    return tuple(out)


class CamGraph(nn.Module):
    """``forward(x, target) -> (logits, activations, gradients, cam, *cams)``.

    ``x`` (N, 3, H, W); ``target`` (N,) int64, a class index per row, or a negative value for the
    row's top-1 class (``target`` may also be (1,), broadcast to every row). ``activations`` and
    ``gradients`` (d logit[target] / d activations) are NCHW; ``cam`` is ``methods[0]``'s map
    (N, h, w), raw (post-ReLU, not normalised), and one more map follows per extra method.

    The engine's own hook and layout code run here (see the module docstring); the module holds the
    model as a submodule and never changes it.
    """

    def __init__(self, model: nn.Module, target_layer: LayerSpec, methods: Sequence[str] = ("gradcam",),
                 *, layout: Optional[Layout] = None, reshape: Optional[Reshape] = None) -> None:
        super().__init__()
        if target_layer is None:
            raise ValueError("invalid value for target_layer: None (resolve it first, e.g. with "
                             "camserve.layers.locate_layer)")
        self.model = model
        self._engine = CamEngine(model, target_layer, layout=layout, reshape=reshape)
        self.methods = check_methods(methods)
        self._fns = [get_method(m) for m in self.methods]

    @property
    def layer_name(self) -> str:
        """Dotted name of the target layer."""
        return self._engine.layer_name or ""

    @property
    def output_names(self) -> list[str]:
        """Names of the outputs, in order."""
        return output_names(self.methods)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with _contiguous_outputs(self.model):
            acts, logits = self._engine._forward_with_hook(x)
        a = acts[0]
        top1 = logits.detach().argmax(dim=1)
        t = torch.where(target < 0, top1, target.to(top1.dtype))
        score = logits.gather(1, t[:, None]).sum()
        (g,) = torch.autograd.grad(score, a)
        A = self._engine._to_nchw(a.detach())
        G = self._engine._to_nchw(g)
        cams = [fn(A, G) for fn in self._fns]
        return (logits.detach(), A, G, *cams)


@contextmanager
def _contiguous_outputs(model: nn.Module) -> Iterator[None]:
    """Inside the block every submodule's tensor output is made contiguous.

    Values do not change, only strides — which ONNX does not have. It keeps channels-last views
    (ConvNeXt and Swin blocks permute) from reaching operations such as a 1×1 adaptive average
    pool, which then restrides its output in place (``as_strided_``) and whose backward writes
    through a strided view: operations with no functional ONNX form.
    """
    def hook(_mod: nn.Module, _inp: Any, out: Any) -> Any:
        if isinstance(out, torch.Tensor) and not out.is_contiguous():
            return out.contiguous()
        return None

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# -- decompositions of backward operations that have no ONNX translation ---------------------------

def _conv_input_grad(grad_output: torch.Tensor, input: torch.Tensor, weight: torch.Tensor,
                     bias_sizes: Any, stride: Sequence[int], padding: Sequence[int],
                     dilation: Sequence[int], transposed: bool, output_padding: Sequence[int],
                     groups: int, output_mask: Sequence[bool]) -> Any:
    """``convolution_backward`` for the input gradient: the adjoint of a convolution is the
    transposed convolution with the same weight (and vice versa)."""
    if output_mask[1] or output_mask[2]:
        return NotImplemented  # parameter gradients: keep the original op (never needed for CAMs)
    if not output_mask[0]:
        return (None, None, None)
    n = weight.dim() - 2
    if transposed:
        gi = aten.convolution.default(grad_output, weight, None, stride, padding, dilation, False,
                                      [0] * n, groups)
    else:
        k = weight.shape[2:]
        out_pad = [input.shape[2 + d] - ((grad_output.shape[2 + d] - 1) * stride[d] - 2 * padding[d]
                                         + dilation[d] * (k[d] - 1) + 1) for d in range(n)]
        gi = aten.convolution.default(grad_output, weight, None, stride, padding, dilation, True,
                                      out_pad, groups)
    return (gi, None, None)


def _static(v: Any) -> int:
    """A size as a Python int (specialising a symbolic size: spatial sizes are static in export)."""
    from torch.fx.experimental.symbolic_shapes import guard_int

    return int(guard_int(v))


def _pool_matrix(size_in: int, size_out: int, windows: Sequence[tuple[int, int, float]],
                 like: torch.Tensor) -> torch.Tensor:
    """(size_out, size_in) matrix with ``1/div`` on each output row's window ``[start, end)``.

    Built in numpy from static sizes, so a trace records one constant rather than the ops that
    fill it."""
    m = np.zeros((size_out, size_in), dtype=np.float64)
    for i, (s, e, div) in enumerate(windows):
        if e > s:
            m[i, s:e] = 1.0 / div
    return torch.tensor(m, dtype=like.dtype, device=like.device)


def _separable_pool_grad(grad_output: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``P_h^T g P_w`` over the last two dimensions."""
    return torch.matmul(torch.matmul(rows.t(), grad_output), cols)


def _adaptive_windows(n_in: int, n_out: int) -> list[tuple[int, int, float]]:
    """Adaptive pooling windows: ``[floor(i*n/m), ceil((i+1)*n/m))``, divided by their length."""
    out = []
    for i in range(n_out):
        s = (i * n_in) // n_out
        e = -((-(i + 1) * n_in) // n_out)
        out.append((s, e, float(e - s)))
    return out


def _adaptive_avg_pool2d_grad(grad_output: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """``_adaptive_avg_pool2d_backward`` via the separable pooling matrices."""
    h, w = _static(input.shape[-2]), _static(input.shape[-1])
    oh, ow = _static(grad_output.shape[-2]), _static(grad_output.shape[-1])
    rows = _pool_matrix(h, oh, _adaptive_windows(h, oh), grad_output)
    cols = _pool_matrix(w, ow, _adaptive_windows(w, ow), grad_output)
    return _separable_pool_grad(grad_output, rows, cols)


def _avg_windows(n_in: int, n_out: int, k: int, s: int, p: int, count_include_pad: bool,
                 override: Optional[float]) -> list[tuple[int, int, float]]:
    """Per output index: the window ``[start, end)`` clipped to the input, and its divisor (the
    window length within the padded input, or within the input, or ``override``)."""
    out = []
    for i in range(n_out):
        start = i * s - p
        end = min(start + k, n_in + p)
        padded_len = end - start
        start_c, end_c = max(start, 0), min(end, n_in)
        if override is not None:
            div = float(override)
        else:
            div = float(padded_len if count_include_pad else end_c - start_c)
        out.append((start_c, end_c, div))
    return out


def _avg_pool2d_grad(grad_output: torch.Tensor, input: torch.Tensor, kernel_size: Sequence[int],
                     stride: Sequence[int], padding: Sequence[int], ceil_mode: bool,
                     count_include_pad: bool, divisor_override: Optional[int]) -> Any:
    """``avg_pool2d_backward`` via the separable pooling matrices (the divisor of a window is a
    product of a row and a column length, so it factorises as well; ``divisor_override`` is split
    as ``sqrt(d) * sqrt(d)``)."""
    kh, kw = (list(kernel_size) * 2)[:2] if len(kernel_size) == 1 else kernel_size
    st = list(stride) or [kh, kw]
    sh, sw = (st * 2)[:2] if len(st) == 1 else st
    ph, pw = (list(padding) * 2)[:2] if len(padding) == 1 else padding
    h, w = _static(input.shape[-2]), _static(input.shape[-1])
    oh, ow = _static(grad_output.shape[-2]), _static(grad_output.shape[-1])
    ov = None if divisor_override is None else math.sqrt(divisor_override)
    rows = _pool_matrix(h, oh, _avg_windows(h, oh, kh, sh, ph, count_include_pad, ov), grad_output)
    cols = _pool_matrix(w, ow, _avg_windows(w, ow, kw, sw, pw, count_include_pad, ov), grad_output)
    return _separable_pool_grad(grad_output, rows, cols)


def backward_decompositions() -> dict[Any, Callable[..., Any]]:
    """Decomposition table for :func:`make_fx` that leaves no backward operation without an ONNX
    translation: PyTorch's own backward decompositions plus the ones of this module."""
    from torch._decomp import core_aten_decompositions, get_decompositions

    table = {op: fn for op, fn in core_aten_decompositions().items() if "backward" in str(op)}
    table.update(get_decompositions([aten.max_pool2d_with_indices_backward, aten.as_strided_scatter,
                                     aten.slice_scatter, aten.select_scatter,
                                     aten.diagonal_scatter]))
    table[aten.convolution_backward.default] = _conv_input_grad
    table[aten._adaptive_avg_pool2d_backward.default] = _adaptive_avg_pool2d_grad
    table[aten.avg_pool2d_backward.default] = _avg_pool2d_grad
    return table


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Parameters do not require grad inside the block (restored after, even on error)."""
    flipped = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in flipped:
            p.requires_grad_(False)
        yield
    finally:
        for p in flipped:
            p.requires_grad_(True)


def _trace_batch_dynamic(fn: Callable[..., Any], decomps: Mapping[Any, Callable[..., Any]],
                         example: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.fx.GraphModule:
    """make_fx of ``fn(x)`` or ``fn(x, target)`` with a symbolic batch size; H, W, C static.

    First with an unbacked batch size: sound (nothing may depend on its value) and fast. Some
    models ask questions about the batch size that an unbacked size cannot answer (``batch > 1``
    in a contiguity check, a slice bound in ViT); they are traced again with a backed symbolic
    batch size, whose answers are taken from the example (batch 2) — the exporter then verifies
    the graph at other batch sizes, including 1. (``make_fx(tracing_mode="symbolic")`` would make
    H and W symbolic too, and its symbolic algebra takes minutes on ConvNeXt or Swin.)
    """
    from torch._dispatch.python import enable_python_dispatcher
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.dynamic_spec import ShapesSpec, ShapeVar, TensorSpec
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import (
        DimDynamic,
        GuardOnDataDependentSymNode,
        ShapeEnv,
        StatelessSymbolicContext,
    )

    batch = ShapeVar("batch", min=1, optimization_hint=int(example.shape[0]))
    specs: dict[str, Any] = {"x": TensorSpec([batch] + [None] * (example.dim() - 1))}
    args: tuple[torch.Tensor, ...] = (example,)
    if target is not None:
        specs["target"] = TensorSpec([batch])
        args = (example, target)
    with enable_python_dispatcher():  # decompositions written with torch._refs need it for SymInts
        try:
            return make_fx(fn, decomposition_table=dict(decomps), tracing_mode="fake",
                           _allow_non_fake_inputs=True, dynamic_shapes=ShapesSpec(specs))(*args)
        except GuardOnDataDependentSymNode as exc:
            log.info("camserve: the model branches on the batch size (%s); tracing with a backed "
                     "symbolic batch size instead", str(exc).splitlines()[0])
        mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
        dyn = [DimDynamic.DYNAMIC] + [DimDynamic.STATIC] * (example.dim() - 1)
        fake_x = mode.from_tensor(example, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dyn))
        fake_args: tuple[torch.Tensor, ...] = (fake_x,)
        if target is not None:
            with mode:  # the same batch symbol as x
                fake_args = (fake_x, torch.full((fake_x.shape[0],), -1, dtype=target.dtype))
        return make_fx(fn, decomposition_table=dict(decomps), tracing_mode="fake",
                       _allow_non_fake_inputs=True)(*fake_args)


def trace_model_graph(model: nn.Module, example: torch.Tensor, *,
                      decompositions: Optional[Mapping[Any, Callable[..., Any]]] = None,
                      functional: bool = True) -> torch.fx.GraphModule:
    """The plain forward ``x -> logits`` traced like :func:`trace_cam_graph` (same decompositions,
    symbolic batch): the baseline a CAM graph is compared with."""
    if model.training:
        raise ValueError("invalid value for model: it is in training mode; call model.eval() first")

    def forward_fn(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    gm = _trace_batch_dynamic(forward_fn, dict(decompositions or {}), example)
    if functional:
        functionalize_inplace(gm)
    return gm


def trace_cam_graph(model: nn.Module, target_layer: LayerSpec, example: torch.Tensor,
                    methods: Sequence[str] = ("gradcam",), *, layout: Optional[Layout] = None,
                    reshape: Optional[Reshape] = None,
                    decompositions: Optional[Mapping[Any, Callable[..., Any]]] = None,
                    functional: bool = True) -> torch.fx.GraphModule:
    """Trace :class:`CamGraph` into an FX graph of ATen operations with a symbolic batch size.

    ``model`` must be in eval mode (rows of a batch independent). Parameters and buffers become
    constants of the graph (``get_attr`` nodes); see :func:`lift_constants`. ``target_layer=None``
    auto-locates the layer on ``example``. ``decompositions`` are applied on top of
    :func:`backward_decompositions` (e.g. an exporter's table of operations it cannot translate).
    ``functional=True`` rewrites in-place operations out of place (:func:`functionalize_inplace`).
    The graph's ``meta["camserve"]`` holds the layer name, the methods and the output names.
    """
    if model.training:
        raise ValueError("invalid value for model: it is in training mode; call model.eval() first "
                         "(a CAM graph needs rows of a batch to be independent)")
    if not isinstance(example, torch.Tensor) or example.dim() != 4:
        raise ValueError("invalid value for example: expected a (N, C, H, W) tensor")
    if example.shape[0] < 2:
        raise ValueError("invalid value for example: use a batch of 2 or more so that the batch "
                         "size stays symbolic")
    if target_layer is None:
        target_layer = locate_layer(model, example)
    cg = CamGraph(model, target_layer, methods, layout=layout, reshape=reshape)
    target = torch.full((example.shape[0],), -1, dtype=torch.long)
    table: dict[Any, Callable[..., Any]] = dict(decompositions or {})
    table.update(backward_decompositions())

    def cam_fn(x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return cg(x, target)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    # attention as matmul + softmax: the fused CPU kernel's backward has no ONNX translation
    with frozen_parameters(model), sdpa_kernel(SDPBackend.MATH):
        gm = _trace_batch_dynamic(cam_fn, table, example, target)
    if functional:
        functionalize_inplace(gm)
    gm.meta["camserve"] = {"layer": cg.layer_name, "methods": list(cg.methods),
                           "output_names": cg.output_names}
    log.debug("camserve: traced CAM graph for layer %r: %d nodes", cg.layer_name,
              len(gm.graph.nodes))
    return gm


# -- FX graph passes --------------------------------------------------------------------------------

def _returns_alias(node: torch.fx.Node) -> bool:
    """Whether ``node``'s output may alias one of its inputs (a view), or is unknown."""
    if node.op != "call_function":
        return True
    if node.target is operator.getitem:
        return _returns_alias(node.args[0])  # type: ignore[arg-type]
    if not isinstance(node.target, torch._ops.OpOverload):
        return True
    return any(r.alias_info is not None for r in node.target._schema.returns)


_SCATTER_OF_VIEW = {
    "aten::slice.Tensor": aten.slice_scatter.default,  # slice(x, dim, start, end, step)
    "aten::select.int": aten.select_scatter.default,   # select(x, dim, index)
}


def _view_chain(node: torch.fx.Node) -> tuple[list[torch.fx.Node], torch.fx.Node]:
    """``node`` as slices/selects of a base tensor: (views, innermost first; base)."""
    chain: list[torch.fx.Node] = []
    cur = node
    while (cur.op == "call_function" and isinstance(cur.target, torch._ops.OpOverload)
           and cur.target._schema.name + "." + cur.target._overloadname in _SCATTER_OF_VIEW):
        chain.append(cur)
        cur = cur.args[0]  # type: ignore[assignment]
    return chain, cur


def _used_after(node: torch.fx.Node, position: int, order: Mapping[torch.fx.Node, int]) -> bool:
    return any(order.get(u, -1) > position for u in node.users)


def functionalize_inplace(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rewrite in-place ATen operations out of place, in place on ``gm``.

    * ``y = op_(x)`` (``relu_``, ``add_``, ...) becomes ``y' = op(x)``, and every later use of
      ``x`` reads ``y'``;
    * ``copy_(x[a:b, c], v)`` — a write through slices/selects of a fresh tensor, as in
      ``mask[h0:h1, w0:w1] = k`` (Swin's attention mask) — becomes
      ``x' = slice_scatter(x, select_scatter(x[a:b], v, ...), ...)``, and later uses of ``x``
      read ``x'``.

    Sound only when nothing else sees the written storage, so it raises ValueError when the
    written tensor is a graph input, a constant, another kind of view, or has a view that is read
    after the write; exporters that need a functional graph can fall back to their own
    functionalisation then.
    """
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        schema = node.target._schema
        if not schema.is_mutable:
            continue
        written = [i for i, a in enumerate(schema.arguments)
                   if a.alias_info is not None and a.alias_info.is_write]
        if written != [0] or not isinstance(node.args[0], torch.fx.Node):
            raise ValueError(f"cannot functionalize {node.format_node()}: it writes to "
                             f"arguments {written}")
        pos = order[node]
        dst: torch.fx.Node = node.args[0]
        chain, base = _view_chain(dst)
        if _returns_alias(base):
            raise ValueError(f"cannot functionalize {node.format_node()}: it writes to a graph "
                             f"input, a constant or a view")
        for n in [base, *chain]:  # a view taken before the write and read after it would change
            for user in n.users:
                if (user is not node and user not in chain and user.op == "call_function"
                        and _returns_alias(user) and order.get(user, -1) < pos
                        and _used_after(user, pos, order)):
                    raise ValueError(f"cannot functionalize {node.format_node()}: the tensor it "
                                     f"writes to has a view that is read after the write")
        if any(_used_after(v, pos, order) for v in chain):
            raise ValueError(f"cannot functionalize {node.format_node()}: the view it writes "
                             f"through is read again after the write")
        anchor = node
        if node.target is aten.copy_.default:
            src: torch.fx.Node = node.args[1]  # type: ignore[assignment]
            sv, dv = src.meta.get("val"), dst.meta.get("val")
            if sv is None or dv is None or sv.shape != dv.shape or sv.dtype != dv.dtype:
                raise ValueError(f"cannot functionalize {node.format_node()}: copy with a "
                                 f"broadcast or a cast")
            new = src
        else:
            name = schema.name.split("::", 1)[1][:-1]
            try:
                outplace = getattr(getattr(aten, name), node.target._overloadname)
            except AttributeError:
                raise ValueError(f"cannot functionalize {node.format_node()}: no out-of-place "
                                 f"aten.{name}") from None
            with gm.graph.inserting_after(node):
                new = gm.graph.call_function(outplace, node.args, node.kwargs)
            new.meta = dict(node.meta)
            anchor = new
        value = new  # what the in-place op returns: the written tensor's new value
        for view in chain:  # innermost first: scatter the new value into each parent
            parent = view.args[0]
            op = _SCATTER_OF_VIEW[view.target._schema.name + "." + view.target._overloadname]  # type: ignore[union-attr]
            with gm.graph.inserting_after(anchor):
                new = gm.graph.call_function(op, (parent, new, *view.args[1:]), dict(view.kwargs))
            new.meta = {"val": parent.meta.get("val")}  # type: ignore[union-attr]
            anchor = new
        for user in list(base.users):
            if user is not node and order.get(user, -1) > pos:
                user.replace_input_with(base, new)
        node.replace_all_uses_with(value)
        gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


def lift_constants(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """Turn every tensor constant (``get_attr`` node) of ``gm`` into a placeholder after the user
    inputs, in place; return ``{placeholder name: tensor}`` (the weights, to store as
    initializers)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not placeholders:
        raise ValueError("invalid value for gm: the graph has no inputs")
    last = placeholders[-1]
    consts: dict[str, torch.Tensor] = {}
    lifted: dict[str, torch.fx.Node] = {}
    for node in list(gm.graph.nodes):
        if node.op != "get_attr":
            continue
        key = str(node.target)
        value = getattr(gm, key)
        if not isinstance(value, torch.Tensor):
            continue
        ph = lifted.get(key)
        if ph is None:
            with gm.graph.inserting_after(last):
                ph = gm.graph.placeholder(key.replace(".", "_"))
            ph.meta["val"] = value
            consts[ph.name] = value.detach()
            lifted[key] = last = ph
        node.replace_all_uses_with(ph)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return consts

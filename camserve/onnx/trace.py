"""The whole CAM computation as one traceable module, and its trace to a static FX graph.

:class:`CamGraph` runs the very code the engine runs — :func:`camserve.layers.capture_layer` on
the target layer and :func:`camserve.engine.cam_step` (score gather, ``torch.autograd.grad`` to the
layer, the layout reshape, the pure CAM functions of :mod:`camserve.methods`) — but with the target
class as a tensor input: ``target < 0`` selects each row's top-1 class inside the computation, so
nothing data-dependent happens in Python.

:func:`trace_cam_graph` turns it into an FX graph of ATen operations with ``make_fx`` and a
symbolic batch size: the backward pass is recorded as ordinary operations, so the graph (and an
ONNX graph exported from it) computes logits, activations, exact gradients and CAMs in one run.
What it takes for every operation to have a functional, exportable form:

* backward operations without an ONNX translation are decomposed during the trace
  (:func:`camserve.onnx.decompositions.backward_decompositions`);
* module outputs are made contiguous during the trace (strides mean nothing in ONNX, and a
  channels-last view reaching a 1×1 adaptive pool would otherwise restride in place);
* attention runs as matmul + softmax (the fused CPU kernel's backward has no translation);
* in-place operations are rewritten out of place afterwards
  (:func:`camserve.onnx.passes.functionalize_inplace`), and
  :func:`camserve.onnx.passes.lift_constants` turns the weights into graph inputs for an exporter.

Example::

    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ...                     nn.Linear(4, 5)).eval()
    >>> gm = trace_cam_graph(net, "0", torch.rand(2, 3, 10, 10), methods=("gradcam",))
    >>> logits, acts, grads, cam = gm(torch.rand(3, 3, 10, 10), torch.tensor([-1, 2, 4]))
    >>> cam.shape
    torch.Size([3, 8, 8])
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from ..engine import cam_step
from ..layers import Layout, LayerSpec, Reshape, capture_layer, nchw_converter, resolve_layer
from ..sources import logits_of
from ..methods import get_method
from .decompositions import backward_decompositions
from .format import check_methods, output_names
from .passes import functionalize_inplace

log = logging.getLogger(__name__)


class CamGraph(nn.Module):
    """``forward(x, target) -> (logits, activations, gradients, cam, *cams)``.

    ``x`` (N, 3, H, W); ``target`` (N,) int64, a class index per row, or a negative value for the
    row's top-1 class (``target`` may also be (1,), broadcast to every row). ``activations`` and
    ``gradients`` (d logit[target] / d activations) are NCHW; ``cam`` is ``methods[0]``'s map
    (N, h, w), raw (post-ReLU, not normalised), and one more map follows per extra method.

    The engine's capture and CAM step run here (see the module docstring); the module holds the
    model as a submodule and never changes it.
    """

    def __init__(self, model: nn.Module, target_layer: LayerSpec, methods: Sequence[str] = ("gradcam",),
                 *, layout: Optional[Layout] = None, reshape: Optional[Reshape] = None) -> None:
        super().__init__()
        if target_layer is None:
            raise ValueError("invalid value for target_layer: None (choose it first, e.g. with "
                             "camserve.families.choose_layer)")
        self.model = model
        self._layer_name, _ = resolve_layer(model, target_layer)
        self._to_nchw = nchw_converter(self._layer_name, layout, reshape)
        self.methods = check_methods(methods)
        self._fns = [get_method(m) for m in self.methods]

    @property
    def layer_name(self) -> str:
        """Dotted name of the target layer."""
        return self._layer_name

    @property
    def output_names(self) -> list[str]:
        """Names of the outputs, in order."""
        return output_names(self.methods)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with _contiguous_outputs(self.model), \
                capture_layer(self.model, self._layer_name, "track-grad") as cap:
            logits = logits_of(self.model(x))
        if logits.dim() != 2:
            raise ValueError("the model must return logits of shape (B, classes)")
        top1 = logits.detach().argmax(dim=1)
        t = torch.where(target < 0, top1, target.to(top1.dtype))
        step = cam_step(logits.gather(1, t[:, None])[:, 0], cap.output, self._fns, self._to_nchw)
        return (logits.detach(), step.activations, step.gradients, *step.cams)


@contextmanager
def _contiguous_outputs(model: nn.Module) -> Iterator[None]:
    """Inside the block every submodule's tensor output is made contiguous.

    Values do not change, only strides — which ONNX does not have. It keeps channels-last views
    (ConvNeXt and Swin blocks permute) from reaching operations such as a 1×1 adaptive average
    pool, which then restrides its output in place (``as_strided_``) and whose backward writes
    through a strided view: operations with no functional ONNX form. (Not a target-layer capture:
    it watches every module and changes strides only.)
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


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Parameters do not require grad inside the block (restored after, even on error).

    Example::

        >>> lin = nn.Linear(2, 2)
        >>> with frozen_parameters(lin):
        ...     inside = lin.weight.requires_grad
        >>> inside, lin.weight.requires_grad
        (False, True)
    """
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
            return logits_of(model(x))

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
    chooses the layer and its reshape for ``example``'s size
    (:func:`camserve.families.choose_layer`); a named layer without ``layout``/``reshape`` gets its
    reshape the same way. ``decompositions`` are applied on top of
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
    if target_layer is None or (reshape is None and layout not in ("nchw", "nhwc")):
        from ..families import choose_layer

        name = None if target_layer is None else resolve_layer(model, target_layer)[0]
        choice = choose_layer(model, tuple(example.shape[-2:]), name, layout)
        target_layer, reshape = choice.name, choice.reshape
    cg = CamGraph(model, target_layer, methods, layout=layout, reshape=reshape)
    target = torch.full((example.shape[0],), -1, dtype=torch.long)
    table: dict[Any, Callable[..., Any]] = dict(decompositions or {})
    table.update(backward_decompositions())

    def cam_fn(x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return cg(x, target)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    # attention as matmul + softmax: the fused CPU kernel's backward has no ONNX translation
    # principal projections (EigenCAM, KPCA-CAM) in their ONNX-exportable form
    from ..methods.projection import exportable_form

    with frozen_parameters(model), sdpa_kernel(SDPBackend.MATH), exportable_form():
        gm = _trace_batch_dynamic(cam_fn, table, example, target)
    if functional:
        functionalize_inplace(gm)
    gm.meta["camserve"] = {"layer": cg.layer_name, "methods": list(cg.methods),
                           "output_names": cg.output_names}
    log.debug("camserve: traced CAM graph for layer %r: %d nodes", cg.layer_name,
              len(gm.graph.nodes))
    return gm

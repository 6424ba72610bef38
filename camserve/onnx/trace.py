"""The whole CAM computation as one traceable module, and its trace to a static FX graph.

:class:`CamGraph` runs the very code the engine runs — :func:`camserve.layers.capture_layer` on
the target layer, the task's output and score (:mod:`camserve.tasks`) and
:func:`camserve.engine.cam_step` (``torch.autograd.grad`` to the layer, the layout reshape, the pure
CAM functions of :mod:`camserve.methods`) — with the task's targets as tensor inputs
(:meth:`camserve.tasks.Task.graph_inputs`: a class, a region, a reference embedding) resolved inside
the computation (``target < 0`` selects each row's top-1 class, a negative region the predicted
mask), so nothing data-dependent happens in Python.

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
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn

from ..engine import PrefixCache, cam_step, replay_matches
from ..layers import LayerSpec, capture_layer, nchw_converter, resolve_layer
from ..layouts import GRIDLESS_LAYOUTS, Layout, Reshape
from ..methods import get_method
from ..tasks import Classification, Task
from .decompositions import backward_decompositions
from .format import check_methods, input_names, needs_gradients, output_names
from .passes import functionalize_inplace

log = logging.getLogger(__name__)

#: Positions per suffix run of a ReciproCAM in the graph (each run holds N x this many copies of
#: the layer output): the graph's bound on its working memory, fixed at export.
GRAPH_CHUNK = 16


class GraphContext:
    """What a method that runs suffix forwards (ReciproCAM) sees inside the traced graph: the part
    of :class:`camserve.engine.CamContext` it uses, with tensor operations only (the number of
    rows is symbolic).

    ``row_chunks`` slices the perturbations of every row by ``chunk`` (a bound fixed at export:
    each suffix run holds N x ``chunk`` copies); ``write_layer`` writes NCHW activations into
    layer outputs out of place (a scatter through the NCHW view's element indices, so token and
    channels-last layers keep their other entries); ``suffix_scores`` runs the layers after the
    target layer, replaying the ones before it (:class:`camserve.engine.PrefixCache`) when
    ``cache`` is given, else the whole model with the layer's output replaced.
    """

    def __init__(self, graph: "CamGraph", x: torch.Tensor, raw: torch.Tensor, targets: Any,
                 options: Mapping[str, Any], cache: Optional[PrefixCache]) -> None:
        self._graph = graph
        self.x = x
        self.raw = raw.detach()
        self.activations = graph._to_nchw(self.raw)
        self.targets = targets
        self.options = dict(options)
        self.chunk = max(1, int(graph.chunk))
        self._cache = cache

    def nchw(self, raw: torch.Tensor) -> torch.Tensor:
        return self._graph._to_nchw(raw)

    def row_chunks(self, n: int) -> Iterator[slice]:
        for i in range(0, n, self.chunk):
            yield slice(i, min(n, i + self.chunk))

    def write_layer(self, raw: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
        one = raw[:1]
        index = torch.arange(one.numel(), device=raw.device).reshape(one.shape)
        where = self.nchw(index).flatten(1)  # (1, C*h*w): each NCHW entry's place in a raw row
        flat = raw.flatten(1)
        return flat.scatter(1, where.expand(flat.shape[0], -1),
                            activations.flatten(1).to(flat.dtype)).reshape(raw.shape)

    def suffix_scores(self, activations: torch.Tensor, owner: torch.Tensor, *,
                      raw: bool = False) -> torch.Tensor:
        if not raw:
            activations = self.write_layer(self.raw.index_select(0, owner), activations)
        g = self._graph
        xs = self.x.index_select(0, owner)
        with torch.no_grad(), _contiguous_outputs(g.model):
            if self._cache is not None:
                with self._cache.replay(owner, activations):
                    out = g.task.output(g.model(xs))
            else:
                with capture_layer(g.model, g.layer_name, "replace", activations=activations,
                                   raw=True):
                    out = g.task.output(g.model(xs))
        return g.task.scores(out, self.targets.select(owner))


class CamGraph(nn.Module):
    """``forward(x, *targets) -> (output, activations, gradients, cam, *cams)``.

    ``x`` (N, 3, H, W); ``targets`` the task's target inputs, in the order of
    :meth:`camserve.tasks.Task.graph_inputs` (:attr:`input_names`): for classification and
    multilabel ``target`` (N,) int64, a class (label) per row, negative for the row's top-1
    (``target`` may also be (1,), broadcast to every row); for segmentation also ``region``
    (N, H, W), the pixels a class's logits are summed over (negative entries: the predicted mask
    of the class); for embeddings ``reference`` (N, D), the embedding a cosine similarity is taken
    to. The task turns them into one target per row (:meth:`~camserve.tasks.Task.graph_targets`)
    and scores it (:meth:`~camserve.tasks.Task.scores`), exactly as the engine does.
    ``output`` is the task's output (logits, an embedding); ``activations`` and ``gradients``
    (d score / d activations) are NCHW; ``cam`` is ``methods[0]``'s map (N, h, w), raw (post-ReLU,
    not normalised), and one more map follows per extra method.

    When no method needs gradients the graph is *gradient-free*: the forward runs without
    autograd, there is no backward and no ``gradients`` output — a model whose backward cannot
    be exported still gets a CAM graph. Methods that run the layers after the target layer
    (ReciproCAM) run their own function (:mod:`camserve.methods.perturbation`) over a
    :class:`GraphContext`, ``chunk`` positions per suffix run; ``replay``: the layers before the
    target layer are replayed from the first forward (else the whole model runs again).

    The engine's capture and CAM step run here (see the module docstring); the module holds the
    model as a submodule and never changes it.
    """

    def __init__(self, model: nn.Module, target_layer: LayerSpec, methods: Sequence[str] = ("gradcam",),
                 *, layout: Optional[Layout] = None, reshape: Optional[Reshape] = None,
                 task: Optional[Task] = None, input_size: Optional[tuple[int, int]] = None,
                 chunk: int = GRAPH_CHUNK, replay: bool = True) -> None:
        """``task``: default classification; ``input_size`` (H, W): the shapes of the task's
        inputs that follow the image (a segmentation region)."""
        super().__init__()
        if target_layer is None:
            raise ValueError("invalid value for target_layer: None (choose it first, e.g. with "
                             "camserve.families.choose_layer)")
        self.model = model
        self._layer_name, _ = resolve_layer(model, target_layer)
        self._to_nchw = nchw_converter(self._layer_name, layout, reshape)
        self.methods = check_methods(methods)
        self._fns = [get_method(m) for m in self.methods]
        self._specs = [fn.spec() for fn in self._fns]  # a graph runs its methods' defaults
        self.gradients = needs_gradients(self.methods)
        self.chunk = int(chunk)
        self.replay = bool(replay)
        self.task = task if task is not None else Classification()
        if self.task.graph_per_target and not all(fn.pure for fn in self._fns):
            raise ValueError(f"invalid value for methods: the {self.task.name} graph explains every "
                             f"target with one map per method of (activations, gradients); "
                             f"{', '.join(fn.name for fn in self._fns if not fn.pure)} run more "
                             f"forwards")
        self.inputs = self.task.graph_inputs(tuple(input_size) if input_size else (0, 0))  # type: ignore[arg-type]

    @property
    def layer_name(self) -> str:
        """Dotted name of the target layer."""
        return self._layer_name

    @property
    def input_names(self) -> list[str]:
        """Names of the inputs, in order (``input`` first)."""
        return input_names(self.inputs)

    @property
    def output_names(self) -> list[str]:
        """Names of the outputs, in order."""
        return output_names(self.methods, self.task)

    def forward(self, x: torch.Tensor, *targets: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(targets) != len(self.inputs):
            raise ValueError(f"invalid value for targets: {len(targets)} tensors for the inputs "
                             f"{', '.join(self.input_names[1:]) or 'none'}")
        suffix = any(not fn.pure for fn in self._fns)
        layer = self.model.get_submodule(self._layer_name)
        cache = PrefixCache(self.model, layer, x.shape[0]) if suffix and self.replay else None
        with ExitStack() as stack:
            if not self.gradients:
                stack.enter_context(torch.no_grad())
            stack.enter_context(_contiguous_outputs(self.model))
            cap = stack.enter_context(capture_layer(self.model, self._layer_name,
                                                    "track-grad" if self.gradients else "record"))
            if cache is not None:
                stack.enter_context(cache.recording())
            out = self.task.graph_forward(self.model, x)
        tb = self.task.graph_targets(self.task.detach(out),
                                     {g.name: t for g, t in zip(self.inputs, targets)})
        with nullcontext() if self.gradients else torch.no_grad():
            scores = self.task.graph_scores(out, tb)
        step = cam_step(scores, cap.output, [fn for fn in self._fns if fn.pure], self._to_nchw,
                        batched=False)
        pure = iter(step.cams)
        cams = []
        for fn, spec in zip(self._fns, self._specs):
            if fn.pure:
                cams.append(next(pure))
            else:
                ctx = GraphContext(self, x, cap.output, tb, spec.as_dict(), cache)
                cams.append(fn.fn(ctx)[:, 0])
        grads = (step.gradients,) if self.gradients else ()
        return (self.task.graph_value(self.task.detach(out)), step.activations, *grads, *cams)


@contextmanager
def _contiguous_outputs(model: nn.Module) -> Iterator[None]:
    """Inside the block every submodule's tensor output, and the input of every adaptive average
    pooling module, is made contiguous.

    Values do not change, only strides — which ONNX does not have. It keeps channels-last views
    (ConvNeXt and Swin blocks permute; Hugging Face Swin pools ``tokens.transpose(1, 2)`` with an
    ``AdaptiveAvgPool1d``) from reaching a 1×1 adaptive average pool, which then restrides its
    output in place (``as_strided_``) and whose backward writes through a strided view
    (``copy_`` into ``as_strided``): operations with no functional ONNX form. (Not a target-layer
    capture: it watches every module and changes strides only.)
    """
    def hook(_mod: nn.Module, _inp: Any, out: Any) -> Any:
        if isinstance(out, torch.Tensor) and not out.is_contiguous():
            return out.contiguous()
        return None

    def pre_hook(_mod: nn.Module, args: tuple[Any, ...]) -> Any:
        if any(isinstance(a, torch.Tensor) and not a.is_contiguous() for a in args):
            return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)
        return None

    pools = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
    handles = [m.register_forward_hook(hook) for m in model.modules()]
    handles += [m.register_forward_pre_hook(pre_hook) for m in model.modules() if isinstance(m, pools)]
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
                         example: torch.Tensor,
                         extra: Optional[Mapping[str, torch.Tensor]] = None) -> torch.fx.GraphModule:
    """make_fx of ``fn(x, *extra)`` with a symbolic batch size shared by ``x`` and every ``extra``
    input (name -> example, batch first); H, W, C and the other dimensions static.

    First with an unbacked batch size: sound (nothing may depend on its value) and fast. Some
    models ask questions about the batch size that an unbacked size cannot answer (``batch > 1``
    in a contiguity check, a slice bound in ViT); they are traced again with a backed symbolic
    batch size, whose answers are taken from the example (batch 2) — the exporter then verifies
    the graph at other batch sizes, including 1. (``make_fx(tracing_mode="symbolic")`` would make
    H and W symbolic too, and its symbolic algebra takes minutes on ConvNeXt or Swin.)
    """
    import inspect

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

    extra = dict(extra or {})
    batch = ShapeVar("batch", min=1, optimization_hint=int(example.shape[0]))
    specs: dict[str, Any] = {"x": TensorSpec([batch] + [None] * (example.dim() - 1))}
    for name, t in extra.items():
        specs[name] = TensorSpec([batch] + [None] * (t.dim() - 1))
    args: tuple[torch.Tensor, ...] = (example, *extra.values())

    def call(*a: torch.Tensor) -> Any:
        return fn(*a)

    # the spec binds by parameter name: give the varargs wrapper the inputs' names
    call.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_ONLY) for n in specs])
    with enable_python_dispatcher():  # decompositions written with torch._refs need it for SymInts
        try:
            return make_fx(call, decomposition_table=dict(decomps), tracing_mode="fake",
                           _allow_non_fake_inputs=True, dynamic_shapes=ShapesSpec(specs))(*args)
        except GuardOnDataDependentSymNode as exc:
            log.info("camserve: the model branches on the batch size (%s); tracing with a backed "
                     "symbolic batch size instead", str(exc).splitlines()[0])
        mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
        dyn = [DimDynamic.DYNAMIC] + [DimDynamic.STATIC] * (example.dim() - 1)
        fake_x = mode.from_tensor(example, symbolic_context=StatelessSymbolicContext(dynamic_sizes=dyn))
        fake_args: list[torch.Tensor] = [fake_x]
        with mode:  # the same batch symbol as x
            fake_args += [torch.zeros((fake_x.shape[0], *t.shape[1:]), dtype=t.dtype)
                          for t in extra.values()]
        return make_fx(call, decomposition_table=dict(decomps), tracing_mode="fake",
                       _allow_non_fake_inputs=True)(*fake_args)


def trace_model_graph(model: nn.Module, example: torch.Tensor, *,
                      decompositions: Optional[Mapping[Any, Callable[..., Any]]] = None,
                      functional: bool = True, task: Optional[Task] = None) -> torch.fx.GraphModule:
    """The plain forward ``x -> output`` (the ``task``'s: default the logits) traced like
    :func:`trace_cam_graph` (same decompositions, symbolic batch): the baseline a CAM graph is
    compared with."""
    task = task if task is not None else Classification()
    if model.training:
        raise ValueError("invalid value for model: it is in training mode; call model.eval() first")

    def forward_fn(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return task.output(model(x))

    gm = _trace_batch_dynamic(forward_fn, dict(decompositions or {}), example)
    if functional:
        functionalize_inplace(gm)
    return gm


def trace_cam_graph(model: nn.Module, target_layer: LayerSpec, example: torch.Tensor,
                    methods: Sequence[str] = ("gradcam",), *, layout: Optional[Layout] = None,
                    reshape: Optional[Reshape] = None,
                    decompositions: Optional[Mapping[Any, Callable[..., Any]]] = None,
                    functional: bool = True, task: Optional[Task] = None,
                    chunk: int = GRAPH_CHUNK) -> torch.fx.GraphModule:
    """Trace :class:`CamGraph` of ``task`` (default: classification) into an FX graph of ATen
    operations with a symbolic batch size, shared by the images and the task's target inputs.
    Gradient-free ``methods`` only: no backward is traced (see :class:`CamGraph`); ``chunk``:
    positions per suffix run of a ReciproCAM.

    ``model`` must be in eval mode (rows of a batch independent). Parameters and buffers become
    constants of the graph (``get_attr`` nodes); see :func:`lift_constants`. ``target_layer=None``
    chooses the layer and its reshape for ``example``'s size
    (:func:`camserve.families.choose_layer`); a named layer without ``layout``/``reshape`` gets its
    reshape the same way. ``decompositions`` are applied on top of
    :func:`backward_decompositions` (e.g. an exporter's table of operations it cannot translate).
    ``functional=True`` rewrites in-place operations out of place (:func:`functionalize_inplace`).
    The graph's ``meta["camserve"]`` holds the layer name, the methods, the input and the output
    names.
    """
    if model.training:
        raise ValueError("invalid value for model: it is in training mode; call model.eval() first "
                         "(a CAM graph needs rows of a batch to be independent)")
    if not isinstance(example, torch.Tensor) or example.dim() != 4:
        raise ValueError("invalid value for example: expected a (N, C, H, W) tensor")
    if example.shape[0] < 2:
        raise ValueError("invalid value for example: use a batch of 2 or more so that the batch "
                         "size stays symbolic")
    task = task if task is not None else Classification()
    size = (int(example.shape[-2]), int(example.shape[-1]))
    if target_layer is None or (reshape is None and layout not in GRIDLESS_LAYOUTS):
        from ..families import choose_layer

        name = None if target_layer is None else resolve_layer(model, target_layer)[0]
        choice = choose_layer(model, size, name, layout, score=task.probe_score)
        target_layer, reshape = choice.name, choice.reshape
    replay = True
    if any(not get_method(m).pure for m in methods):
        replay = replay_matches(model, resolve_layer(model, target_layer)[1], example, task)
        if not replay:
            log.warning("camserve: replaying the layers before %r does not reproduce the model; "
                        "the graph's suffix forwards run the whole model", target_layer)
    cg = CamGraph(model, target_layer, methods, layout=layout, reshape=reshape, task=task,
                  input_size=size, chunk=chunk, replay=replay)
    targets = {g.name: g.fill(int(example.shape[0])) for g in cg.inputs}
    table: dict[Any, Callable[..., Any]] = dict(decompositions or {})
    table.update(backward_decompositions())

    from torch.nn.attention import SDPBackend, sdpa_kernel

    # attention as matmul + softmax: the fused CPU kernel's backward has no ONNX translation
    # principal projections (EigenCAM, KPCA-CAM) in their ONNX-exportable form
    from ..methods.projection import exportable_form

    with frozen_parameters(model), sdpa_kernel(SDPBackend.MATH), exportable_form():
        gm = _trace_batch_dynamic(cg, table, example, targets)
    if functional:
        functionalize_inplace(gm)
    gm.meta["camserve"] = {"layer": cg.layer_name, "methods": list(cg.methods),
                           "input_names": cg.input_names, "output_names": cg.output_names,
                           "gradients": cg.gradients}
    log.debug("camserve: traced CAM graph for layer %r: %d nodes", cg.layer_name,
              len(gm.graph.nodes))
    return gm

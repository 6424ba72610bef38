"""CamEngine: one forward, gradients to the target layer only, batched targets.

How it works, in one call:

1. :func:`camserve.layers.capture_layer` (``"track-grad"``) hooks the target layer: it detaches its
   output, ``a = out.detach().requires_grad_()``, and hands a clone of ``a`` to the rest of the
   network (later in-place ops cannot change ``a``);
2. the network prefix runs with autograd off, the suffix with it on (the hook switches it), so no
   graph is recorded before the target layer and nothing is ever computed for parameters;
3. :func:`cam_step`: ``torch.autograd.grad(scores, a)`` gives every row its own gradient in one
   backward pass (rows of a batch are independent in eval mode; K targets per row use
   ``is_grads_batched=True``), both are brought to NCHW, and a pure method ``f(A, G)`` from
   :mod:`camserve.methods` turns them into a CAM. The traced ONNX graph
   (:class:`camserve.onnx.trace.CamGraph`) runs the same two functions.

Example::

    >>> import torch, torchvision
    >>> from camserve import CamEngine
    >>> model = torchvision.models.resnet18(num_classes=10).eval()
    >>> engine = CamEngine(model, target_layer="layer4")
    >>> res = engine(torch.rand(2, 3, 64, 64), targets=[3, 7], method="gradcam")
    >>> res.cams.shape, res.heatmaps((64, 64)).shape
    (torch.Size([2, 2, 2]), torch.Size([2, 64, 64]))
"""
from __future__ import annotations

import logging
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .layers import (
    LayerError,
    LayerSpec,
    capture_layer,
    nchw_converter,
    resolve_layer,
    write_nchw,
)
from .layouts import LAYOUTS, Layout, Reshape
from .methods import Cost, LayerSize, Method, MethodSpec, as_spec, get_method
from .parsing import short_repr
from .tasks.base import TargetBatch

if TYPE_CHECKING:
    from .tasks.base import Task

log = logging.getLogger(__name__)



def normalize_maps(maps: torch.Tensor, size: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Bilinear upsample (align_corners=False) to ``size`` then min-max normalise each map to [0, 1].

    ``maps``: (..., h, w). The order (resize first, normalise at the output size) is the one
    pytorch-grad-cam uses. The normalisation is scale-free, ``(m - min) / (max - min)``, so a map
    whose values are all tiny still spans [0, 1]; a constant map becomes all zeros. (pytorch-grad-cam
    normalises twice with an epsilon of 1e-7 each time, which amounts to the same up to a relative
    1e-7.)

    Example::

        >>> normalize_maps(torch.tensor([[[1.0, 3.0], [5.0, 9.0]]])).tolist()
        [[[0.0, 0.25], [0.5, 1.0]]]
    """
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:])
    if size is not None and tuple(size) != tuple(flat.shape[-2:]):
        flat = F.interpolate(flat, size=tuple(int(s) for s in size), mode="bilinear",
                             align_corners=False)
    lo = flat.amin(dim=(-2, -1), keepdim=True)
    flat = flat - lo  # a new tensor: the in-place division below never touches the caller's maps
    span = flat.amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(flat.dtype).tiny)
    flat = flat.div_(span) if not flat.requires_grad else flat / span
    return flat.reshape(*lead, *flat.shape[-2:])


def to_uint8(maps: torch.Tensor) -> torch.Tensor:
    """[0, 1] maps to uint8 0..255 (rounded), on the maps' device.

    Example::

        >>> to_uint8(torch.tensor([0.0, 0.5, 1.0, 2.0])).tolist()
        [0, 128, 255, 255]
    """
    return maps.clamp(0, 1).mul_(255.0).round_().to(torch.uint8)  # one float temporary, not two


def heatmaps_at_sizes(cams: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> list["np.ndarray"]:
    """Per-map heatmaps at per-map sizes, as uint8 numpy arrays, with one device-to-host copy.

    ``cams``: (N, h, w) raw maps on any device; ``sizes``: N pairs (H, W), e.g. each original
    image's size. Upsampling, normalisation and the uint8 conversion run on the maps' device; the
    results are concatenated and copied to the host once, then split.

    Example::

        >>> maps = heatmaps_at_sizes(torch.rand(2, 4, 4), [(8, 6), (3, 5)])
        >>> [m.shape for m in maps], maps[0].dtype.name
        ([(8, 6), (3, 5)], 'uint8')
    """
    if cams.dim() != 3 or cams.shape[0] != len(sizes):
        raise ValueError(f"invalid value for sizes: {len(sizes)} sizes for maps of shape {tuple(cams.shape)}")
    if len(sizes) == 0:
        return []
    # maps that share an output size are resized and normalised together (one op per size, not
    # per map: a batch of same-size images costs a handful of kernels)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (h, w) in enumerate(sizes):
        groups.setdefault((int(h), int(w)), []).append(i)
    parts, order = [], []
    for size, idx in groups.items():
        sel = cams if len(idx) == len(sizes) else cams[torch.as_tensor(idx, device=cams.device)]
        parts.append(to_uint8(normalize_maps(sel, size)).reshape(-1))
        order.extend(idx)
    host = torch.cat(parts).cpu().numpy()
    out: list[Optional[np.ndarray]] = [None] * len(sizes)
    start = 0
    for i in order:
        h, w = (int(v) for v in sizes[i])
        out[i] = host[start:start + h * w].reshape(h, w)
        start += h * w
    return out  # type: ignore[return-value]


def check_scores(scores: object, layer: Optional[str]) -> None:
    """The target scores must be a (R,) or (R, K) tensor that depends on the captured ``layer``."""
    if not isinstance(scores, torch.Tensor) or scores.dim() not in (1, 2):
        raise ValueError("the target scores must be a tensor of shape (R,) or (R, K)")
    if not scores.requires_grad:
        raise LayerError(layer, "the output does not depend on it")


class CamStep(NamedTuple):
    """What :func:`cam_step` returns: NCHW ``activations`` and ``gradients`` (with a K dimension
    after the batch for (R, K) scores; None when no method needs them) and one map per method, in
    order ((R, h, w) for (R,) scores, (R, K, h, w) for (R, K))."""

    activations: torch.Tensor
    gradients: Optional[torch.Tensor]
    cams: tuple[torch.Tensor, ...]


def layer_gradients(scores: torch.Tensor, activation: torch.Tensor,
                    rows: Optional[torch.Tensor] = None, retain: bool = False,
                    batched: bool = True) -> torch.Tensor:
    """d scores / d activation, raw layout: (R, ...) for (R,) scores — one backward for the whole
    batch, rows of a batch being independent in eval mode — and (K, R, ...) for (R, K) scores —
    one batched backward (``is_grads_batched=True``, one target per gradient), or with
    ``batched=False`` K backwards in turn (what a traced graph with a symbolic batch size can
    record). ``rows`` (R,): the explained rows' indices in ``activation`` (None: all, R == B);
    ``retain``: keep the graph for more backwards."""
    if scores.dim() == 1:
        (g_raw,) = torch.autograd.grad(scores.sum(), activation, retain_graph=retain)
        return g_raw if rows is None else g_raw.index_select(0, rows)
    k = scores.shape[1]
    if not batched:
        g_raw = torch.stack([torch.autograd.grad(scores[:, j].sum(), activation,
                                                 retain_graph=retain or j < k - 1)[0]
                             for j in range(k)])
        return g_raw if rows is None else g_raw.index_select(1, rows)
    eye = torch.eye(k, dtype=scores.dtype, device=scores.device)
    grad_out = eye[:, None, :].expand(k, scores.shape[0], k)
    (g_raw,) = torch.autograd.grad(scores, activation, grad_outputs=grad_out, is_grads_batched=True,
                                   retain_graph=retain)
    return g_raw if rows is None else g_raw.index_select(1, rows)


def cam_step(scores: torch.Tensor, activation: torch.Tensor,
             methods: Sequence[Union[str, Method]], to_nchw: Callable[[torch.Tensor], torch.Tensor],
             rows: Optional[torch.Tensor] = None, batched: bool = True) -> CamStep:
    """The one CAM step of the pure methods, shared by :class:`CamEngine` and the traced ONNX
    graph: target scores -> gradient to the layer -> NCHW -> method(s).

    Args:
        scores: (R,) or (R, K) target scores of the explained rows (a task's
            :meth:`camserve.tasks.Task.scores`); they must depend on ``activation``.
        activation: the target layer's captured output (the leaf of
            :func:`camserve.layers.capture_layer` in ``"track-grad"`` mode), B >= R rows.
        methods: pure methods (names or :class:`camserve.methods.Method`) — functions
            ``f(A, G)``; one map per method in the result. The backward runs only when one of them
            needs gradients (otherwise ``scores`` need not be differentiable).
        to_nchw: the layer's layout function (:func:`camserve.layers.nchw_converter`).
        rows: (R,) indices of the explained rows in ``activation`` (None: all of them, R == B).
        batched: (R, K) scores get one batched backward; False: K backwards
            (:func:`layer_gradients`).

    Example::

        >>> from camserve.layers import capture_layer, nchw_converter
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        ...                     nn.Linear(4, 5)).eval()
        >>> with capture_layer(net, "0") as cap:
        ...     logits = net(torch.rand(2, 3, 8, 8))
        >>> scores = logits.gather(1, torch.tensor([[1], [4]]))[:, 0]
        >>> A, G, (cam,) = cam_step(scores, cap.output, ["gradcam"], nchw_converter("0", "nchw"))
        >>> tuple(G.shape), tuple(cam.shape)
        ((2, 4, 6, 6), (2, 6, 6))
    """
    fns = [get_method(m) for m in methods]
    impure = [m.name for m in fns if not m.pure]
    if impure:
        raise ValueError(f"invalid value for methods: {impure[0]!r} is not a function of "
                         f"(activations, gradients); run it through CamEngine")
    if any(m.gradients for m in fns):  # gradient-free methods take no backward: any scores do
        check_scores(scores, None)
    a_sel = activation.detach() if rows is None else activation.detach().index_select(0, rows)
    A = to_nchw(a_sel)
    G = None
    if any(m.gradients for m in fns):
        g_raw = layer_gradients(scores, activation, rows, batched=batched)
        G = to_nchw(g_raw) if scores.dim() == 1 else \
            torch.stack([to_nchw(g) for g in g_raw.unbind(0)], dim=1)  # (R, K, C, h, w)
    if scores.dim() == 1:
        cams = tuple(fn(A, G) for fn in fns)
    else:
        k = scores.shape[1]
        cams = tuple(_per_target(fn(A[:, None], G), k) for fn in fns)
    return CamStep(A, G, cams)


def _per_target(cam: torch.Tensor, k: int) -> torch.Tensor:
    """A method's (R, K or 1, h, w) maps as (R, K, h, w): a gradient-free map serves each target."""
    return cam if cam.shape[1] == k else cam.expand(cam.shape[0], k, *cam.shape[2:])


@dataclass
class CamResult:
    """What one engine call returns.

    ``output`` the task's output of the whole batch, detached (for classification the logits);
    ``targets`` the explained rows' :class:`camserve.tasks.TargetBatch`; ``cams`` (R, h, w) for
    one target per row or (R, K, h, w), raw (post-ReLU, not normalised); ``activations``
    (R, C, h, w) and ``gradients`` ((R, C, h, w) or (R, K, C, h, w); None when no method of the
    call needed them) in NCHW; ``layer`` the target layer's dotted name; ``methods`` one per
    explained row (``method`` when they are all the same).
    """

    output: Any
    target_batch: TargetBatch
    cams: torch.Tensor
    activations: torch.Tensor
    gradients: Optional[torch.Tensor]
    layer: str
    methods: tuple[str, ...]
    #: the method spec of each explained row (its options resolved)
    specs: tuple[MethodSpec, ...] = ()

    @property
    def method(self) -> str:
        """The method of the call (the first row's when rows differ)."""
        return self.methods[0] if self.methods else ""

    @property
    def logits(self) -> torch.Tensor:
        """The output when it is a tensor (classification, multilabel: the logits)."""
        if not isinstance(self.output, torch.Tensor):
            raise TypeError(f"this task's output is a {type(self.output).__name__}, not logits")
        return self.output

    @property
    def targets(self) -> torch.Tensor:
        """The explained class per target: (R,) for one target per row, else (R, K)."""
        idx = self.target_batch.index
        return idx[:, 0] if self.cams.dim() == 3 else idx

    def heatmaps(self, size: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """CAMs upsampled to ``size`` (H, W) and min-max normalised per map to [0, 1]."""
        return normalize_maps(self.cams, size)

    def heatmaps_uint8(self, size: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Like :meth:`heatmaps`, as uint8 0..255 on the same device (copy to host once)."""
        return to_uint8(self.heatmaps(size))


class PrefixCache:
    """The outputs of the modules that finished before the target layer started, recorded during
    one forward, and their replay: the suffix of the network (the target layer's consumers) then
    runs on perturbed copies of the layer's output without recomputing anything before it.

    Recorded: every module called exactly once in the forward, not an ancestor of the target
    layer, whose call ended before the target layer's began — only the outermost of them (a
    recorded module's descendants are dropped). Left out (they then run again, exactly): modules
    called more than once, outputs changed in place afterwards (version counters), outputs that
    are not tensors or tuples / lists / dicts of them. Replaying batch ``owner`` (indices into the
    recorded batch) gives each recorded module the rows ``owner`` of its output (tensors whose
    first dimension is the batch; others as they are), and the target layer the given output.
    """

    def __init__(self, model: nn.Module, layer: nn.Module, batch: int) -> None:
        self.model = model
        self.layer = layer
        self.batch = batch
        self.started = False
        self.entries: dict[nn.Module, Any] = {}
        self._versions: dict[nn.Module, list[int]] = {}
        self._calls: dict[nn.Module, int] = {}
        self._ancestors = {id(m) for m in _ancestors(model, layer)}
        self._handles: list[Any] = []

    @contextmanager
    def recording(self) -> Iterator["PrefixCache"]:
        """Hooks on every module for the duration of the block (removed on exit)."""
        for m in self.model.modules():
            if id(m) in self._ancestors and m is not self.layer:
                continue
            self._handles.append(m.register_forward_hook(self._hook))
        self._handles.append(self.layer.register_forward_pre_hook(self._start))
        try:
            yield self
        finally:
            for h in self._handles:
                h.remove()
            self._handles.clear()
            self._finish()

    def _start(self, module: nn.Module, args: Any) -> None:
        self.started = True

    def _hook(self, module: nn.Module, args: Any, out: Any) -> None:
        if module is self.layer:
            return
        self._calls[module] = self._calls.get(module, 0) + 1
        if self.started or self._calls[module] > 1:
            self.entries.pop(module, None)
            return
        leaves = _tensor_leaves(out)
        if leaves is None:
            return
        for d in module.modules():
            if d is not module:
                self.entries.pop(d, None)
                self._versions.pop(d, None)
        self.entries[module] = out
        self._versions[module] = [t._version for t in leaves]

    def _finish(self) -> None:
        for m in list(self.entries):
            leaves = _tensor_leaves(self.entries[m]) or []
            if self._calls.get(m, 0) != 1 or [t._version for t in leaves] != self._versions[m]:
                del self.entries[m]

    @contextmanager
    def replay(self, owner: torch.Tensor, layer_output: torch.Tensor) -> Iterator[None]:
        """Within the block, recorded modules return rows ``owner`` of their outputs and the
        target layer returns ``layer_output`` (instance ``forward`` attributes, restored on
        exit)."""
        patched: list[tuple[nn.Module, Any]] = []

        def pick(v: Any) -> Any:
            if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == self.batch:
                return v.index_select(0, owner.to(v.device))
            return v

        try:
            for m, out in self.entries.items():
                value = _tree_map(pick, out)
                patched.append((m, m.__dict__.get("forward")))
                m.forward = (lambda value: lambda *a, **k: value)(value)  # type: ignore[method-assign]
            patched.append((self.layer, self.layer.__dict__.get("forward")))
            self.layer.forward = lambda *a, **k: layer_output  # type: ignore[method-assign]
            yield
        finally:
            for m, prev in patched:
                if prev is None:
                    del m.forward
                else:
                    m.forward = prev  # type: ignore[method-assign]


def replay_matches(model: nn.Module, layer: nn.Module, x: torch.Tensor, task: "Task") -> bool:
    """Whether replaying the layers before ``layer`` (:class:`PrefixCache`) reproduces the whole
    ``model`` on ``x`` when the layer's output is perturbed (halved): what a traced graph checks
    once, on real values, before it replays them (the engine checks its first replay itself).

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2)).eval()
        >>> from camserve.tasks import Classification
        >>> replay_matches(net, net[1], torch.rand(2, 3, 6, 6), Classification())
        True
    """
    cache = PrefixCache(model, layer, int(x.shape[0]))
    with torch.no_grad():
        with capture_layer(model, layer, "record") as cap, cache.recording():
            model(x)
        raw = cap.output * 0.5
        try:
            with cache.replay(torch.arange(int(x.shape[0]), device=x.device), raw):
                replayed = task.output(model(x))
        except Exception as exc:  # a forward the replay cannot follow: say so, run it whole
            log.info("camserve: replaying the layers before the target layer failed (%s: %s)",
                     type(exc).__name__, short_repr(str(exc), 200))
            return False
        with capture_layer(model, layer, "replace", activations=raw, raw=True):
            whole = task.output(model(x))
    return _same(replayed, whole, task, int(x.shape[0]))


def _ancestors(model: nn.Module, layer: nn.Module) -> list[nn.Module]:
    """The modules containing ``layer`` (the model included) and ``layer`` itself."""
    for name, mod in model.named_modules():
        if mod is layer:
            out = [model]
            parent = model
            for part in name.split(".") if name else []:
                parent = parent._modules[part]  # type: ignore[assignment]
                out.append(parent)
            return out
    return [model, layer]


def _tensor_leaves(out: Any) -> Optional[list[torch.Tensor]]:
    """The tensors of a module output made of tensors, tuples, lists, dicts and plain scalars;
    None for anything else (it cannot be replayed safely)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if out is None or isinstance(out, (bool, int, float, str)):
        return []
    if isinstance(out, (tuple, list)):
        items = list(out)
    elif isinstance(out, dict) and (type(out) in (dict,) or hasattr(out, "to_tuple")
                                    or type(out).__name__ == "OrderedDict"):
        items = list(out.values())
    else:
        return None
    leaves: list[torch.Tensor] = []
    for item in items:
        sub = _tensor_leaves(item)
        if sub is None:
            return None
        leaves += sub
    return leaves


def _tree_map(fn: Callable[[Any], Any], out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return fn(out)
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return type(out)(*(_tree_map(fn, v) for v in out))
    if isinstance(out, (tuple, list)):
        return type(out)(_tree_map(fn, v) for v in out)
    if isinstance(out, dict):
        mapped = {k: _tree_map(fn, v) for k, v in out.items()}
        return type(out)(**mapped) if hasattr(out, "to_tuple") else type(out)(mapped)
    return out


@dataclass
class _Forward:
    """One forward of the engine: the inputs ``x`` of the explained rows, their indices ``rows``
    in the batch (None: all), the task ``output`` of the whole batch and ``selected`` of the
    explained rows (differentiable), their ``scores`` (R, K), the captured ``leaf`` (whole batch,
    raw layout), ``targets``, and the :class:`PrefixCache` when a method runs the suffix."""

    x_batch: torch.Tensor
    rows: Optional[torch.Tensor]
    output: Any
    selected: Any
    scores: torch.Tensor
    leaf: torch.Tensor
    targets: TargetBatch
    prefix: Optional[PrefixCache] = None

    @property
    def x(self) -> torch.Tensor:
        return self.x_batch if self.rows is None else self.x_batch.index_select(0, self.rows.to(self.x_batch.device))


class CamContext:
    """What a method that is not a pure ``f(A, G)`` works with, for the R rows it explains:

    * ``x`` their inputs (R, 3, H, W), ``targets`` (:class:`camserve.tasks.TargetBatch`),
      ``activations`` (R, C, h, w) NCHW, ``raw`` the layer's outputs in its own layout,
      ``gradients`` ((R, K, C, h, w), computed on first use), ``options`` the method's options
      (defaults filled in), ``output`` the task output of the R rows and ``scores`` (R, K), both
      differentiable to the layer, ``task``, ``chunk``;
    * :meth:`gradients_of` other scores; :meth:`hvp` Hessian-vector products;
    * two ways to score perturbed copies, under ``torch.no_grad``, in chunks of at most ``chunk``
      copies, returning (N, K) target scores: :meth:`forward_scores` (whole-model forwards of
      perturbed inputs) and :meth:`suffix_scores` (the layers after the target layer on perturbed
      layer outputs; the layers before it are not run again: :class:`PrefixCache`);
    * :meth:`explain` another method on other inputs (``aug_smooth``).

    ``owner`` (N,) says which explained row each perturbed copy belongs to (its targets are used).
    A method run this way returns (R, K or 1, h', w') maps.
    """

    def __init__(self, engine: "CamEngine", fwd: _Forward, sel: Optional[torch.Tensor],
                 spec: MethodSpec, gradients: Callable[[], torch.Tensor]) -> None:
        self.engine = engine
        self._fwd = fwd
        self._sel = sel  # positions of these rows among the explained rows (None: all)
        rows = fwd.rows if fwd.rows is not None else None
        if sel is not None:
            base = rows if rows is not None else torch.arange(fwd.x_batch.shape[0], device=sel.device)
            rows = base.index_select(0, sel.to(base.device))
        #: indices of these rows in the forward's batch (None: the whole batch)
        self.rows = rows
        self.x = fwd.x_batch if rows is None else fwd.x_batch.index_select(0, rows.to(fwd.x_batch.device))
        self.targets = fwd.targets if sel is None else fwd.targets.select(sel)
        leaf = fwd.leaf.detach()
        self.raw = leaf if rows is None else leaf.index_select(0, rows.to(leaf.device))
        self.activations = engine._to_nchw(self.raw)
        self.spec = spec
        self.options = spec.as_dict()
        self.chunk = max(1, int(engine.chunk))
        self._gradients = gradients
        self._grad_value: Optional[torch.Tensor] = None

    @property
    def task(self) -> "Task":
        return self.engine.task

    @property
    def output(self) -> Any:
        """The task output of these rows, differentiable to the layer."""
        return self._fwd.selected if self._sel is None else self.task.select(self._fwd.selected, self._sel)

    @property
    def scores(self) -> torch.Tensor:
        """(R, K) target scores of these rows, differentiable to the layer."""
        s = self._fwd.scores
        return s if self._sel is None else s.index_select(0, self._sel.to(s.device))

    @property
    def gradients(self) -> torch.Tensor:
        """(R, K, C, h, w): d score / d activations per target (one backward, on first use)."""
        if self._grad_value is None:
            self._grad_value = self._gradients()
        return self._grad_value

    def nchw(self, raw: torch.Tensor) -> torch.Tensor:
        """A tensor in the layer's layout (rows first) as NCHW."""
        return self.engine._to_nchw(raw)

    def gradients_of(self, scores: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
        """(R, K, C, h, w) NCHW gradients of other (R, K) scores of these rows (differentiable
        to the layer, e.g. computed from :attr:`output`)."""
        return self._grad(scores, create_graph)[0]

    def _grad(self, scores: torch.Tensor, create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = self._fwd.leaf
        raws = []
        for k in range(scores.shape[1]):
            (g,) = torch.autograd.grad(scores[:, k].sum(), leaf, retain_graph=True,
                                       create_graph=create_graph)
            raws.append(g if self.rows is None else g.index_select(0, self.rows.to(g.device)))
        raw = torch.stack(raws, dim=1)  # (R, K, ...raw)
        nchw = torch.stack([self.nchw(raw[:, k]) for k in range(raw.shape[1])], dim=1)
        return nchw, raw

    def hvp(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(G, HA)``: the gradients (R, K, C, h, w) and the Hessian of each target score times
        the activations, :math:`\\nabla^2_A s \\cdot A` (R, K, C, h, w), both NCHW: one backward
        with a graph and one more through it per target."""
        leaf = self._fwd.leaf
        gs, hs = [], []
        for k in range(self.scores.shape[1]):
            (g,) = torch.autograd.grad(self.scores[:, k].sum(), leaf, retain_graph=True,
                                       create_graph=True)
            if g.requires_grad:
                (h,) = torch.autograd.grad(g, leaf, grad_outputs=leaf.detach(), retain_graph=True,
                                           allow_unused=True)
            else:
                h = None
            h = torch.zeros_like(g) if h is None else h
            pick = (lambda t: t) if self.rows is None else (lambda t: t.index_select(0, self.rows.to(t.device)))
            gs.append(self.nchw(pick(g.detach())))
            hs.append(self.nchw(pick(h.detach())))
        return torch.stack(gs, dim=1), torch.stack(hs, dim=1)

    def gradients_at(self, x: torch.Tensor) -> torch.Tensor:
        """(R, K, C, h, w) NCHW gradients of these rows' target scores on other inputs ``x``
        (R, 3, H, W): a forward and a backward of their own (SmoothGrad-CAM++)."""
        fwd = self.engine._forward(x, None, lambda _out: self.targets)
        g_raw = layer_gradients(fwd.scores, fwd.leaf)  # (K, R, ...)
        return torch.stack([self.nchw(g) for g in g_raw.unbind(0)], dim=1)

    def chunks(self, n: int) -> Iterator[slice]:
        """Slices of at most :attr:`chunk` over ``n`` copies."""
        for i in range(0, n, self.chunk):
            yield slice(i, min(n, i + self.chunk))

    def row_chunks(self, n: int) -> Iterator[slice]:
        """Slices over ``n`` perturbations of every row, each slice giving every row its copies:
        at most :attr:`chunk` copies in all (at least one perturbation per slice)."""
        step = max(1, self.chunk // max(1, int(self.activations.shape[0])))
        for i in range(0, n, step):
            yield slice(i, min(n, i + step))

    def write_layer(self, raw: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
        """``raw`` (layer outputs in the layer's own layout, changed in place) with NCHW
        ``activations`` written through its NCHW view (:func:`camserve.layers.write_nchw`)."""
        return write_nchw(raw, activations, self.nchw, self.engine.layer_name)

    def forward_scores(self, x: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """(N, K) target scores of the model on inputs ``x`` (N, 3, H, W); row ``n`` is scored for
        the targets of explained row ``owner[n]``."""
        parts = []
        with torch.no_grad():
            for sl in self.chunks(int(x.shape[0])):
                out = self.task.output(self.engine.model(x[sl]))
                parts.append(self.task.scores(out, self.targets.select(owner[sl])))
        return torch.cat(parts)

    def broadcast_scores(self, x: torch.Tensor) -> torch.Tensor:
        """(R, K) target scores of every row's targets on the one input ``x`` (1, 3, H, W) (e.g.
        the all-zero input every constant mask gives): one forward."""
        with torch.no_grad():
            out = self.task.output(self.engine.model(x))
            rep = torch.zeros(self.targets.rows, dtype=torch.long, device=x.device)
            return self.task.scores(self.task.select(out, rep), self.targets)

    def suffix_scores(self, activations: torch.Tensor, owner: torch.Tensor, *, raw: bool = False) -> torch.Tensor:
        """(N, K) target scores when the target layer outputs ``activations`` instead of its own
        (N, C, h, w NCHW; with ``raw=True`` in the layer's own layout, e.g. to change a ViT's
        class token too); row ``n`` continues from explained row ``owner[n]``'s input. Only the
        layers after the target layer run (:class:`PrefixCache`); the first chunk of an engine's
        first such call at a batch shape is checked against the whole model, and a model whose
        replay differs runs whole from then on (a warning says so)."""
        parts = []
        with torch.no_grad():
            for sl in self.chunks(int(activations.shape[0])):
                own = owner[sl].to(self.raw.device)
                chunk = activations[sl]
                if not raw:
                    chunk = write_nchw(self.raw.index_select(0, own).clone(), chunk, self.nchw,
                                       self.engine.layer_name)
                rows = own if self.rows is None else self.rows.to(own.device).index_select(0, own)
                out = self.engine._suffix_output(self._fwd, rows, chunk)
                parts.append(self.task.scores(out, self.targets.select(owner[sl])))
        return torch.cat(parts)

    def explain(self, x: torch.Tensor, spec: MethodSpec) -> torch.Tensor:
        """(R, K or 1, h, w) maps of ``spec`` for these rows' targets on other inputs ``x``
        (R, 3, H, W) — a forward of its own (``aug_smooth``)."""
        return self.engine._explain(x, self.targets, spec)


class CamEngine:
    """CAM engine over a ``model`` (B, 3, H, W) -> task output, for any task and method.

    Args:
        model: the network; the engine never changes it (mode, requires_grad, hooks, .grad).
        target_layer: dotted module name, a submodule, or None to auto-locate on the first call.
        layout: the layer output layout (``"nchw"``, ``"nhwc"``, ``"tokens"``); default: decided
            on the first call by :func:`camserve.families.choose_layer` (family rules, a second
            probe at another input size; never guessed from the shape alone).
        reshape: a callable mapping the layer output to (B, C, h, w) (e.g.
            ``LoadedModel.reshape``); overrides ``layout``.
        task: what the output means and how a target is scored (:mod:`camserve.tasks`; default
            :class:`camserve.tasks.Classification`: the model's output may then be a tensor, a
            tuple/list (first item), a mapping or an object with ``logits``).
        chunk: perturbed copies per forward for methods that run more forwards.
    """

    def __init__(self, model: nn.Module, target_layer: LayerSpec = None, *,
                 layout: Optional[Layout] = None, reshape: Optional[Reshape] = None,
                 task: Optional["Task"] = None, chunk: int = 64) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"invalid value for model: expected an nn.Module, got {type(model).__name__}")
        if layout is not None and layout not in LAYOUTS:
            raise ValueError(f"invalid value for layout: {layout!r} (known: {', '.join(LAYOUTS)})")
        from .tasks import Classification

        self.model = model
        self.layout = layout
        self.reshape = reshape
        self.task = task if task is not None else Classification()
        self.chunk = int(chunk)
        #: the target layer's channels (known after the first call)
        self.channels: Optional[int] = None
        #: the target layer's NCHW size (known after the first call)
        self.layer_size: Optional[LayerSize] = None
        self._layer_name: Optional[str] = None
        self._layer: Optional[nn.Module] = None
        if target_layer is not None:
            self._layer_name, self._layer = resolve_layer(model, target_layer)
        self._to_nchw = nchw_converter(self._layer_name, layout, reshape)
        #: per (batch, input shape): whether replaying the prefix matches the whole model
        self._replay_ok: dict[tuple[int, ...], bool] = {}
        #: the share of the network's multiply-adds after the target layer (costs of suffix
        #: forwards and backwards; 1.0 until :meth:`measure_suffix_share`)
        self.suffix_share = 1.0

    def measure_suffix_share(self, x: torch.Tensor) -> float:
        """Measure :attr:`suffix_share` on input ``x`` (one no-grad forward counting the
        multiply-adds of layers with weights, before and after the target layer)."""
        if self._layer is None:
            self(x[:1])
        assert self._layer is not None
        counts = [0.0, 0.0]
        done = [False]

        def hook(m: nn.Module, args: Any, out: Any) -> None:
            w = getattr(m, "weight", None)
            if m is self._layer:
                done[0] = True
            if isinstance(w, torch.Tensor) and isinstance(out, torch.Tensor) and out.dim() >= 2 \
                    and not list(m.children()):
                per = out.numel() / max(1, out.shape[0]) / max(1, w.shape[0])
                counts[int(done[0])] += float(w.numel()) * per

        handles = [m.register_forward_hook(hook) for m in self.model.modules()]
        try:
            with torch.no_grad():
                self.model(x)
        finally:
            for h in handles:
                h.remove()
        total = counts[0] + counts[1]
        self.suffix_share = max(0.01, counts[1] / total) if total > 0 else 1.0
        return self.suffix_share

    @property
    def layer_name(self) -> Optional[str]:
        """Dotted name of the target layer (None until auto-located)."""
        return self._layer_name

    # -- public API ---------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, targets: Any = None,
                 method: Union[str, MethodSpec, Sequence[Union[str, MethodSpec]]] = "gradcam",
                 rows: Optional[Sequence[int]] = None,
                 options: Optional[Mapping[str, Any]] = None) -> CamResult:
        """Explain a batch ``x`` (B, 3, H, W). See the module docstring.

        ``targets``: what the task's :meth:`~camserve.tasks.Task.as_targets` takes — for
        classification None (top-1), an int, B ints, a LongTensor (B,) or (B, K); for every task a
        :class:`camserve.tasks.TargetBatch`, or a callable of the detached output returning one
        (targets that depend on the prediction, still from the one forward).
        ``method``: a method name or :class:`camserve.methods.MethodSpec` for every explained
        row, or one per explained row (rows sharing a gradient method share the one backward;
        rows sharing a spec share its work). ``rows``: indices of the rows to explain (default:
        all); the forward covers the whole batch, only these rows' scores are differentiated;
        targets, maps, activations and gradients of the result have ``len(rows)`` rows while
        ``output`` covers the whole batch. ``options``: method options for methods given by
        name (e.g. ``{"max_channels": 256}``; each must be an option of each such method).
        """
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "CamEngine needs autograd and cannot run under torch.inference_mode(); call it "
                "outside that context (use predict() for predictions only)"
            )
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"invalid value for x: expected a (B, C, H, W) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if x.is_inference():
            x = x.clone()
        idx = self._parse_rows(rows, x.shape[0], x.device)
        n_rows = x.shape[0] if idx is None else int(idx.numel())
        specs = self._parse_methods(method, n_rows, options)
        if self._layer is None or (self.reshape is None and self.layout not in ("nchw", "nhwc")):
            self._choose(tuple(int(s) for s in x.shape[-2:]))

        def resolve(detached: Any) -> TargetBatch:
            t = targets(detached) if callable(targets) and not isinstance(
                targets, (torch.Tensor, TargetBatch)) else targets
            return self.task.as_targets(t, detached)

        fwd = self._forward(x, idx, resolve, prefix=any(_replays(s) for s in specs))
        tb = fwd.targets
        if tb.rows != n_rows:
            raise ValueError(f"invalid value for targets: {tb.rows} rows of targets for "
                             f"{n_rows} explained rows")
        cams, A, G = self._maps(fwd, specs)
        one = tb.k == 1 and not isinstance(targets, TargetBatch) and not _wide(targets)
        return CamResult(output=self.task.detach(fwd.output), target_batch=tb,
                         cams=cams[:, 0] if one else cams, activations=A,
                         gradients=None if G is None else (G[:, 0] if one else G),
                         layer=self._layer_name or "", methods=tuple(s.name for s in specs),
                         specs=tuple(specs))

    def predict(self, x: torch.Tensor) -> Any:
        """The task's output only, under ``torch.no_grad()`` (no hook, no graph). Not inference
        mode: a model that caches tensors between calls (Ultralytics YOLO's anchors, rotary
        tables) would keep inference tensors that a later explaining forward cannot save for
        backward."""
        with torch.no_grad():
            return self.task.output(self.model(x))

    def cost(self, method: Union[str, MethodSpec], options: Optional[Mapping[str, Any]] = None,
             k: int = 1) -> Cost:
        """What ``method`` costs for one row of ``k`` targets on this engine's layer
        (:class:`camserve.methods.Cost`); needs the layer's size, known after the first call."""
        size = self.layer_size or LayerSize(self.channels or 0, 1, 1)
        return as_spec(method, options).cost(size, k)

    # -- internals ----------------------------------------------------------------------------
    def _forward(self, x: torch.Tensor, idx: Optional[torch.Tensor],
                 targets: Callable[[Any], TargetBatch], prefix: bool = False) -> _Forward:
        """One forward with the capture hook (and the prefix recorder when asked): the output,
        the explained rows' targets and scores."""
        assert self._layer is not None
        cache = PrefixCache(self.model, self._layer, int(x.shape[0])) if prefix else None
        with capture_layer(self.model, self._layer, "track-grad") as cap, \
                (cache.recording() if cache is not None else nullcontext()):
            out = self.task.output(self.model(x))
        activation = cap.output
        sel = out if idx is None else self.task.select(out, idx)
        tb = targets(self.task.detach(sel)).to(activation.device)
        scores = self.task.scores(sel, tb)
        check_scores(scores, self._layer_name)
        return _Forward(x, idx, out, sel, scores, activation, tb, cache)

    def _explain(self, x: torch.Tensor, targets: TargetBatch, spec: MethodSpec) -> torch.Tensor:
        """(R, K, h, w) maps of one spec for given targets of every row of ``x`` (its own
        forward)."""
        fwd = self._forward(x, None, lambda _out: targets, prefix=_replays(spec))
        return self._maps(fwd, [spec] * int(x.shape[0]))[0]

    def _suffix_output(self, fwd: _Forward, rows: torch.Tensor, raw: torch.Tensor) -> Any:
        """The task output of the network after the target layer, the layer giving ``raw``
        (N rows in its own layout) for batch rows ``rows`` of forward ``fwd`` (no grad)."""
        x = fwd.x_batch.index_select(0, rows.to(fwd.x_batch.device))
        key = (int(fwd.x_batch.shape[0]), *(int(s) for s in x.shape[1:]))
        cache = fwd.prefix
        if cache is not None and self._replay_ok.get(key, True):
            try:
                with cache.replay(rows, raw):
                    out = self.task.output(self.model(x))
            except Exception as exc:  # a model whose forward the replay cannot follow
                log.warning("camserve: replaying the layers before %r failed (%s: %s); running "
                            "the whole model for suffix forwards", self._layer_name,
                            type(exc).__name__, short_repr(str(exc), 200))
                self._replay_ok[key] = False
            else:
                if key not in self._replay_ok:
                    n = min(2, int(rows.shape[0]))
                    full = self._full_suffix(x[:n], raw[:n])
                    ok = _same(out, full, self.task, n)
                    self._replay_ok[key] = ok
                    if not ok:
                        log.warning("camserve: replaying the layers before %r does not reproduce "
                                    "the model; running the whole model for suffix forwards",
                                    self._layer_name)
                if self._replay_ok[key]:
                    return out
        return self._full_suffix(x, raw)

    def _full_suffix(self, x: torch.Tensor, raw: torch.Tensor) -> Any:
        with capture_layer(self.model, self._layer, "replace", activations=raw, raw=True):  # type: ignore[arg-type]
            return self.task.output(self.model(x))

    def _maps(self, fwd: _Forward, specs: Sequence[MethodSpec]
              ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(R, K, h, w) maps, NCHW activations and (R, K, C, h, w) gradients (None when unused)
        of the explained rows, each row by its own method spec."""
        scores, activation, rows, tb = fwd.scores, fwd.leaf, fwd.rows, fwd.targets
        a_sel = activation.detach() if rows is None else activation.detach().index_select(0, rows)
        A = self._to_nchw(a_sel)
        self.channels = int(A.shape[1])
        self.layer_size = LayerSize(int(A.shape[1]), int(A.shape[2]), int(A.shape[3]))
        groups: dict[MethodSpec, list[int]] = {}
        for i, s in enumerate(specs):
            groups.setdefault(s, []).append(i)
        grads: list[Optional[torch.Tensor]] = [None]
        several = len(groups) > 1 or any(not s.method.pure or s.get("aug_smooth") for s in groups)

        def gradients() -> torch.Tensor:
            if grads[0] is None:
                if tb.k == 1 and not several:  # one plain backward, as cheap as it gets
                    (g,) = torch.autograd.grad(scores[:, 0].sum(), activation)
                    g = g if rows is None else g.index_select(0, rows)
                    grads[0] = self._to_nchw(g)[:, None]
                else:
                    g_raw = layer_gradients(scores, activation, rows, retain=several)  # (K, R, ...)
                    if scores.dim() == 1:
                        grads[0] = self._to_nchw(g_raw)[:, None]
                    else:
                        grads[0] = torch.stack([self._to_nchw(g) for g in g_raw.unbind(0)], dim=1)
            return grads[0]

        k = tb.k
        cams: Optional[torch.Tensor] = None
        used_grads = False
        for spec, sel in groups.items():
            m = spec.method
            whole = len(sel) == len(specs)
            ix = None if whole else torch.tensor(sel, device=A.device)
            if m.pure and not spec.get("aug_smooth"):
                used_grads |= m.gradients
                G = None
                if m.gradients:
                    G = gradients() if whole else gradients().index_select(0, ix)
                part = m.apply(A[:, None] if whole else A.index_select(0, ix)[:, None], G, spec.as_dict())
            else:
                ctx = CamContext(self, fwd, ix, spec, lambda ix=ix: gradients() if ix is None
                                 else gradients().index_select(0, ix))
                part = run_context_method(ctx)
                used_grads |= ctx._grad_value is not None
            part = _per_target(part, k)
            if cams is not None and tuple(cams.shape[-2:]) != tuple(part.shape[-2:]):
                # rows of layer- and input-resolution methods in one call: the larger size
                big = max(tuple(cams.shape[-2:]), tuple(part.shape[-2:]), key=lambda s: s[0] * s[1])
                cams = cams if tuple(cams.shape[-2:]) == big else _resize(cams, big)
                part = part if tuple(part.shape[-2:]) == big else _resize(part, big)
            if cams is None and whole:
                cams = part
            else:
                if cams is None:
                    cams = part.new_zeros((len(specs), *part.shape[1:]))
                cams[torch.tensor(sel, device=cams.device)] = part.to(cams.dtype)
        assert cams is not None  # at least one row is explained (rows are never empty)
        return cams.detach(), A, grads[0] if used_grads else None

    def _choose(self, size: tuple[int, int]) -> None:
        """First call: locate the layer and/or decide its reshape (never from a shape alone)."""
        from .families import FamilyError, choose_layer

        try:
            choice = choose_layer(self.model, size, self._layer_name, self.layout,
                                  score=self.task.probe_score)
        except FamilyError as exc:
            raise LayerError(self._layer_name, str(exc)) from None
        if self._layer is None:
            self._layer_name, self._layer = resolve_layer(self.model, choice.name)
        self.reshape = choice.reshape
        self._to_nchw = nchw_converter(self._layer_name, self.layout, self.reshape)

    @staticmethod
    def _parse_methods(method: Union[str, MethodSpec, Sequence[Union[str, MethodSpec]]], n: int,
                       options: Optional[Mapping[str, Any]] = None) -> list[MethodSpec]:
        items = [method] * n if isinstance(method, (str, MethodSpec)) else list(method)
        if len(items) != n:
            raise ValueError(f"invalid value for method: {len(items)} methods for {n} explained rows")
        cache: dict[Any, MethodSpec] = {}
        out = []
        for m in items:
            if m not in cache:
                cache[m] = as_spec(m, None if isinstance(m, MethodSpec) else options)
            out.append(cache[m])
        return out

    @staticmethod
    def _parse_rows(rows: Optional[Sequence[int]], b: int, device: torch.device) -> Optional[torch.Tensor]:
        if rows is None:
            return None
        try:
            idx = torch.as_tensor([int(r) for r in rows], dtype=torch.long)
        except (TypeError, ValueError):
            raise ValueError(f"invalid value for rows: {rows!r} (a sequence of row indices)") from None
        if idx.numel() == 0:
            raise ValueError("invalid value for rows: empty (explain at least one row, or use predict())")
        if int(idx.min()) < 0 or int(idx.max()) >= b:
            raise ValueError(f"invalid value for rows: index out of range 0..{b - 1}")
        return idx.to(device)


def run_context_method(ctx: CamContext) -> torch.Tensor:
    """A spec that is not a plain pure call: ``aug_smooth`` around it, else its ``fn(ctx)`` (a
    pure method without ``aug_smooth`` never comes here)."""
    spec = ctx.spec
    if spec.get("aug_smooth"):
        from .methods.smoothing import aug_smooth
        return aug_smooth(ctx)
    return spec.method.fn(ctx)


def _replays(spec: MethodSpec) -> bool:
    """Whether a spec runs suffix forwards on this engine call's own forward."""
    return "suffix" in spec.method.needs and not spec.get("aug_smooth")


def _resize(maps: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """(R, K, h, w) maps bilinearly resized (rows mixing layer- and input-resolution methods)."""
    return F.interpolate(maps.flatten(0, 1)[:, None], size=tuple(int(s) for s in size),
                         mode="bilinear", align_corners=False)[:, 0].reshape(*maps.shape[:2], *size)


def _same(out: Any, full: Any, task: "Task", n: int) -> bool:
    """Whether the first ``n`` rows of two task outputs agree (replay check)."""
    def leaves(o: Any) -> Optional[list[torch.Tensor]]:
        return _tensor_leaves(o if not hasattr(o, "__dataclass_fields__") else
                              [getattr(o, f) for f in o.__dataclass_fields__])
    a, b = leaves(task.select(out, torch.arange(n))), leaves(full)
    if a is None or b is None or len(a) != len(b):
        return False
    for u, v in zip(a, b):
        if u.shape != v.shape or not torch.allclose(u.double(), v.double(), rtol=1e-4,
                                                     atol=1e-5 * max(1.0, float(v.abs().max()) if v.numel() else 1.0)):
            return False
    return True


def _wide(targets: Any) -> bool:
    """Targets given with a K dimension ((B, K) classes, (B, K, D) reference embeddings): the
    result keeps it even for K == 1."""
    return isinstance(targets, torch.Tensor) and \
        targets.dim() == (3 if targets.is_floating_point() else 2)

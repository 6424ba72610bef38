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
)
from .layouts import LAYOUTS, Layout, Reshape
from .methods import Cost, Method, get_method
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
                    rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """d scores / d activation, raw layout: (R, ...) for (R,) scores — one backward for the whole
    batch, rows of a batch being independent in eval mode — and (K, R, ...) for (R, K) scores —
    one batched backward (``is_grads_batched=True``, one target per gradient). ``rows`` (R,):
    the explained rows' indices in ``activation`` (None: all, R == B)."""
    if scores.dim() == 1:
        (g_raw,) = torch.autograd.grad(scores.sum(), activation)
        return g_raw if rows is None else g_raw.index_select(0, rows)
    k = scores.shape[1]
    eye = torch.eye(k, dtype=scores.dtype, device=scores.device)
    grad_out = eye[:, None, :].expand(k, scores.shape[0], k)
    (g_raw,) = torch.autograd.grad(scores, activation, grad_outputs=grad_out, is_grads_batched=True)
    return g_raw if rows is None else g_raw.index_select(1, rows)


def cam_step(scores: torch.Tensor, activation: torch.Tensor,
             methods: Sequence[Union[str, Method]], to_nchw: Callable[[torch.Tensor], torch.Tensor],
             rows: Optional[torch.Tensor] = None) -> CamStep:
    """The one CAM step of the pure methods, shared by :class:`CamEngine` and the traced ONNX
    graph: target scores -> gradient to the layer -> NCHW -> method(s).

    Args:
        scores: (R,) or (R, K) target scores of the explained rows (a task's
            :meth:`camserve.tasks.Task.scores`); they must depend on ``activation``.
        activation: the target layer's captured output (the leaf of
            :func:`camserve.layers.capture_layer` in ``"track-grad"`` mode), B >= R rows.
        methods: pure methods (names or :class:`camserve.methods.Method`) — functions
            ``f(A, G)``; one map per method in the result. The backward runs only when one of them
            needs gradients.
        to_nchw: the layer's layout function (:func:`camserve.layers.nchw_converter`).
        rows: (R,) indices of the explained rows in ``activation`` (None: all of them, R == B).

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
    check_scores(scores, None)
    fns = [get_method(m) for m in methods]
    impure = [m.name for m in fns if not m.pure]
    if impure:
        raise ValueError(f"invalid value for methods: {impure[0]!r} is not a function of "
                         f"(activations, gradients); run it through CamEngine")
    a_sel = activation.detach() if rows is None else activation.detach().index_select(0, rows)
    A = to_nchw(a_sel)
    G = None
    if any(m.gradients for m in fns):
        g_raw = layer_gradients(scores, activation, rows)
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


class CamContext:
    """What a method that is not a pure ``f(A, G)`` works with, for the R explained rows of one
    engine call: ``x`` their inputs (R, 3, H, W), ``targets`` (:class:`camserve.tasks.TargetBatch`),
    ``activations`` (R, C, h, w) NCHW, ``gradients`` ((R, K, C, h, w), computed on first use),
    ``options`` the method's options, and two ways to score perturbed copies — both run under
    ``torch.no_grad`` in chunks of at most ``chunk`` rows and return (N, K) target scores:

    * :meth:`forward_scores` — whole-model forwards of perturbed inputs;
    * :meth:`suffix_scores` — the network after the target layer on perturbed activations.

    ``owner`` (N,) says which explained row each perturbed copy belongs to (its targets are used).
    A method run this way returns (R, K, h, w) maps (or (R, 1, h, w): the same map for every
    target).
    """

    def __init__(self, engine: "CamEngine", x: torch.Tensor, targets: TargetBatch,
                 activations: torch.Tensor, gradients: Callable[[], torch.Tensor],
                 options: Optional[Mapping[str, Any]] = None, chunk: int = 64) -> None:
        self.engine = engine
        self.x = x
        self.targets = targets
        self.activations = activations
        self._gradients = gradients
        self._grad_value: Optional[torch.Tensor] = None
        self.options = dict(options or {})
        self.chunk = max(1, int(chunk))

    @property
    def gradients(self) -> torch.Tensor:
        """(R, K, C, h, w): d score / d activations per target (one backward, on first use)."""
        if self._grad_value is None:
            self._grad_value = self._gradients()
        return self._grad_value

    @property
    def task(self) -> "Task":
        return self.engine.task

    def _chunks(self, n: int) -> Iterator[slice]:
        for i in range(0, n, self.chunk):
            yield slice(i, min(n, i + self.chunk))

    def forward_scores(self, x: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """(N, K) target scores of the model on inputs ``x`` (N, 3, H, W); row ``n`` is scored for
        the targets of explained row ``owner[n]``."""
        parts = []
        with torch.no_grad():
            for sl in self._chunks(int(x.shape[0])):
                out = self.task.output(self.engine.model(x[sl]))
                parts.append(self.task.scores(out, self.targets.select(owner[sl])))
        return torch.cat(parts)

    def suffix_scores(self, activations: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """(N, K) target scores when the target layer outputs ``activations`` (N, C, h, w, NCHW)
        instead of its own; row ``n`` continues from explained row ``owner[n]``'s input."""
        eng = self.engine
        parts = []
        with torch.no_grad():
            for sl in self._chunks(int(activations.shape[0])):
                x = self.x.index_select(0, owner[sl].to(self.x.device))
                with capture_layer(eng.model, eng._layer, "replace", activations=activations[sl],
                                   reshape=eng.reshape, layout=eng.layout or "nchw"):
                    out = self.task.output(eng.model(x))
                parts.append(self.task.scores(out, self.targets.select(owner[sl])))
        return torch.cat(parts)


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
        chunk: rows per perturbed forward for methods that run more forwards.
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
        self._layer_name: Optional[str] = None
        self._layer: Optional[nn.Module] = None
        if target_layer is not None:
            self._layer_name, self._layer = resolve_layer(model, target_layer)
        self._to_nchw = nchw_converter(self._layer_name, layout, reshape)

    @property
    def layer_name(self) -> Optional[str]:
        """Dotted name of the target layer (None until auto-located)."""
        return self._layer_name

    # -- public API ---------------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, targets: Any = None,
                 method: Union[str, Sequence[str]] = "gradcam",
                 rows: Optional[Sequence[int]] = None,
                 options: Optional[Mapping[str, Any]] = None) -> CamResult:
        """Explain a batch ``x`` (B, 3, H, W). See the module docstring.

        ``targets``: what the task's :meth:`~camserve.tasks.Task.as_targets` takes — for
        classification None (top-1), an int, B ints, a LongTensor (B,) or (B, K); for every task a
        :class:`camserve.tasks.TargetBatch`, or a callable of the detached output returning one
        (targets that depend on the prediction, still from the one forward).
        ``method``: one method for every explained row, or one per explained row (rows sharing a
        gradient method share the one backward). ``rows``: indices of the rows to explain
        (default: all); the forward covers the whole batch, only these rows' scores are
        differentiated; targets, maps, activations and gradients of the result have ``len(rows)``
        rows while ``output`` covers the whole batch. ``options``: method options (e.g.
        ``max_channels``).
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
        names = self._parse_methods(method, n_rows)
        if self._layer is None or (self.reshape is None and self.layout not in ("nchw", "nhwc")):
            self._choose(tuple(int(s) for s in x.shape[-2:]))

        with capture_layer(self.model, self._layer, "track-grad") as cap:
            out = self.task.output(self.model(x))
        activation = cap.output
        sel = out if idx is None else self.task.select(out, idx)
        detached = self.task.detach(sel)
        if callable(targets) and not isinstance(targets, (torch.Tensor, TargetBatch)):
            targets = targets(detached)
        tb = self.task.as_targets(targets, detached).to(activation.device)
        if tb.rows != n_rows:
            raise ValueError(f"invalid value for targets: {tb.rows} rows of targets for "
                             f"{n_rows} explained rows")
        scores = self.task.scores(sel, tb)
        check_scores(scores, self._layer_name)
        rows_t = None if idx is None else idx.to(activation.device)
        cams, A, G = self._maps(x if idx is None else x.index_select(0, idx), scores, activation,
                                tb, names, rows_t, options)
        one = tb.k == 1 and not isinstance(targets, TargetBatch) and not _wide(targets)
        return CamResult(output=self.task.detach(out), target_batch=tb,
                         cams=cams[:, 0] if one else cams, activations=A,
                         gradients=None if G is None else (G[:, 0] if one else G),
                         layer=self._layer_name or "", methods=tuple(names))

    def predict(self, x: torch.Tensor) -> Any:
        """The task's output only, under ``torch.inference_mode()`` (no hook, no graph)."""
        with torch.inference_mode():
            return self.task.output(self.model(x))

    def cost(self, method: str, options: Optional[Mapping[str, Any]] = None) -> Cost:
        """What ``method`` costs per target on this engine's layer (:class:`camserve.methods.Cost`);
        needs the layer's channel count, known after the first call."""
        return get_method(method).cost(self.channels or 0, dict(options or {}))

    # -- internals ----------------------------------------------------------------------------
    def _maps(self, x: torch.Tensor, scores: torch.Tensor, activation: torch.Tensor,
              tb: TargetBatch, names: Sequence[str], rows: Optional[torch.Tensor],
              options: Optional[Mapping[str, Any]]) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(R, K, h, w) maps, NCHW activations and (R, K, C, h, w) gradients (None when unused)
        of the explained rows, each row by its own method."""
        a_sel = activation.detach() if rows is None else activation.detach().index_select(0, rows)
        A = self._to_nchw(a_sel)
        self.channels = int(A.shape[1])
        methods = {n: get_method(n) for n in dict.fromkeys(names)}
        grads: list[Optional[torch.Tensor]] = [None]

        def gradients() -> torch.Tensor:
            if grads[0] is None:
                g_raw = layer_gradients(scores, activation, rows)  # (K, R, ...)
                grads[0] = torch.stack([self._to_nchw(g) for g in g_raw.unbind(0)], dim=1)
            return grads[0]

        k = tb.k
        if all(m.pure for m in methods.values()) and any(m.gradients for m in methods.values()):
            if k == 1:  # one plain backward, as cheap as it gets
                (g,) = torch.autograd.grad(scores[:, 0].sum(), activation)
                g = g if rows is None else g.index_select(0, rows)
                grads[0] = self._to_nchw(g)[:, None]
            else:
                gradients()
        cams: Optional[torch.Tensor] = None
        for name, m in methods.items():
            sel = [i for i, n in enumerate(names) if n == name]
            if len(sel) == len(names):
                part = self._run_method(m, x, tb, A, gradients, options, None)
            else:
                ix = torch.tensor(sel, device=A.device)
                part = self._run_method(m, x.index_select(0, ix.to(x.device)), tb.select(ix),
                                        A.index_select(0, ix), lambda ix=ix: gradients().index_select(0, ix),
                                        options, ix)
            part = _per_target(part, k)
            if cams is None and len(sel) == len(names):
                cams = part
            else:
                if cams is None:
                    cams = part.new_zeros((len(names), *part.shape[1:]))
                cams[torch.tensor(sel, device=cams.device)] = part.to(cams.dtype)
        assert cams is not None  # at least one row is explained (rows are never empty)
        return cams.detach(), A, grads[0]

    def _run_method(self, m: Method, x: torch.Tensor, tb: TargetBatch, A: torch.Tensor,
                    gradients: Callable[[], torch.Tensor], options: Optional[Mapping[str, Any]],
                    ix: Optional[torch.Tensor]) -> torch.Tensor:
        if m.pure:
            return m.fn(A[:, None], gradients() if m.gradients else None)
        ctx = CamContext(self, x, tb, A, gradients, options, self.chunk)
        return m.fn(ctx)

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
    def _parse_methods(method: Union[str, Sequence[str]], n: int) -> list[str]:
        names = [method] * n if isinstance(method, str) else list(method)
        if len(names) != n:
            raise ValueError(f"invalid value for method: {len(names)} methods for {n} explained rows")
        return [get_method(m).name for m in names]

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


def _wide(targets: Any) -> bool:
    """Targets given with a K dimension ((B, K) classes, (B, K, D) reference embeddings): the
    result keeps it even for K == 1."""
    return isinstance(targets, torch.Tensor) and \
        targets.dim() == (3 if targets.is_floating_point() else 2)

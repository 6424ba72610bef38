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
from typing import Callable, NamedTuple, Optional, Sequence, Union

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
from .methods import CamMethod, get_method
from .sources import logits_of

log = logging.getLogger(__name__)

Targets = Union[None, int, Sequence[int], torch.Tensor]
TargetsArg = Union[Targets, Callable[[torch.Tensor], Targets]]


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


def check_logits(logits: object, layer: Optional[str]) -> None:
    """The model's output must be (B, classes) logits that depend on the captured ``layer``."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError("the model must return logits of shape (B, classes)")
    if not logits.requires_grad:
        raise LayerError(layer, "the output does not depend on it")


class CamStep(NamedTuple):
    """What :func:`cam_step` returns: NCHW ``activations`` and ``gradients`` (with a K dimension
    after the batch for (R, K) targets) and one map per method, in order."""

    activations: torch.Tensor
    gradients: torch.Tensor
    cams: tuple[torch.Tensor, ...]


def cam_step(logits: torch.Tensor, activation: torch.Tensor, targets: torch.Tensor,
             methods: Sequence[Union[str, CamMethod]], to_nchw: Callable[[torch.Tensor], torch.Tensor],
             rows: Optional[torch.Tensor] = None) -> CamStep:
    """The one CAM step, shared by :class:`CamEngine` and the traced ONNX graph: score gather ->
    gradient to the layer -> NCHW -> method(s).

    Args:
        logits: (R, classes), the scores of the rows to explain; they must depend on ``activation``.
        activation: the target layer's captured output (the leaf of
            :func:`camserve.layers.capture_layer` in ``"track-grad"`` mode), B >= R rows.
        targets: (R,) or (R, K) class indices (already resolved: no negatives).
        methods: method names or functions ``f(A, G)``; one map per method in the result.
        to_nchw: the layer's layout function (:func:`camserve.layers.nchw_converter`).
        rows: (R,) indices of the explained rows in ``activation`` (None: all of them, R == B).

    (R,) targets take one backward for the whole batch (rows are independent in eval mode); (R, K)
    targets take one batched backward (``is_grads_batched=True``, one target per gradient).

    Example::

        >>> from camserve.layers import capture_layer, nchw_converter
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        ...                     nn.Linear(4, 5)).eval()
        >>> with capture_layer(net, "0") as cap:
        ...     logits = net(torch.rand(2, 3, 8, 8))
        >>> A, G, (cam,) = cam_step(logits, cap.output, torch.tensor([1, 4]), ["gradcam"],
        ...                         nchw_converter("0", "nchw"))
        >>> tuple(G.shape), tuple(cam.shape)
        ((2, 4, 6, 6), (2, 6, 6))
    """
    check_logits(logits, None)
    fns = [m if callable(m) else get_method(m) for m in methods]
    a_sel = activation.detach() if rows is None else activation.detach().index_select(0, rows)
    A = to_nchw(a_sel)
    if targets.dim() == 1:
        score = logits.gather(1, targets[:, None]).sum()
        (g_raw,) = torch.autograd.grad(score, activation)
        if rows is not None:
            g_raw = g_raw.index_select(0, rows)
        G = to_nchw(g_raw)
        cams = tuple(fn(A, G) for fn in fns)
    else:
        k = targets.shape[1]
        scores = logits.gather(1, targets)  # (R, K)
        eye = torch.eye(k, dtype=scores.dtype, device=scores.device)
        grad_out = eye[:, None, :].expand(k, scores.shape[0], k)  # one target per batched grad
        (g_raw,) = torch.autograd.grad(scores, activation, grad_outputs=grad_out,
                                       is_grads_batched=True)
        if rows is not None:
            g_raw = g_raw.index_select(1, rows)
        G = torch.stack([to_nchw(g) for g in g_raw.unbind(0)], dim=1)  # (R, K, C, h, w)
        cams = tuple(fn(A[:, None], G) for fn in fns)
    return CamStep(A, G, cams)


@dataclass
class CamResult:
    """What one engine call returns.

    ``logits`` (B, classes); ``targets`` (B,) or (B, K) long; ``cams`` (B, h, w) or (B, K, h, w),
    raw (post-ReLU, not normalised); ``activations`` (B, C, h, w) and ``gradients`` (like ``cams``
    with a channel dimension) in NCHW; ``layer`` the target layer's dotted name; ``method``.
    """

    logits: torch.Tensor
    targets: torch.Tensor
    cams: torch.Tensor
    activations: torch.Tensor
    gradients: torch.Tensor
    layer: str
    method: str

    def heatmaps(self, size: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """CAMs upsampled to ``size`` (H, W) and min-max normalised per map to [0, 1]."""
        return normalize_maps(self.cams, size)

    def heatmaps_uint8(self, size: Optional[tuple[int, int]] = None) -> torch.Tensor:
        """Like :meth:`heatmaps`, as uint8 0..255 on the same device (copy to host once)."""
        return to_uint8(self.heatmaps(size))


class CamEngine:
    """Grad-CAM family engine over a classifier ``model`` (B, 3, H, W) -> (B, classes).

    Args:
        model: the classifier; the engine never changes it (mode, requires_grad, hooks, .grad).
        target_layer: dotted module name, a submodule, or None to auto-locate on the first call.
        layout: the layer output layout (``"nchw"``, ``"nhwc"``, ``"tokens"``); default: decided
            on the first call by :func:`camserve.families.choose_layer` (family rules, a second
            probe at another input size; never guessed from the shape alone).
        reshape: a callable mapping the layer output to (B, C, h, w) (e.g.
            ``LoadedModel.reshape``); overrides ``layout``.

    The model's output may be a tensor, a tuple/list (first item), a mapping or an object with
    ``logits`` (:func:`camserve.sources.logits_of`).
    """

    def __init__(self, model: nn.Module, target_layer: LayerSpec = None, *,
                 layout: Optional[Layout] = None, reshape: Optional[Reshape] = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"invalid value for model: expected an nn.Module, got {type(model).__name__}")
        if layout is not None and layout not in LAYOUTS:
            raise ValueError(f"invalid value for layout: {layout!r} (known: {', '.join(LAYOUTS)})")
        self.model = model
        self.layout = layout
        self.reshape = reshape
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
    def __call__(self, x: torch.Tensor, targets: TargetsArg = None, method: str = "gradcam",
                 rows: Optional[Sequence[int]] = None) -> CamResult:
        """Explain a batch ``x`` (B, 3, H, W). See the module docstring.

        ``rows``: indices of the rows to explain (default: all). The forward pass covers the whole
        batch, but only these rows' scores are differentiated; ``targets`` then refers to these
        rows, and ``targets``, ``cams``, ``activations`` and ``gradients`` of the result have
        ``len(rows)`` rows while ``logits`` covers the whole batch (one forward for a batch that
        mixes rows to explain with rows to predict). ``targets`` may also be a callable that maps
        the (selected rows') detached logits to targets, for targets that depend on the prediction.
        """
        fn = get_method(method)
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
        if self._layer is None or (self.reshape is None and self.layout not in ("nchw", "nhwc")):
            self._choose(tuple(int(s) for s in x.shape[-2:]))

        idx = self._parse_rows(rows, x.shape[0], x.device)
        with capture_layer(self.model, self._layer, "track-grad") as cap:
            logits = logits_of(self.model(x))
        activation = cap.output
        check_logits(logits, self._layer_name)
        sel = logits if idx is None else logits.index_select(0, idx.to(logits.device))
        if callable(targets) and not isinstance(targets, torch.Tensor):
            targets = targets(sel.detach())
        tgt = self._parse_targets(targets, sel)
        step = cam_step(sel, activation, tgt, [fn], self._to_nchw,
                        rows=None if idx is None else idx.to(activation.device))
        return CamResult(logits=logits.detach(), targets=tgt, cams=step.cams[0].detach(),
                         activations=step.activations, gradients=step.gradients.detach(),
                         layer=self._layer_name or "", method=method.lower())

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits only, under ``torch.inference_mode()`` (no hook, no graph)."""
        with torch.inference_mode():
            return logits_of(self.model(x))

    # -- internals ----------------------------------------------------------------------------
    def _choose(self, size: tuple[int, int]) -> None:
        """First call: locate the layer and/or decide its reshape (never from a shape alone)."""
        from .families import FamilyError, choose_layer

        try:
            choice = choose_layer(self.model, size, self._layer_name, self.layout)
        except FamilyError as exc:
            raise LayerError(self._layer_name, str(exc)) from None
        if self._layer is None:
            self._layer_name, self._layer = resolve_layer(self.model, choice.name)
        self.reshape = choice.reshape
        self._to_nchw = nchw_converter(self._layer_name, self.layout, self.reshape)

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

    @staticmethod
    def _parse_targets(targets: Targets, logits: torch.Tensor) -> torch.Tensor:
        b, n_cls = logits.shape
        dev = logits.device
        if targets is None:
            t = logits.detach().argmax(dim=1)
        elif isinstance(targets, bool):
            raise ValueError(f"invalid value for targets: {targets!r}")
        elif isinstance(targets, int):
            t = torch.full((b,), targets, dtype=torch.long, device=dev)
        elif isinstance(targets, torch.Tensor):
            if targets.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
                raise ValueError(f"invalid value for targets: integer tensor expected, got {targets.dtype}")
            t = targets.to(device=dev, dtype=torch.long)
            if t.dim() == 0:
                t = t.expand(b)
        else:
            try:
                t = torch.tensor([int(v) for v in targets], dtype=torch.long, device=dev)
            except (TypeError, ValueError):
                raise ValueError(f"invalid value for targets: {targets!r} (None, an int, a sequence "
                                 f"of B ints, or a LongTensor (B,) or (B, K))") from None
        if t.dim() not in (1, 2) or t.shape[0] != b:
            raise ValueError(f"invalid value for targets: shape {tuple(t.shape)} does not fit a batch "
                             f"of {b} (expected (B,) or (B, K))")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n_cls):
            raise ValueError(f"invalid value for targets: class index out of range 0..{n_cls - 1}")
        return t

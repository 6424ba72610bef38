"""Target layers: resolve by dotted name, locate automatically, and the one capture hook.

:func:`resolve_layer` finds a layer by dotted name (or module); :func:`locate_layer` asks
:mod:`camserve.families` for the layer a practitioner would choose; :func:`capture_layer` is the
one forward hook on a target layer in camserve: the engine, the traced ONNX graph, auto-location
and the exporter's verification all go through it. :func:`nchw_converter` is
:func:`camserve.layouts.converter` (the one conversion of layer outputs to ``(B, C, h, w)``) with
the layer named in its errors; :class:`LayerError` is the error of a layer that cannot be used.
Which layer each family gets: docs/byom.md.

Example::

    >>> import torch, torchvision
    >>> m = torchvision.models.resnet18(num_classes=4).eval()
    >>> resolve_layer(m, "layer4")[0]
    'layer4'
    >>> with capture_layer(m, "layer4", mode="record") as cap, torch.no_grad():
    ...     _ = m(torch.rand(1, 3, 64, 64))
    >>> tuple(cap.output.shape)
    (1, 512, 2, 2)
"""
from __future__ import annotations

import itertools
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Optional, Union

import torch
from torch import nn

from .layouts import Layout, LayoutError, Reshape, converter

log = logging.getLogger(__name__)

LayerSpec = Union[str, nn.Module, None]
CaptureMode = Literal["track-grad", "record", "replace"]
CAPTURE_MODES: tuple[str, ...] = ("track-grad", "record", "replace")
_SEQUENCE = itertools.count()


class LayerError(ValueError):
    """A target layer that cannot be used: unknown, not a tensor, shared, not spatial, not run.

    ``layer`` is the dotted name as given (or ``None`` when the layer was to be located) and
    ``reason`` what is wrong, without the ``invalid value for target_layer`` prefix, so a caller can
    re-key the message (e.g. as ``handler.target_layer``) without parsing it::

        >>> err = LayerError("layer9", "no 'layer9' in the model; known: conv1")
        >>> str(err)
        "invalid value for target_layer: 'layer9' (no 'layer9' in the model; known: conv1)"
        >>> err.message_for("handler.target_layer")
        "invalid value for handler.target_layer: 'layer9' (no 'layer9' in the model; known: conv1)"
    """

    def __init__(self, layer: Optional[str], reason: str) -> None:
        self.layer = layer
        self.reason = reason
        super().__init__(self.message_for("target_layer"))

    def message_for(self, key: str) -> str:
        """The message with ``key`` as the name of the setting."""
        shown = repr(self.layer if self.layer is None or len(self.layer) <= 100
                     else self.layer[:100] + "...")
        return f"invalid value for {key}: {shown} ({self.reason})"


def _known_children(module: nn.Module) -> str:
    names = [n for n, _ in module.named_children()]
    if len(names) > 12:
        names = names[:6] + ["..."] + names[-5:]
    return ", ".join(names) if names else "none"


def resolve_layer(model: nn.Module, layer: Union[str, nn.Module]) -> tuple[str, nn.Module]:
    """Return ``(dotted name, module)`` for ``layer``: a dotted name or a submodule of ``model``."""
    if isinstance(layer, nn.Module):
        for name, mod in model.named_modules():
            if mod is layer:
                return name, mod
        raise LayerError(type(layer).__name__, "the module given is not part of the model")
    if not isinstance(layer, str) or not layer:
        raise LayerError(repr(layer)[:100], "expected a dotted module name, an nn.Module of the "
                         "model, or None to locate it automatically")
    parent: nn.Module = model
    walked: list[str] = []
    for part in layer.split("."):
        child = parent._modules.get(part) if hasattr(parent, "_modules") else None
        if child is None:
            where = ".".join(walked) or "the model"
            raise LayerError(layer, f"no {part!r} in {where}; known: {_known_children(parent)}")
        walked.append(part)
        parent = child
    return layer, parent


def nchw_converter(layer: Optional[str], layout: Optional[Layout] = None,
                   reshape: Optional[Reshape] = None) -> Reshape:
    """:func:`camserve.layouts.converter` for ``layer``: its :class:`~camserve.layouts.LayoutError`
    (no layout known, or a tensor that does not fit) becomes a :class:`LayerError` naming the layer.

    Example::

        >>> from camserve.layouts import TokenGrid
        >>> f = nchw_converter("blocks.3", reshape=TokenGrid(1, (7, 7)))
        >>> tuple(f(torch.zeros(2, 50, 8)).shape)  # 1 class token + 7 x 7 patches
        (2, 8, 7, 7)
        >>> nchw_converter("head", "nchw")(torch.zeros(2, 8))
        Traceback (most recent call last):
        ...
        camserve.layers.LayerError: invalid value for target_layer: 'head' (it gives output of shape (2, 8), which is not a spatial map in layout 'nchw'; choose an earlier layer, or pass layout= / reshape=)
    """
    convert = converter(layout, reshape)

    def convert_layer(t: torch.Tensor) -> torch.Tensor:
        try:
            return convert(t)
        except LayoutError as exc:
            raise LayerError(layer, exc.reason) from None

    return convert_layer


def write_nchw(raw: torch.Tensor, activations: torch.Tensor, as_nchw: Reshape,
               name: Optional[str] = None) -> torch.Tensor:
    """Write NCHW ``activations`` into ``raw`` (a layer output of the same rows, changed in
    place and returned) through its NCHW view ``as_nchw(raw)``, so entries outside the view (a
    ViT's class token) keep their values; a :class:`LayerError` when the shapes differ or the NCHW
    form is not a view."""
    view = as_nchw(raw)
    if view.shape != activations.shape:
        raise LayerError(name, f"activations of shape {tuple(activations.shape)} do not fit its "
                               f"output {tuple(view.shape)}")
    view.copy_(activations.to(view.dtype))
    if not torch.equal(as_nchw(raw), view):
        raise LayerError(name, "cannot replace its output: its NCHW form is not a view")
    return raw


@dataclass
class LayerCapture:
    """What :func:`capture_layer` saw: the layer's ``name`` and ``module``, the ``mode``, and the
    captured ``outputs`` (one per call of the layer; at most one unless ``once=False``)."""

    name: str
    module: nn.Module
    mode: str
    outputs: list[torch.Tensor] = field(default_factory=list)
    #: a process-wide sequence number per captured output: the execution order across captures
    order: list[int] = field(default_factory=list)

    @property
    def output(self) -> torch.Tensor:
        """The captured output: in ``track-grad`` mode the leaf that gradients are taken to, in
        ``record`` mode the layer's output, in ``replace`` mode the output as pinned. A
        :class:`LayerError` when the layer did not run."""
        if not self.outputs:
            raise LayerError(self.name, "it did not run in the forward pass")
        return self.outputs[0]


@contextmanager
def capture_layer(model: nn.Module, layer: Union[str, nn.Module], mode: CaptureMode = "track-grad",
                  *, activations: Optional[torch.Tensor] = None, layout: Optional[Layout] = None,
                  reshape: Optional[Reshape] = None, once: bool = True, tensors_only: bool = True,
                  raw: bool = False) -> Iterator[LayerCapture]:
    """Hold the one forward hook on ``layer`` for the duration of the block; it is removed on exit,
    also after an exception, and grad mode is restored.

    Modes:

    * ``"track-grad"`` (the engine, the traced CAM graph): the block runs with autograd off; the
      hook detaches the layer's output, ``a = out.detach().requires_grad_()``, keeps ``a``, hands
      a clone on (later in-place ops cannot change ``a``) and switches autograd on for the rest of
      the network. Nothing before the layer records a graph; ``torch.autograd.grad(score, a)``
      afterwards stops at the layer.
    * ``"record"`` (auto-location, verification): keeps the output as is and hands a clone on;
      grad mode is left alone.
    * ``"replace"`` (verification at given activations): the output is replaced by a copy whose
      NCHW view (``reshape``, else :func:`camserve.layouts.to_nchw` with ``layout``; default ``nchw``) holds
      ``activations`` (N, C, h, w), so token and channels-last layers keep their other entries
      (e.g. a ViT class token); with ``raw=True`` ``activations`` are in the layer's own layout
      and replace the whole output.

    The layer must return a tensor and run once per forward; otherwise the hook raises
    :class:`LayerError`. ``once=False`` captures every call; ``tensors_only=False`` lets other
    outputs pass untouched (both for auto-location, which watches every module).

    Example::

        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        ...                     nn.Linear(4, 2))
        >>> with capture_layer(net, "0") as cap:
        ...     logits = net(torch.rand(1, 3, 8, 8))
        >>> a = cap.output
        >>> a.requires_grad, logits.requires_grad, torch.autograd.grad(logits[0, 1], a)[0].shape
        (True, True, torch.Size([1, 4, 6, 6]))
        >>> sum(len(m._forward_hooks) for m in net.modules())
        0
    """
    if mode not in CAPTURE_MODES:
        raise ValueError(f"invalid value for mode: {mode!r} (allowed: {', '.join(CAPTURE_MODES)})")
    if (activations is None) == (mode == "replace"):
        raise ValueError("invalid value for activations: give them for mode='replace' and only then")
    name, module = resolve_layer(model, layer)
    cap = LayerCapture(name, module, mode)
    as_nchw = nchw_converter(name, layout or "nchw", reshape)

    def hook(_mod: nn.Module, _inp: Any, out: Any) -> Optional[torch.Tensor]:
        if not isinstance(out, torch.Tensor):
            if not tensors_only:
                return None
            raise LayerError(name, f"it returns {type(out).__name__}, not a tensor; choose another layer")
        if once and cap.outputs:
            raise LayerError(name, "it runs more than once per forward (a shared module); choose a "
                                   "module that runs once")
        cap.order.append(next(_SEQUENCE))
        if mode == "track-grad":
            a = out.detach().requires_grad_(True)
            cap.outputs.append(a)
            torch.set_grad_enabled(True)  # the suffix records a graph; the prefix did not
            return a.clone()
        if mode == "record":
            cap.outputs.append(out)
            return out.clone()  # later in-place ops must not alter the recorded tensor
        assert activations is not None
        if raw:
            if activations.shape != out.shape:
                raise LayerError(name, f"activations of shape {tuple(activations.shape)} do not fit "
                                       f"its output {tuple(out.shape)}")
            new = activations.to(out.dtype)
        else:
            new = write_nchw(out.detach().clone(), activations, as_nchw, name)
        cap.outputs.append(new)
        return new

    prev = torch.is_grad_enabled()
    handle = module.register_forward_hook(hook)
    try:
        if mode == "track-grad":
            torch.set_grad_enabled(False)
        yield cap
    finally:
        handle.remove()
        torch.set_grad_enabled(prev)


def locate_layer(model: nn.Module, probe: torch.Tensor) -> str:
    """The target layer :func:`camserve.families.locate` chooses for inputs of ``probe``'s size
    (the last spatial feature map before global pooling, a ViT's last pre-attention norm, ...).

    Example::

        >>> import torchvision
        >>> locate_layer(torchvision.models.resnet18(num_classes=3).eval(), torch.rand(1, 3, 64, 64))
        'layer4'
    """
    from .families import FamilyError, locate

    try:
        return locate(model, tuple(int(s) for s in probe.shape[-2:])).name
    except FamilyError as exc:
        raise LayerError(None, str(exc)) from None

"""Target layers: resolve by dotted name, locate automatically, and bring outputs to NCHW.

Convolutional layers give ``(B, C, h, w)`` maps. Transformers do not: ViT blocks give tokens
``(B, N, C)`` (a class token followed by an ``s × s`` grid of patches) and torchvision's Swin stages
give channels-last maps ``(B, h, w, C)``. :func:`detect_layout` recognises the three and
:func:`to_nchw` reshapes them, so every CAM method sees ``(..., C, h, w)``.

Example::

    >>> import torch, torchvision
    >>> m = torchvision.models.resnet18(num_classes=4).eval()
    >>> resolve_layer(m, "layer4")[0]
    'layer4'
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Literal, Union

import torch
from torch import nn

log = logging.getLogger(__name__)

Layout = Literal["nchw", "nhwc", "tokens"]
LAYOUTS: tuple[str, ...] = ("nchw", "nhwc", "tokens")
Reshape = Callable[[torch.Tensor], torch.Tensor]
LayerSpec = Union[str, nn.Module, None]


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
        raise ValueError("invalid value for target_layer: the module given is not part of the model")
    if not isinstance(layer, str) or not layer:
        raise ValueError(
            f"invalid value for target_layer: {layer!r} (expected a dotted module name, an "
            f"nn.Module of the model, or None to locate it automatically)"
        )
    parent: nn.Module = model
    walked: list[str] = []
    for part in layer.split("."):
        child = parent._modules.get(part) if hasattr(parent, "_modules") else None
        if child is None:
            where = ".".join(walked) or "the model"
            raise ValueError(
                f"invalid value for target_layer: {layer!r} (no {part!r} in {where}; "
                f"known: {_known_children(parent)})"
            )
        walked.append(part)
        parent = child
    return layer, parent


def detect_layout(shape: torch.Size | tuple[int, ...]) -> Layout | None:
    """Guess the layout of a layer output from its shape; None if it is not a spatial map.

    * 4-D ``(B, h, w, C)`` with ``h == w != C`` is channels-last (Swin); other 4-D is NCHW;
    * 3-D ``(B, N, C)`` with ``N`` or ``N - 1`` a perfect square ``>= 4`` is a token grid.
    Maps of a single position (1×1 after global pooling) are not spatial.
    """
    if len(shape) == 4:
        if shape[1] == shape[2] and shape[3] != shape[1]:
            return "nhwc" if shape[1] * shape[2] > 1 else None
        return "nchw" if shape[2] * shape[3] > 1 else None
    if len(shape) == 3:
        return "tokens" if _grid_side(shape[1]) is not None else None
    return None


def _grid_side(n_tokens: int) -> int | None:
    for extra in (0, 1):
        side = math.isqrt(max(n_tokens - extra, 0))
        if side >= 2 and side * side == n_tokens - extra:
            return side
    return None


def to_nchw(t: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Reshape a layer output of the given layout to ``(B, C, h, w)`` (a view where possible)."""
    if layout == "nchw":
        if t.dim() != 4:
            raise ValueError(f"layer output of shape {tuple(t.shape)} is not NCHW")
        return t
    if layout == "nhwc":
        if t.dim() != 4:
            raise ValueError(f"layer output of shape {tuple(t.shape)} is not NHWC")
        return t.permute(0, 3, 1, 2)
    if layout == "tokens":
        if t.dim() != 3:
            raise ValueError(f"layer output of shape {tuple(t.shape)} is not (B, tokens, C)")
        b, n, c = t.shape
        side = _grid_side(n)
        if side is None:
            raise ValueError(
                f"cannot arrange {n} tokens on a square grid; pass reshape= to CamEngine"
            )
        grid = t[:, n - side * side:, :]  # drop leading class/extra tokens
        return grid.reshape(b, side, side, c).permute(0, 3, 1, 2)
    raise ValueError(f"invalid value for layout: {layout!r} (known: {', '.join(LAYOUTS)})")


def locate_layer(model: nn.Module, probe: torch.Tensor) -> str:
    """Auto-locate the target layer: the last module (in execution order) whose output is a spatial
    map or token grid and whose class-score gradient varies over more than one position.

    The gradient condition skips layers the head cannot see spatially, such as the final
    LayerNorm of a ViT whose head reads only the class token.
    """
    records: list[tuple[str, torch.Tensor, Layout]] = []
    handles = []

    def make_hook(name: str):
        def hook(_mod: nn.Module, _inp, out):
            if isinstance(out, torch.Tensor) and out.requires_grad:
                layout = detect_layout(out.shape)
                if layout is not None:
                    records.append((name, out, layout))
                    return out.clone()  # later in-place ops must not alter the recorded tensor
            return None

        return hook

    for name, mod in model.named_modules():
        if name:
            handles.append(mod.register_forward_hook(make_hook(name)))
    try:
        with torch.enable_grad():
            x = probe[:1].detach().clone().requires_grad_(True)
            logits = model(x)
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                raise ValueError("auto-locate needs a model whose output is logits (B, classes)")
            if not records:
                raise ValueError("auto-locate found no layer with a spatial output; pass target_layer")
            score = logits[0, logits[0].argmax()]
            grads = torch.autograd.grad(score, [r[1] for r in records], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    for (name, _out, layout), g in zip(reversed(records), reversed(grads)):
        if g is None:
            continue
        g_map = to_nchw(g, layout).abs().sum(dim=1)
        if int((g_map > 0).sum()) > 1:
            log.info("camserve: auto-located target layer %r (%s output %s)", name, layout,
                     tuple(_out.shape))
            return name
    raise ValueError("auto-locate found no spatial layer the prediction depends on; pass target_layer")

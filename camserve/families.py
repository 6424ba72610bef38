"""Auto-locate the target layer a practitioner would choose, per model family, and decide its
layout (never from a shape alone).

:func:`locate` returns a :class:`LayerChoice`: the dotted layer name, its layout, a ``reshape``
to ``(B, C, h, w)`` from :mod:`camserve.layouts` (for ``CamEngine(model, name,
reshape=choice.reshape)``), the map grid and the reason, and logs one line saying so;
:func:`choose_layer` is the one rule for a layer named (or not) in the config. The manual, with
the layer each family gets: docs/byom.md.

* **ViT / DeiT / BEiT / EVA** (timm ``VisionTransformer``/``Eva``/``Beit``, torchvision
  ``VisionTransformer``, Hugging Face ViT/DeiT/BEiT-style): the token output of the last block's
  pre-attention norm (timm ``blocks[-1].norm1``, torchvision ``encoder.layers[-1].ln_1``,
  Hugging Face ``...layers[-1].layernorm_before``). Prefix tokens (class, distillation, register)
  are dropped using the model's own count (timm ``num_prefix_tokens``; Hugging Face: the class
  token, plus the distillation token and register tokens its embeddings hold); the grid comes
  from the patch embedding and the input size, so non-square inputs work.
* **Swin-style channels-last stages**: timm ``layers[-1]`` and torchvision ``features[-1]``
  (``(B, h, w, C)``), Hugging Face Swin's final ``layernorm`` (tokens ``(B, h*w, C)``; the grid
  from the patch size and the patch merges).
* **torchvision MaxViT**: the last block ``blocks[-1]`` (``(B, C, h, w)``: its window and grid
  attention partition and restore channels-first maps inside each layer). The model is built for
  one input size, so the second probe of the generic search cannot run; the family says NCHW.
* **Segmentation models**: the backbone's last stage (torchvision FCN / DeepLabV3 / LR-ASPP:
  the last stage their ``IntermediateLayerGetter`` keeps), the encoder's last stage (Hugging Face
  SegFormer), the last feature map of an ``AutoBackbone`` (Hugging Face UperNet) — not the
  head's last map.
* **Everything else** (convolutional nets, hybrid/mobile families such as MobileViT, FastViT,
  EfficientViT): the last 4-D feature map before global pooling whose class-score gradient varies
  over more than one position. Its layout is not guessed from its shape: a second probe at
  another input size tells which dimensions are spatial (they change with the input, channels do
  not), so ``(B, 64, 64, 32)`` from a 256×128 input is NCHW and an attention tensor
  ``(B, heads, N, d)`` is no feature map at all. Where the model refuses a second size, the
  module type decides (convolution/normalisation/pooling outputs are NCHW) or the layer is
  refused with a request for ``layout:``.

Where nothing fits, :class:`FamilyError` lists the last candidates with their shapes.

Example::

    >>> import torch, torchvision
    >>> m = torchvision.models.resnet18(num_classes=3).eval()
    >>> c = locate(m, (64, 96))
    >>> c.name, c.layout, c.grid
    ('layer4', 'nchw', (2, 3))
"""
from __future__ import annotations

import logging
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
from torch import nn

from .layouts import (GRIDLESS_LAYOUTS, ChannelsFirst, ChannelsLast, LayoutError, Reshape, TokenGrid,
                      check_layout, grid_of, reshape_for, square_grid)

log = logging.getLogger(__name__)

#: A scalar probe score of a model's raw output (a task's ``probe_score``): the prediction whose
#: gradient tells which feature maps matter
Score = Callable[[Any], torch.Tensor]
_NCHW_TYPES = (nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.pooling._MaxPoolNd,
               nn.modules.pooling._AvgPoolNd, nn.ConvTranspose2d)
_SKIP_TYPES = (nn.Identity, nn.Dropout, nn.Dropout2d)


class FamilyError(ValueError):
    """No layer of the model fits (or the one found is ambiguous); the message lists candidates."""


@dataclass
class LayerChoice:
    """The located layer: ``name`` (dotted), ``layout`` (``nchw``/``nhwc``/``tokens``), ``reshape``
    to ``(B, C, h, w)``, ``grid`` (h, w) of the map at the probed input size, ``shape`` of the
    layer output there, ``family`` and ``reason``."""

    name: str
    layout: str
    reshape: Reshape
    grid: tuple[int, int]
    shape: tuple[int, ...]
    family: str
    reason: str


# -- helpers ------------------------------------------------------------------------------------

@contextmanager
def _probing(model: nn.Module) -> Iterator[None]:
    """Eval mode for the probes (BatchNorm statistics must not move), every module's own
    ``training`` flag restored afterwards: the caller's model is left as it was."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def _probe_shape(model: nn.Module, name: str, size: tuple[int, int]) -> tuple[int, ...]:
    """Shape of ``name``'s output on a zero input of ``size`` (one forward, no grad)."""
    shapes: list[tuple[int, ...]] = []

    def hook(_m: nn.Module, _i: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            shapes.append(tuple(out.shape))

    dev = _device(model)
    handle = _module(model, name).register_forward_hook(hook)
    try:
        with torch.no_grad(), _probing(model):
            model(torch.zeros(1, 3, *size, device=dev, dtype=_dtype(model)))
    finally:
        handle.remove()
    if len(shapes) != 1:
        raise FamilyError(f"layer {name!r} ran {len(shapes)} times with a tensor output in one "
                          f"forward (expected once); pass target_layer")
    return shapes[0]


def _device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _dtype(model: nn.Module) -> torch.dtype:
    p = next(iter(model.parameters()), None)
    return p.dtype if p is not None and p.is_floating_point() else torch.float32


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        return int(v[0]), int(v[-1])
    return int(v), int(v)


def _token_choice(model: nn.Module, name: str, prefix: int, grid: tuple[int, int],
                  size: tuple[int, int], family: str, why: str) -> LayerChoice:
    shape = _probe_shape(model, name, size)
    gh, gw = grid
    if len(shape) != 3 or shape[1] != prefix + gh * gw:
        raise FamilyError(f"{family}: layer {name!r} gives {shape}, expected (B, {prefix} + {gh}x{gw} "
                          f"tokens, C) at input {size[0]}x{size[1]}; pass target_layer and layout")
    return LayerChoice(name, "tokens", TokenGrid(prefix, grid), grid, shape, family,
                       f"{why}; {prefix} prefix token(s) dropped, grid {gh}x{gw} from the patch "
                       f"embedding")


def _channels_last_choice(name: str, shape: tuple[int, ...], family: str, why: str) -> LayerChoice:
    return LayerChoice(name, "nhwc", ChannelsLast(), grid_of(shape, "nhwc"), shape, family, why)


# -- families -----------------------------------------------------------------------------------

def _timm_vit(model: nn.Module, size: tuple[int, int]) -> Optional[LayerChoice]:
    blocks = getattr(model, "blocks", None)
    pe = getattr(model, "patch_embed", None)
    prefix = getattr(model, "num_prefix_tokens", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or pe is None or prefix is None \
            or len(blocks) == 0 or not hasattr(blocks[-1], "norm1"):
        return None
    if getattr(pe, "dynamic_img_size", False) and hasattr(pe, "dynamic_feat_size"):
        grid = tuple(int(g) for g in pe.dynamic_feat_size(size))
    else:
        grid = tuple(int(g) for g in pe.grid_size)
    name = f"blocks.{len(blocks) - 1}.norm1"
    return _token_choice(model, name, int(prefix), grid, size, f"timm {type(model).__name__}",
                         "ViT-style: the last block's pre-attention norm")


def _is_torchvision(model: nn.Module, class_name: str) -> bool:
    import torchvision.models  # a core dependency, imported when a rule needs it

    return isinstance(model, getattr(torchvision.models, class_name))


def _tv_vit(model: nn.Module, size: tuple[int, int]) -> Optional[LayerChoice]:
    if not _is_torchvision(model, "VisionTransformer"):
        return None
    p = int(model.patch_size)
    last = list(model.encoder.layers.named_children())[-1][0]  # encoder_layer_11
    name = f"encoder.layers.{last}.ln_1"
    return _token_choice(model, name, 1, (size[0] // p, size[1] // p), size,
                         "torchvision VisionTransformer",
                         "ViT-style: the last encoder block's pre-attention norm")


def _hf_config(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    return cfg if cfg is not None and hasattr(cfg, "model_type") else None


def _hf_vit(model: nn.Module, size: tuple[int, int]) -> Optional[LayerChoice]:
    cfg = _hf_config(model)
    if cfg is None or str(cfg.model_type).startswith(("swin", "donut")) or not hasattr(cfg, "patch_size"):
        return None
    norms = [n for n, _ in model.named_modules() if n.endswith("layernorm_before")]
    emb = next((m for n, m in model.named_modules() if hasattr(m, "cls_token")
                and hasattr(m, "patch_embeddings")), None)
    if not norms or emb is None:
        return None
    prefix = 1
    if getattr(emb, "distillation_token", None) is not None:
        prefix += 1
    reg = getattr(emb, "register_tokens", None)
    if isinstance(reg, torch.Tensor):
        prefix += int(reg.shape[1])
    ph, pw = _pair(cfg.patch_size)
    return _token_choice(model, norms[-1], prefix, (size[0] // ph, size[1] // pw), size,
                         f"Hugging Face {type(model).__name__}",
                         "ViT-style: the last layer's layernorm_before")


def _timm_swin(model: nn.Module, size: tuple[int, int]) -> Optional[LayerChoice]:
    layers = getattr(model, "layers", None)
    if getattr(model, "output_fmt", None) != "NHWC" or not isinstance(layers, (nn.Sequential, nn.ModuleList)):
        return None
    name = f"layers.{len(layers) - 1}"
    shape = _probe_shape(model, name, size)
    if len(shape) != 4:
        return None
    return _channels_last_choice(name, shape, f"timm {type(model).__name__}",
                                 "Swin-style channels-last stages (output_fmt NHWC): the final stage")


def _tv_swin(model: nn.Module, size: tuple[int, int]) -> Optional[LayerChoice]:
    if not _is_torchvision(model, "SwinTransformer"):
        return None
    name = f"features.{len(model.features) - 1}"
    return _channels_last_choice(name, _probe_shape(model, name, size), "torchvision SwinTransformer",
                                 "Swin-style channels-last stages: the final stage")


def _hf_swin(model: nn.Module, size: tuple[int, int]) -> Optional[LayerChoice]:
    cfg = _hf_config(model)
    if cfg is None or not str(cfg.model_type).startswith(("swin", "donut")):
        return None
    names = [n for n, _ in model.named_modules() if n.endswith("layernorm")
             and n.count(".") <= 1 and "encoder" not in n]
    if not names:
        return None
    ph, pw = _pair(cfg.patch_size)
    gh, gw = math.ceil(size[0] / ph), math.ceil(size[1] / pw)
    for _ in range(len(cfg.depths) - 1):  # each patch merge halves the grid (padding odd sides)
        gh, gw = math.ceil(gh / 2), math.ceil(gw / 2)
    shape = _probe_shape(model, names[0], size)
    if len(shape) != 3 or shape[1] != gh * gw:
        raise FamilyError(f"Hugging Face {type(model).__name__}: {names[0]!r} gives {shape}, "
                          f"expected (B, {gh}x{gw}, C); pass target_layer and layout")
    return LayerChoice(names[0], "tokens", TokenGrid(0, (gh, gw)), (gh, gw), shape,
                       f"Hugging Face {type(model).__name__}",
                       f"Swin-style: the final stage's layernorm output, grid {gh}x{gw} from the "
                       f"patch size and {len(cfg.depths) - 1} patch merges")


def _tv_maxvit(model: nn.Module, size: tuple[int, int]) -> Optional[LayerChoice]:
    if not _is_torchvision(model, "MaxVit"):
        return None
    name = f"blocks.{len(model.blocks) - 1}"
    shape = _probe_shape(model, name, size)
    if len(shape) != 4:
        raise FamilyError(f"torchvision MaxVit: {name!r} gives {shape}, expected (B, C, h, w); pass "
                          f"target_layer and layout")
    return LayerChoice(name, "nchw", ChannelsFirst(), grid_of(shape, "nchw"), shape,
                       "torchvision MaxVit", "MaxViT blocks are channels-first (the attention "
                       "partitions are restored inside each layer): the last block")


FAMILY_RULES: tuple[Callable[[nn.Module, tuple[int, int]], Optional[LayerChoice]], ...] = (
    _timm_vit, _tv_vit, _hf_vit, _timm_swin, _tv_swin, _hf_swin, _tv_maxvit)


# -- the generic search (conv nets and hybrids) -------------------------------------------------

@dataclass
class _Rec:
    name: str
    module: nn.Module
    seen: Any          # the tensor the module returned (identity tells aliases apart)
    kept: torch.Tensor  # a clone handed on, so later in-place ops cannot change it
    calls: int = 1


def _record(model: nn.Module, x: torch.Tensor, grad: bool) -> tuple[list[_Rec], Any]:
    recs: dict[str, _Rec] = {}
    order: list[str] = []
    handles = []

    def make(name: str, mod: nn.Module):
        def hook(_m: nn.Module, _i: Any, out: Any):
            if name in recs:
                recs[name].calls += 1
                return None
            if not isinstance(out, torch.Tensor) or out.dim() not in (3, 4):
                return None
            kept = out.clone() if grad else out
            recs[name] = _Rec(name, mod, out, kept)
            order.append(name)
            return kept if grad else None
        return hook

    for name, mod in model.named_modules():
        if name and not isinstance(mod, _SKIP_TYPES):
            handles.append(mod.register_forward_hook(make(name, mod)))
    try:
        with torch.set_grad_enabled(grad), _probing(model):
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return [recs[n] for n in order], out


def _layout_from_probes(a: tuple[int, ...], b: Optional[tuple[int, ...]], mod: nn.Module,
                        probed: bool) -> Optional[str]:
    """``nchw``/``nhwc`` from the shapes at two input sizes (``probed``), else from the module
    type (``ambiguous`` when that does not tell); None when not a feature map."""
    if len(a) != 4:
        return None
    if probed:
        if b is None or len(b) != 4:
            return None
        changed = [a[i] != b[i] for i in (1, 2, 3)]
        if changed == [False, True, True]:
            return "nchw"
        if changed == [True, True, False]:
            return "nhwc"
        return None
    leaf = mod  # no second probe: decide from the module type (or its last submodule's) only
    while len(leaf._modules) and not isinstance(leaf, _NCHW_TYPES):
        leaf = list(leaf._modules.values())[-1]
    return "nchw" if isinstance(leaf, _NCHW_TYPES) else "ambiguous"


def _aliases(recs: list[_Rec], r: _Rec) -> list[_Rec]:
    """``r`` and every module that returned the same tensor (a container returning its last
    child's output), transitively."""
    group = [r]
    ids = {id(r.seen), id(r.kept)}
    grown = True
    while grown:
        grown = False
        for q in recs:
            if q not in group and (id(q.seen) in ids or id(q.kept) in ids):
                group.append(q)
                ids |= {id(q.seen), id(q.kept)}
                grown = True
    return group


def _prefer(recs: list[_Rec], group: list[_Rec]) -> _Rec:
    """Among modules returning the same tensor, the shallowest, unless it is a container of
    stages at different resolutions (timm ``stages``): then its last aliased child."""
    group = sorted(group, key=lambda r: r.name.count("."))
    names = {r.name for r in group}
    pick = group[0]
    while True:
        kids = [r for r in recs if r.name.startswith(pick.name + ".")
                and r.name.count(".") == pick.name.count(".") + 1]
        shapes = {tuple(r.seen.shape) for r in kids if r.seen.dim() == 4}
        alias = [r for r in kids if r.name in names]
        if len(shapes) >= 2 and alias:
            pick = alias[-1]
        else:
            return pick


def _candidates_text(recs: Sequence[_Rec], n: int = 6) -> str:
    tail = list(recs)[-n:]
    return ", ".join(f"{r.name} {tuple(r.seen.shape)}" for r in tail) or "none"


def _generic(model: nn.Module, size: tuple[int, int], second: Optional[tuple[int, int]],
             score: Optional[Score] = None, within: str = "") -> LayerChoice:
    """The last spatial map the probe ``score`` (default: the top-1 logit) depends on at more
    than one position, among the modules under ``within`` (a dotted prefix; "" for all)."""
    from .sources import logits_of

    dev, dt = _device(model), _dtype(model)
    x = torch.zeros(1, 3, *size, device=dev, dtype=dt)
    x.normal_(generator=torch.Generator(device=dev).manual_seed(0))
    x.requires_grad_(True)
    recs, out = _record(model, x, grad=True)
    if score is None:
        logits = logits_of(out)
        if logits.dim() != 2:
            raise FamilyError(f"auto-locate needs logits (B, classes); the model gives "
                              f"{tuple(logits.shape)}")
    shapes_b: dict[str, tuple[int, ...]] = {}
    if second is not None:
        try:
            recs_b, _ = _record(model, torch.zeros(1, 3, *second, device=dev, dtype=dt), grad=False)
            shapes_b = {r.name: tuple(r.seen.shape) for r in recs_b}
        except Exception as e:  # a model fixed to one input size refuses another one
            log.debug("second probe at %s failed (%s); deciding layouts from module types", second, e)
            second = None
    once = [r for r in recs if r.calls == 1 and r.kept.requires_grad
            and (not within or r.name.startswith(within + "."))]
    maps: list[tuple[_Rec, str]] = []
    for r in once:
        lay = _layout_from_probes(tuple(r.seen.shape), shapes_b.get(r.name), r.module,
                                 probed=second is not None)
        if lay is not None:
            maps.append((r, lay))
    if not maps:
        raise FamilyError(f"auto-locate found no 4-D feature map; pass target_layer (last layer "
                          f"outputs: {_candidates_text(recs)})")
    if score is None:
        probe = logits[0, logits[0].argmax()]
    else:
        try:
            probe = score(out)
        except (TypeError, ValueError) as exc:  # the task cannot read this output
            raise FamilyError(f"auto-locate cannot score the model's output: {exc}") from None
    grads = torch.autograd.grad(probe, [r.kept for r, _ in maps], allow_unused=True)
    for (r, lay), g in zip(reversed(maps), reversed(grads)):
        if g is None:
            continue
        if lay == "ambiguous":
            if int((g.abs().sum(dim=1) > 0).sum()) > 1:
                raise FamilyError(f"layer {r.name!r} gives {tuple(r.seen.shape)} and the model accepts "
                                  f"no second input size to tell channels from positions; set "
                                  f"layout: (nchw or nhwc) and target_layer")
            continue
        t = reshape_for(lay)(g)
        if t.shape[-1] * t.shape[-2] <= 1 or int((t.abs().sum(dim=1) > 0).sum()) <= 1:
            continue
        pick = _prefer(recs, _aliases(recs, r))
        shape = tuple(pick.seen.shape)
        how = (f"a second probe at {second[0]}x{second[1]} shows which dimensions are spatial"
               if second else "its module type says channels-first")
        return LayerChoice(pick.name, lay, reshape_for(lay), grid_of(shape, lay), shape,
                           type(model).__name__,
                           f"the last spatial feature map before global pooling ({lay}; {how})")
    raise FamilyError(f"auto-locate found no feature map the prediction depends on at more than "
                      f"one position; pass target_layer (candidates: "
                      f"{', '.join(f'{r.name} {tuple(r.seen.shape)}' for r, _ in maps[-6:])})")


# -- dense prediction: the backbone's (encoder's) last stage, not the head's last map -------------

def _tv_segmentation(model: nn.Module, size: tuple[int, int],
                     score: Optional[Score]) -> Optional[LayerChoice]:
    """torchvision FCN, DeepLabV3, LR-ASPP: the backbone keeps its stages up to the last one it
    returns (an ``IntermediateLayerGetter``), so its last child is the last stage."""
    try:
        from torchvision.models._utils import IntermediateLayerGetter
    except ImportError:  # pragma: no cover
        return None
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, IntermediateLayerGetter) or not len(backbone):
        return None
    name = f"backbone.{list(backbone.named_children())[-1][0]}"
    shape = _probe_shape(model, name, size)
    if len(shape) != 4:
        return None
    return LayerChoice(name, "nchw", ChannelsFirst(), (shape[2], shape[3]), shape,
                       f"torchvision {type(model).__name__}",
                       "segmentation: the backbone's last stage")


def _hf_segformer(model: nn.Module, size: tuple[int, int],
                  score: Optional[Score]) -> Optional[LayerChoice]:
    """Hugging Face SegFormer: the encoder's last stage — ``segformer.stages[-1]``, whose output
    is the (B, C, h, w) map the decode head reads (transformers 5; before it,
    ``segformer.encoder.layer_norm[-1]``, tokens on the last overlapping patch grid)."""
    seg = getattr(model, "segformer", None)
    if seg is None or not hasattr(model, "decode_head"):
        return None
    family = f"Hugging Face {type(model).__name__}"
    stages = getattr(seg, "stages", None)
    if isinstance(stages, nn.ModuleList) and len(stages):
        name = f"segformer.stages.{len(stages) - 1}"
        shape = _probe_shape(model, name, size)
        if len(shape) == 4:
            return LayerChoice(name, "nchw", ChannelsFirst(), (shape[2], shape[3]), shape, family,
                               "SegFormer: the encoder's last stage")
    norms = getattr(getattr(seg, "encoder", None), "layer_norm", None)
    if not isinstance(norms, nn.ModuleList) or not len(norms):
        return None
    last = len(norms) - 1
    proj = _probe_shape(model, f"segformer.encoder.patch_embeddings.{last}.proj", size)
    return _token_choice(model, f"segformer.encoder.layer_norm.{last}", 0, (proj[2], proj[3]),
                         size, family, "SegFormer: the encoder's last stage (its final layer norm)")


def _hf_backbone(model: nn.Module, size: tuple[int, int],
                 score: Optional[Score]) -> Optional[LayerChoice]:
    """Hugging Face heads over an ``AutoBackbone`` (UperNet): the last feature map of the
    backbone the prediction depends on (the generic search, inside the backbone)."""
    backbone = getattr(model, "backbone", None)
    if _hf_config(model) is None or not hasattr(model, "decode_head") \
            or not hasattr(backbone, "out_features"):
        return None
    return _generic(model, size, second_size(size), score, within="backbone")


DENSE_RULES: tuple[Callable[[nn.Module, tuple[int, int], Optional[Score]], Optional[LayerChoice]], ...] = (
    _tv_segmentation, _hf_segformer, _hf_backbone)


def second_size(size: tuple[int, int]) -> tuple[int, int]:
    """The second probe size: each side grown by 32 (a multiple of common strides), capped."""
    return size[0] + 32, size[1] + 64


def locate(model: nn.Module, input_size: Sequence[int] | int = 224,
           score: Optional[Score] = None) -> LayerChoice:
    """Choose the target layer of ``model`` for inputs of ``input_size`` (H, W); see the module
    docstring for the rules. ``score``: the probe score of the model's raw output (a task's
    :meth:`~camserve.tasks.Task.probe_score`; default the top-1 logit). The probes run in eval
    mode; the model is left as it was (modes restored, hooks removed, BatchNorm statistics
    untouched). Logs one line with the layer, grid and reason."""
    from .tasks.detectors import detector_layer

    size = _pair(input_size)
    choice: Optional[LayerChoice] = detector_layer(model, size)
    for rule in () if choice is not None else FAMILY_RULES:
        choice = rule(model, size)
        if choice is not None:
            break
    if choice is None:
        for rule in DENSE_RULES:
            choice = rule(model, size, score)
            if choice is not None:
                break
    if choice is None:
        choice = _generic(model, size, second_size(size), score)
    log.info("camserve: target layer %r, grid %dx%d, %s output %s (%s: %s)", choice.name,
             choice.grid[0], choice.grid[1], choice.layout, choice.shape, choice.family, choice.reason)
    return choice


def probe_layout(model: nn.Module, layer: str, input_size: Sequence[int] | int = 224
                 ) -> tuple[str, tuple[int, int]]:
    """Layout (``nchw``/``nhwc``) and grid of a named 4-D layer, decided by probing two input
    sizes (the dimensions that follow the input are spatial), else by module type; a
    :class:`FamilyError` asking for ``layout:`` where neither tells (torchvision MaxViT, built
    for one input size: its stem, blocks and block layers are channels-first by its family). For ``target_layer`` given
    by name (the case ``detect_layout`` used to guess from the shape alone).

    Example::

        >>> import torchvision
        >>> probe_layout(torchvision.models.resnet18(num_classes=2).eval(), "layer1", (256, 128))
        ('nchw', (64, 32))
    """
    size = _pair(input_size)
    a = _probe_shape(model, layer, size)
    if len(a) != 4:
        raise FamilyError(f"layer {layer!r} gives {a}, not a 4-D map; for tokens set layout: tokens "
                          f"(or leave target_layer empty to locate it)")
    try:
        b: Optional[tuple[int, ...]] = _probe_shape(model, layer, second_size(size))
        probed = True
    except FamilyError:
        raise
    except Exception:  # noqa: BLE001 - a model fixed to one input size
        b, probed = None, False
    lay = _layout_from_probes(a, b, model.get_submodule(layer), probed)
    if lay not in GRIDLESS_LAYOUTS and _is_torchvision(model, "MaxVit") \
            and re.fullmatch(r"stem|blocks\.\d+(\.layers\.\d+)?", layer):
        lay = "nchw"  # a fixed-size model: its stem, blocks and block layers are channels-first
    if lay not in GRIDLESS_LAYOUTS:
        raise FamilyError(f"cannot tell the layout of layer {layer!r} (output {a}); set layout: "
                          f"nchw or nhwc")
    return lay, grid_of(a, lay)


def choose_layer(model: nn.Module, input_size: Sequence[int] | int = 224,
                 target_layer: Optional[str] = None, layout: Optional[str] = None,
                 score: Optional[Score] = None) -> LayerChoice:
    """The one rule for the target layer and its reshape, for ``handler.target_layer`` and
    ``handler.layout`` (both optional): no name -> :func:`locate`; a name -> its layout from
    ``layout`` when given, else decided without guessing from the shape: 4-D maps by
    :func:`probe_layout`, tokens by the model's family (the prefix count and grid of its patch
    embedding; any block of a ViT has the located layer's token layout). Where nothing tells,
    a :class:`FamilyError` asks for ``layout:``. ``score``: see :func:`locate`.

    Example::

        >>> import torchvision
        >>> m = torchvision.models.resnet18(num_classes=2).eval()
        >>> c = choose_layer(m, (256, 128), "layer1")
        >>> c.layout, c.grid
        ('nchw', (64, 32))
    """
    size = _pair(input_size)
    if target_layer is None:
        return locate(model, size, score)
    from .tasks.detectors import detector_layer

    model.get_submodule(target_layer)  # AttributeError names the missing part
    try:
        check_layout(layout)
    except LayoutError as exc:
        raise FamilyError(str(exc)) from None
    det = detector_layer(model, size, target_layer) if layout in (None, "nchw") else None
    if det is not None:  # a known detector: its own resize makes two probes meaningless
        return det
    shape = _probe_shape(model, target_layer, size)
    if layout in GRIDLESS_LAYOUTS:
        if len(shape) != 4:
            raise FamilyError(f"layer {target_layer!r} gives {shape}, not a 4-D map for layout "
                              f"{layout!r}")
        return LayerChoice(target_layer, layout, reshape_for(layout), grid_of(shape, layout), shape,
                           "", f"layout {layout} from the config")
    if len(shape) == 4 and layout is None:
        lay, grid = probe_layout(model, target_layer, size)
        return LayerChoice(target_layer, lay, reshape_for(lay), grid, shape, "",
                           f"named in the config; {lay} by probing two input sizes, by module type or "
                                                          f"by family")
    if len(shape) == 3:
        fam = next((c for c in (rule(model, size) for rule in FAMILY_RULES[:3]) if c is not None), None)
        if fam is None:
            fam = next((c for c in (rule(model, size) for rule in FAMILY_RULES[5:]) if c is not None), None)
        if fam is not None and isinstance(fam.reshape, TokenGrid) and fam.shape[1] == shape[1]:
            return LayerChoice(target_layer, "tokens", fam.reshape, fam.grid, shape, fam.family,
                               f"named in the config; token layout of the {fam.family} patch grid")
        guess = square_grid(shape[1]) if layout == "tokens" else None
        if guess is not None:
            prefix, side = guess
            return LayerChoice(target_layer, "tokens", TokenGrid(prefix, (side, side)), (side, side),
                               shape, "", f"layout tokens from the config: {prefix} leading token(s) "
                                          f"and a {side}x{side} grid")
    raise FamilyError(f"cannot tell how layer {target_layer!r} (output {shape} at input "
                      f"{size[0]}x{size[1]}) maps to (B, C, h, w); set layout: (nchw, nhwc or tokens) "
                      f"or leave target_layer empty to locate a layer")

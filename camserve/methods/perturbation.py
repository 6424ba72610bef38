"""Perturbation methods: scores of masked inputs or perturbed layer outputs, in bounded chunks.

Every one scores through the task (:meth:`camserve.tasks.Task.scores` via
:class:`camserve.engine.CamContext`), so each serves every task, and all K targets of a row come
from the same forwards. Forwards run in chunks of at most ``CamEngine.chunk`` copies.

* ScoreCAM (Wang et al., 2020; pytorch-grad-cam's formula): channel ``k``'s mask is its map
  upsampled to the input (bilinear, corners aligned) and min-max normalised; its weight the softmax
  over channels of the score of ``input x mask``. A constant channel's mask is all zero: every
  constant channel of every row scores the same all-zero input, computed once.
* SS-CAM (Wang et al., 2020) and IS-CAM (Naidu et al., 2020), torchcam's formulas: masks normalised
  at the layer's resolution then upsampled; SS-CAM adds Gaussian noise to the mask (``samples``
  draws, ``std``; one draw per mask from a generator seeded with ``seed``: torchcam's noise for the same
  seed when H·W is a multiple of 16),
  IS-CAM integrates ``samples`` scaled copies.
* AblationCAM (Desai & Ramaswamy, 2020; pytorch-grad-cam's formula): the drop of the score when a
  channel is set to 0 (or to the row's minimum - 1e7 when its minimum is not 0), on the layers after
  the target layer only. The channel is ablated in the layer's own layout (a ViT's class token too).
* ReciproCAM (Byun & Lee, 2022) and ViT-ReciproCAM (2023), OpenVINO XAI's formulas: the score of
  the layer output kept at one position (``kernel=point``) or a 3x3 Gaussian around it
  (``kernel=gaussian``), the rest zero, and (``cls_token``) the class token kept; the map is those
  scores, one per position (not ReLU'd).

``max_channels`` (ScoreCAM, SS-CAM, IS-CAM, AblationCAM): only the most varied channels of each row
are scored; the others weigh 0.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch
import torch.nn.functional as F

from .registry import MAX_CHANNELS, Cost, LayerSize, Option, float_in, int_in, one_of, parse_bool, register_method

if TYPE_CHECKING:
    from ..engine import CamContext

SAMPLES_SS = Option("samples", 35, int_in(1, 1000), "noisy masks per channel")
SAMPLES_IS = Option("samples", 10, int_in(1, 1000), "integration steps per channel")
STD = Option("std", 2.0, float_in(0.0, 1e3), "standard deviation of the mask noise")
SEED = Option("seed", 0, int_in(0, 2**63 - 1), "seed of the noise")


def scored_channels(size: LayerSize, options: Mapping[str, Any]) -> int:
    """How many channels a row scores: all, or ``max_channels``."""
    m = int(options.get("max_channels") or 0)
    return size.channels if m <= 0 else min(size.channels, m)


def _forwards(per_channel: str = "") -> Any:
    def cost(size: LayerSize, k: int, options: Mapping[str, Any]) -> Cost:
        n = scored_channels(size, options) * (int(options[per_channel]) if per_channel else 1)
        return Cost(forwards=float(n))
    return cost


def select_channels(A: torch.Tensor, max_channels: int) -> torch.Tensor:
    """(R, C) bool: the channels each row scores — all, or the ``max_channels`` of largest spatial
    variance."""
    r, c = A.shape[:2]
    keep = torch.ones(r, c, dtype=torch.bool, device=A.device)
    if 0 < max_channels < c:
        var = A.flatten(2).var(dim=-1, unbiased=False)
        top = var.topk(max_channels, dim=1).indices
        keep = torch.zeros_like(keep).scatter_(1, top, True)
    return keep


def weighted_sum(weights: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """ReLU(sum_c weights[r, k, c] A[r, c]) -> (R, K, h, w)."""
    return torch.relu(torch.einsum("rkc,rchw->rkhw", weights.to(A.dtype), A))


def _softmax_weights(S: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Softmax over the scored channels of (R, K, C) scores (the others weigh 0)."""
    S = S.masked_fill(~keep[:, None, :], float("-inf"))
    return torch.softmax(S, dim=-1)


def _mask_scores(ctx: "CamContext", masks_of: Any, pairs: torch.Tensor, skip_zero: bool,
                 scale: float = 1.0, noise: Optional[torch.Generator] = None,
                 std: float = 0.0) -> torch.Tensor:
    """(R, K, C) scores of ``x[r] * masks_of(r, c) * scale`` for every (r, c) of ``pairs``
    (R, C bool), chunked. ``skip_zero``: constant channels (an all-zero mask) score the all-zero
    input once. ``noise``: Gaussian noise (``std``) added to each mask, drawn for every (r, c) in
    order so the stream does not depend on which channels are scored."""
    x = ctx.x
    R, C = pairs.shape
    K = ctx.targets.k
    S = torch.zeros(R, K, C, dtype=torch.float64, device=x.device)
    const = torch.zeros_like(pairs)
    if skip_zero:
        flat = ctx.activations.flatten(2)
        const = (flat.amax(dim=-1) == flat.amin(dim=-1)) & pairs
        if bool(const.any()):
            zero = ctx.broadcast_scores(torch.zeros_like(x[:1]))  # (R, K)
            S += (const[:, None, :] * zero[:, :, None]).to(S.dtype)
    todo = pairs & ~const
    flat_idx = torch.arange(R * C, device=x.device)
    live = todo.flatten()
    for sl in ctx.chunks(R * C) if noise is not None else [slice(0, R * C)]:
        idx = flat_idx[sl]
        eps = None
        if noise is not None:  # one draw per mask: the stream does not depend on the chunks
            eps = torch.stack([torch.randn(*x.shape[-2:], generator=noise)
                               for _ in range(int(idx.numel()))]) * std
        idx_live = idx[live[sl]]
        if eps is not None:
            eps = eps[live[sl].cpu()]
        for sub in ctx.chunks(int(idx_live.numel())):
            ii = idx_live[sub]
            r, c = ii // C, ii % C
            m = masks_of(r, c)  # (N, H, W)
            if eps is not None:
                m = m + eps[sub].to(device=m.device, dtype=m.dtype)
            xin = x.index_select(0, r) * m[:, None]
            if scale != 1.0:
                xin = scale * xin
            s = ctx.forward_scores(xin, r)  # (N, K)
            S[r, :, c] += s.to(S.dtype)
    return S


def _masks_pgc(ctx: "CamContext"):
    """pytorch-grad-cam's ScoreCAM masks: upsample (corners aligned), then min-max (+1e-8)."""
    A = ctx.activations
    size = tuple(int(s) for s in ctx.x.shape[-2:])

    def masks(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        a = A[r, c][:, None]
        up = F.interpolate(a, size=size, mode="bilinear", align_corners=True)[:, 0]
        flat = up.flatten(1)
        lo, hi = flat.amin(dim=1)[:, None, None], flat.amax(dim=1)[:, None, None]
        return (up - lo) / (hi - lo + 1e-8)
    return masks


def _masks_torchcam(ctx: "CamContext"):
    """torchcam's masks: min-max (+1e-8) at the layer's resolution, then upsample."""
    A = ctx.activations
    flat = A.flatten(2)
    lo = flat.amin(dim=-1)[..., None, None]
    shifted = A - lo
    norm = shifted / (shifted.flatten(2).amax(dim=-1)[..., None, None] + 1e-8)
    size = tuple(int(s) for s in ctx.x.shape[-2:])

    def masks(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return F.interpolate(norm[r, c][:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return masks


@register_method("scorecam", needs=("activations", "forward"), cost=_forwards(), options=(MAX_CHANNELS,))
def scorecam(ctx: "CamContext") -> torch.Tensor:
    r"""Score-CAM: :math:`\mathrm{ReLU}(\sum_k w_k A_k)`, :math:`w = \mathrm{softmax}_k\,
    s(x \odot M_k)` with :math:`M_k` channel k upsampled and min-max normalised (Wang et al., 2020)."""
    keep = select_channels(ctx.activations, ctx.options["max_channels"])
    S = _mask_scores(ctx, _masks_pgc(ctx), keep, skip_zero=True)
    return weighted_sum(_softmax_weights(S, keep), ctx.activations)


@register_method("sscam", needs=("activations", "forward"), cost=_forwards("samples"),
                 options=(MAX_CHANNELS, SAMPLES_SS, STD, SEED))
def sscam(ctx: "CamContext") -> torch.Tensor:
    r"""SS-CAM: Score-CAM with the mean score over ``samples`` noisy masks
    :math:`M_k + \delta`, :math:`\delta \sim N(0, \mathrm{std}^2)` (Wang et al., 2020; torchcam)."""
    o = ctx.options
    keep = select_channels(ctx.activations, o["max_channels"])
    gen = torch.Generator().manual_seed(int(o["seed"]))
    masks = _masks_torchcam(ctx)
    S = sum(_mask_scores(ctx, masks, keep, skip_zero=False, noise=gen, std=float(o["std"]))
            for _ in range(int(o["samples"])))
    return weighted_sum(_softmax_weights(S / int(o["samples"]), keep), ctx.activations)


@register_method("iscam", needs=("activations", "forward"), cost=_forwards("samples"),
                 options=(MAX_CHANNELS, SAMPLES_IS))
def iscam(ctx: "CamContext") -> torch.Tensor:
    r"""IS-CAM: Score-CAM with the mean score over ``samples`` integration steps,
    :math:`x \odot M_k` scaled by :math:`c_i = \sum_{j \le i} j / N` (Naidu et al., 2020; torchcam)."""
    o = ctx.options
    n = int(o["samples"])
    keep = select_channels(ctx.activations, o["max_channels"])
    masks = _masks_torchcam(ctx)
    S, coeff = None, 0.0
    for i in range(n):
        coeff += (i + 1) / n
        part = _mask_scores(ctx, masks, keep, skip_zero=True, scale=coeff)
        S = part if S is None else S + part
    assert S is not None
    return weighted_sum(_softmax_weights(S / n, keep), ctx.activations)


def channel_axis(ctx: "CamContext") -> int:
    """The axis of the layer's own layout that the NCHW view's channels come from."""
    raw = ctx.raw.contiguous()
    view = ctx.nchw(raw)
    for d in range(1, raw.dim()):
        if raw.shape[d] == view.shape[1] and raw.stride(d) == view.stride(1):
            return d
    raise ValueError(f"cannot find the channel axis of layer {ctx.engine.layer_name!r} in its "
                     f"output of shape {tuple(raw.shape)}")


def _suffix(size: LayerSize, k: int, options: Mapping[str, Any]) -> Cost:
    return Cost(suffix=float(scored_channels(size, options)))


@register_method("ablationcam", needs=("activations", "suffix"), cost=_suffix, options=(MAX_CHANNELS,))
def ablationcam(ctx: "CamContext") -> torch.Tensor:
    r"""Ablation-CAM: :math:`w_k = (s - s_{\setminus k}) / s`, the relative drop of the score when
    channel k is ablated, on the layers after the target layer (Desai & Ramaswamy, 2020)."""
    raw = ctx.raw.contiguous()
    R, C = ctx.activations.shape[:2]
    keep = select_channels(ctx.activations, ctx.options["max_channels"])
    d = channel_axis(ctx)
    lows = raw.flatten(1).amin(dim=1)
    value = torch.where(lows == 0, torch.zeros_like(lows), lows - 1e7)  # pytorch-grad-cam's rule
    pairs = keep.flatten().nonzero()[:, 0]
    orig = ctx.scores.detach().to(torch.float64)  # (R, K)
    S = orig[:, :, None].expand(R, orig.shape[1], C).clone()
    for sl in ctx.chunks(int(pairs.numel())):
        ii = pairs[sl]
        r, c = ii // C, ii % C
        copies = raw.index_select(0, r).clone()
        view = copies.movedim(d, 1)
        view[torch.arange(int(ii.numel()), device=raw.device), c] = \
            value.index_select(0, r).to(raw.dtype).view(-1, *[1] * (view.dim() - 2))
        S[r, :, c] = ctx.suffix_scores(copies, r, raw=True).to(S.dtype)
    weights = (orig[:, :, None] - S) / orig[:, :, None]
    return weighted_sum(weights, ctx.activations)


GAUSSIAN = ((1 / 16, 1 / 8, 1 / 16), (1 / 8, 1 / 4, 1 / 8), (1 / 16, 1 / 8, 1 / 16))


def mosaic_masks(h: int, w: int, kernel: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(h*w, h, w): position p's mask, one-hot (``point``) or a 3x3 Gaussian clipped at the
    borders (``gaussian``)."""
    eye = torch.eye(h * w, dtype=dtype, device=device).reshape(h * w, 1, h, w)
    if kernel == "point":
        return eye[:, 0]
    k = torch.tensor(GAUSSIAN, dtype=dtype, device=device)[None, None]
    return F.conv2d(eye, k, padding=1)[:, 0]


def _positions(size: LayerSize, k: int, options: Mapping[str, Any]) -> Cost:
    return Cost(suffix=float(size.positions))


RECIPRO_OPTIONS = (Option("kernel", "point", one_of("point", "gaussian"), "mask around each position"),
                   Option("cls_token", False, parse_bool, "keep the tokens outside the grid"))


@register_method("reciprocam", needs=("activations", "suffix"), cost=_positions, cheap=False,
                 exportable=True, options=RECIPRO_OPTIONS)
def reciprocam(ctx: "CamContext") -> torch.Tensor:
    """ReciproCAM: the target score of the layer output kept at each position alone (the rest
    zero), one forward of the layers after it per position (Byun & Lee, 2022). Positions run in
    slices that give every row its copies (:meth:`~camserve.engine.CamContext.row_chunks`), with
    tensor operations only, so the ONNX graph traces the same function."""
    A = ctx.activations
    R, C, h, w = A.shape
    masks = mosaic_masks(h, w, ctx.options["kernel"], A.device, A.dtype)  # (P, h, w)
    template = ctx.raw.contiguous()
    if not bool(ctx.options["cls_token"]):
        template = torch.zeros_like(template)
    out = []
    for sl in ctx.row_chunks(h * w):
        q = sl.stop - sl.start
        nchw = (A[:, None] * masks[sl][None, :, None]).flatten(0, 1)  # (R*q, C, h, w), rows first
        raw = ctx.write_layer(template.repeat_interleave(q, dim=0), nchw)
        owner = torch.arange(R, device=A.device).repeat_interleave(q)
        out.append(ctx.suffix_scores(raw, owner, raw=True).reshape(R, q, -1))
    S = torch.cat(out, dim=1)  # (R, P, K)
    return S.permute(0, 2, 1).reshape(R, -1, h, w).to(A.dtype)


@register_method("vitreciprocam", needs=("activations", "suffix"), cost=_positions, cheap=False,
                 exportable=True, options=(Option("kernel", "gaussian", one_of("point", "gaussian"),
                                 "mask around each position"),
                          Option("cls_token", True, parse_bool, "keep the tokens outside the grid")))
def vitreciprocam(ctx: "CamContext") -> torch.Tensor:
    """ViT-ReciproCAM: ReciproCAM on a token layer with a 3x3 Gaussian around each position and
    the class token kept (Byun & Lee, 2023)."""
    return reciprocam(ctx)

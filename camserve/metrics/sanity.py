"""Model-parameter randomisation (Adebayo et al. 2018), the sanity check: a map that does not
change when the model's top layers are re-initialised does not explain the model. Spearman rank
correlation of the maps before and after (lower is better).

* :func:`randomization_rank_corr` — the check; :func:`randomize_top_layers` — the seeded copy
  with its last parameterised layers re-initialised; :func:`spearman` — rank correlation with ties.

Protocol and costs: docs/metrics.md.
"""
from __future__ import annotations

import copy
import logging
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..parsing import short_repr
from .base import ClassTargets, check_x

log = logging.getLogger(__name__)

#: ``explain(model, x, targets) -> maps (B, h, w)``: the method under test.
ExplainFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _average_ranks(v: torch.Tensor) -> torch.Tensor:
    """Ranks of each row of (B, N), ties sharing their mean rank (as scipy's rankdata)."""
    b, n = v.shape
    sv, order = torch.sort(v, dim=1, stable=True)
    new = torch.ones_like(sv, dtype=torch.bool)
    new[:, 1:] = sv[:, 1:] != sv[:, :-1]
    group = torch.cumsum(new.to(torch.long), dim=1) - 1 + torch.arange(b, device=v.device)[:, None] * n
    pos = torch.arange(n, dtype=torch.float64, device=v.device).expand(b, n).reshape(-1)
    sums = torch.zeros(b * n, dtype=torch.float64, device=v.device).index_add_(0, group.reshape(-1), pos)
    counts = torch.zeros(b * n, dtype=torch.float64, device=v.device).index_add_(
        0, group.reshape(-1), torch.ones_like(pos))
    mean_rank = (sums / counts.clamp_min(1))[group.reshape(-1)].view(b, n)
    ranks = torch.empty_like(mean_rank)
    ranks.scatter_(1, order, mean_rank)
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each pair of rows (B, ...) -> (B,) float64, ties at their mean
    rank. Identical rows give exactly 1; a row with no rank variation (a constant map) gives 0.

    Example::

        >>> a = torch.tensor([[1., 2., 3., 4.]])
        >>> spearman(a, a).item(), round(spearman(a, -a).item(), 6), spearman(a, torch.zeros(1, 4)).item()
        (1.0, -1.0, 0.0)
    """
    if a.shape != b.shape or a.dim() < 2:
        raise ValueError(f"invalid shapes for spearman: {tuple(a.shape)} and {tuple(b.shape)} "
                         f"(equal, (B, ...))")
    ra = _average_ranks(a.reshape(a.shape[0], -1).to(torch.float64))
    rb = _average_ranks(b.reshape(b.shape[0], -1).to(torch.float64))
    da = ra - ra.mean(dim=1, keepdim=True)
    db = rb - rb.mean(dim=1, keepdim=True)
    den = (da * da).sum(1).sqrt() * (db * db).sum(1).sqrt()
    r = torch.where(den > 0, (da * db).sum(1) / den.clamp_min(1e-300), torch.zeros_like(den))
    r = r.clamp(-1.0, 1.0)
    return torch.where((ra == rb).all(dim=1) & (den > 0), torch.ones_like(r), r)


def parameterised_layers(model: nn.Module) -> list[str]:
    """Names of the modules that own parameters directly, in registration order (the last ones are
    the top of the network for sequential models).

    Example::

        >>> parameterised_layers(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Linear(4, 2)))
        ['0', '2']
    """
    return [name for name, mod in model.named_modules()
            if any(True for _ in mod.parameters(recurse=False))]


def randomize_top_layers(model: nn.Module, top_k: int, *, seed: int = 0) -> nn.Module:
    """A deep copy of ``model`` whose last ``top_k`` parameterised layers
    (:func:`parameterised_layers`) are re-initialised: ``reset_parameters()`` where the module has
    it (PyTorch's own random init; batch norm layers go back to identity), otherwise each parameter
    is redrawn from a normal distribution with its own mean and standard deviation. Seeded;
    the original is untouched. ``top_k=0`` gives an identical copy (the control).

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
        >>> r = randomize_top_layers(net, 1)
        >>> torch.equal(r[0].weight, net[0].weight), torch.equal(r[1].weight, net[1].weight)
        (True, False)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"invalid value for model: expected an nn.Module, got {type(model).__name__}")
    names = parameterised_layers(model)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 <= top_k <= len(names):
        raise ValueError(f"invalid value for top_k: {short_repr(top_k)} (0..{len(names)}, the model's "
                         f"parameterised layers)")
    clone = copy.deepcopy(model)
    modules = dict(clone.named_modules())
    chosen = names[len(names) - top_k:]
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for name in chosen:
            mod = modules[name]
            if callable(getattr(mod, "reset_parameters", None)):
                mod.reset_parameters()
            else:
                for p in mod.parameters(recurse=False):
                    std = float(p.std()) if p.numel() > 1 else 1.0
                    p.copy_(torch.randn(p.shape, dtype=p.dtype).to(p.device) * std + float(p.mean()))
            if callable(getattr(mod, "reset_running_stats", None)):
                mod.reset_running_stats()
    log.debug("randomised layers %s", chosen)
    return clone


def randomization_rank_corr(model: nn.Module, x: torch.Tensor, targets: ClassTargets,
                            explain: ExplainFn, *, top_k: int = 1, seed: int = 0,
                            maps: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Model-parameter randomisation test (Adebayo et al. 2018): explain ``x`` with ``model`` and
    with :func:`randomize_top_layers` ``(model, top_k)``, and return the per-image Spearman rank
    correlation (B,) of the two maps (:func:`spearman`, both at the larger map size). A method
    that depends on the model decorrelates: lower is better; ``top_k=0`` gives exactly 1.

    ``explain(model, x, targets) -> maps (B, h, w)`` supplies the method, for example
    ``lambda m, x, t: CamEngine(m, "features")(x, t).cams``; it runs with autograd enabled.
    ``targets`` must be explicit class indices, so both models explain the same class.
    ``maps``: the original model's maps when already computed.

    Cost: 2 explanations per image (1 with ``maps``), each one forward and one backward for the
    CAM methods, plus a deep copy of the model.

    Example::

        >>> from camserve import CamEngine
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
        >>> explain = lambda m, x, t: CamEngine(m, "2")(x, t).cams
        >>> x = torch.randn(2, 3, 16, 16)
        >>> randomization_rank_corr(net, x, [0, 1], explain, top_k=0).tolist()
        [1.0, 1.0]
    """
    check_x(x)
    if targets is None:
        raise ValueError("invalid value for targets: None (give the class indices, so the original "
                         "and the randomised model explain the same classes)")
    t = torch.as_tensor(targets, device=x.device)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    rnd = randomize_top_layers(model, top_k, seed=seed)
    before = explain(model, x, t) if maps is None else maps
    after = explain(rnd, x, t)
    before, after = before.detach(), after.detach().to(before.device)
    if before.dim() != 3 or after.dim() != 3 or before.shape[0] != after.shape[0]:
        raise ValueError(f"invalid maps from explain: expected (B, h, w) twice, got "
                         f"{tuple(before.shape)} and {tuple(after.shape)}")
    size = max(tuple(before.shape[-2:]), tuple(after.shape[-2:]))
    if tuple(before.shape[-2:]) != size:
        before = F.interpolate(before[:, None].double(), size=size, mode="bilinear", align_corners=False)[:, 0]
    if tuple(after.shape[-2:]) != size:
        after = F.interpolate(after[:, None].double(), size=size, mode="bilinear", align_corners=False)[:, 0]
    return spearman(before, after)

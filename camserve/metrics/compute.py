"""The front door of the faithfulness metrics: :func:`compute_metrics` computes the metrics named
by their keys for a batch, sharing one reference forward; :func:`cost` says what they spend;
:func:`summarize` averages them. The keys, with the direction that is better:

============================ =========================================================== ========
key                          meaning                                                     better
============================ =========================================================== ========
``deletion``                 AUC of p(target) as the most relevant pixels are removed    lower
``insertion``                AUC of p(target) as the most relevant pixels are inserted   higher
``road_morf``                ROAD, most relevant removed first: mean p(after) - p(x)     lower
``road_lerf``                ROAD, least relevant removed first: mean p(after) - p(x)    higher
``avg_drop``                 Grad-CAM++ average drop, percent ``max(0, Y - O) / Y * 100`` lower
``avg_increase``             Grad-CAM++ increase in confidence, ``O > Y`` as 0/1         higher
``energy_in_box``            share of the map's mass inside the ground-truth box         higher
``pointing_game``            map's peak inside the box (0/1)                             higher
``randomization_rank_corr``  Spearman correlation of maps before/after randomising       lower
============================ =========================================================== ========

The evaluation table (``make evaluate``) and the batch job's ``--metrics`` go through here;
docs/metrics.md is the manual.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from ..parsing import parse_choices
from .base import ClassTargets, ModelFn, Reference, reference_targets, resize_maps
from .confidence import ConfidenceChange, confidence_change
from .curves import DEFAULT_STEPS, Baseline, curve
from .localisation import energy_in_box, pointing_game
from .road import DEFAULT_IMPUTE_TOL, DEFAULT_NOISE, DEFAULT_PERCENTILES, road
from .sanity import ExplainFn, randomization_rank_corr

#: Every metric key, in table order.
METRIC_KEYS = ("deletion", "insertion", "road_morf", "road_lerf", "avg_drop", "avg_increase",
               "energy_in_box", "pointing_game", "randomization_rank_corr")
#: Keys that need nothing but the model, the images and the maps (the batch job's per-image keys).
PER_IMAGE_KEYS = ("deletion", "insertion", "road_morf", "road_lerf", "avg_drop", "avg_increase")
#: Keys that need ground-truth boxes.
BOX_KEYS = ("energy_in_box", "pointing_game")
_REFERENCE_KEYS = PER_IMAGE_KEYS + ("randomization_rank_corr",)
#: Keys where a lower value is better.
LOWER_IS_BETTER = frozenset({"deletion", "road_morf", "avg_drop", "randomization_rank_corr"})


def check_keys(keys: Iterable[str]) -> tuple[str, ...]:
    """Metric keys (a list or a comma-separated string) checked against :data:`METRIC_KEYS`."""
    return parse_choices(keys if isinstance(keys, str) else list(keys), METRIC_KEYS, key="keys",
                         normalize=str.strip)


def cost(keys: Iterable[str], *, steps: int = DEFAULT_STEPS,
         percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> dict[str, int]:
    """Forward passes per image that :func:`compute_metrics` spends for ``keys``: one shared
    ``reference`` pass on the intact images (when any model-based key is asked), then per key
    (``deletion``/``insertion``: ``steps``; ``road_*``: ``len(percentiles)``; ``avg_drop`` and
    ``avg_increase`` together: 1; box keys: 0; ``randomization_rank_corr``: 1, the explanation by
    the randomised copy, one forward plus one backward for CAM methods — the original model's
    explanation is the ``maps`` given). Accepts a comma-separated string too.

    Example::

        >>> c = cost("deletion,road_morf,avg_drop,avg_increase,pointing_game", steps=20)
        >>> c, sum(c.values())
        ({'reference': 1, 'deletion': 20, 'road_morf': 9, 'avg_drop': 1, 'avg_increase': 0, 'pointing_game': 0}, 31)
    """
    ks = check_keys(keys)
    out: dict[str, int] = {}
    if any(k in _REFERENCE_KEYS for k in ks):
        out["reference"] = 1
    confidence_counted = False
    for k in ks:
        if k in ("deletion", "insertion"):
            out[k] = steps
        elif k in ("road_morf", "road_lerf"):
            out[k] = len(tuple(percentiles))
        elif k in ("avg_drop", "avg_increase"):
            out[k] = 0 if confidence_counted else 1
            confidence_counted = True
        elif k in BOX_KEYS:
            out[k] = 0
        else:
            out[k] = 1
    return out


def compute_metrics(model_fn: ModelFn, x: torch.Tensor, maps: torch.Tensor, targets: ClassTargets = None,
                    keys: Iterable[str] = PER_IMAGE_KEYS, boxes: object = None, *,
                    steps: int = DEFAULT_STEPS, baseline: Baseline = "mean",
                    percentiles: Sequence[float] = DEFAULT_PERCENTILES, noise: float = DEFAULT_NOISE,
                    generator: Optional[torch.Generator] = None, impute_tol: float = DEFAULT_IMPUTE_TOL,
                    tolerance: int = 0,
                    explain: Optional[ExplainFn] = None, top_k: int = 1, seed: int = 0
                    ) -> dict[str, torch.Tensor]:
    """The metrics named in ``keys`` (any of :data:`METRIC_KEYS`, or a comma-separated string) for
    a batch, as ``{key: tensor (B,)}`` on ``x``'s device, in the order of ``keys``; average with
    ``.mean()`` (``avg_increase``'s mean is the fraction with an increase). One reference forward
    on ``x`` is shared by all model-based keys (``targets=None`` explains the predicted classes);
    :func:`cost` gives the forward passes per image.

    Settings: ``steps``/``baseline`` for deletion and insertion; ``percentiles`` (% removed),
    ``noise``, ``generator``, ``impute_tol`` for ROAD; ``boxes`` (B, 4) in input pixels and ``tolerance`` for the
    box keys (the maps are resized to the input size first); ``explain``, ``top_k``, ``seed`` for
    ``randomization_rank_corr`` (``model_fn`` must then be an ``nn.Module``, and ``maps`` must be
    ``explain``'s maps for it: they are compared with ``explain`` on the randomised copy).

    Example::

        >>> model = lambda t: torch.stack([t.mean((1, 2, 3)), -t.mean((1, 2, 3))], 1)
        >>> x = torch.rand(2, 3, 8, 8)
        >>> out = compute_metrics(model, x, torch.rand(2, 4, 4), keys="road_morf,pointing_game",
        ...                       boxes=[[0, 0, 8, 8], [0, 0, 1, 1]], percentiles=(50,))
        >>> list(out), out["road_morf"].shape
        (['road_morf', 'pointing_game'], torch.Size([2]))
    """
    ks = check_keys(keys)
    m = resize_maps(maps, x)
    if any(k in BOX_KEYS for k in ks) and boxes is None:
        raise ValueError(f"invalid value for boxes: None, but {', '.join(k for k in ks if k in BOX_KEYS)} "
                         f"need(s) one ground-truth box per image")
    ref = reference_targets(model_fn, x, targets) if any(k in _REFERENCE_KEYS for k in ks) else None
    out: dict[str, torch.Tensor] = {}
    change: Optional[ConfidenceChange] = None
    for k in ks:
        if k in ("deletion", "insertion"):
            out[k] = curve(model_fn, x, m, None, steps=steps, baseline=baseline,
                           insert=k == "insertion", reference=ref).auc
        elif k in ("road_morf", "road_lerf"):
            out[k] = road(model_fn, x, m, None, order=k[5:], percentiles=percentiles, noise=noise,
                          generator=generator, tol=impute_tol, reference=ref).score
        elif k in ("avg_drop", "avg_increase"):
            if change is None:
                change = confidence_change(model_fn, x, m, None, reference=ref)
            out[k] = change.drop if k == "avg_drop" else change.increase
        elif k == "energy_in_box":
            out[k] = energy_in_box(m, boxes)
        elif k == "pointing_game":
            out[k] = pointing_game(m, boxes, tolerance)
        else:
            out[k] = _randomization(model_fn, x, maps, targets, ref, explain, top_k, seed)
    return out


def _randomization(model_fn: ModelFn, x: torch.Tensor, maps: torch.Tensor, targets: ClassTargets,
                   ref: Optional[Reference], explain: Optional[ExplainFn],
                   top_k: int, seed: int) -> torch.Tensor:
    if not isinstance(model_fn, nn.Module) or explain is None:
        raise ValueError("randomization_rank_corr needs model_fn to be an nn.Module and an "
                         "explain(model, x, targets) -> maps callable")
    t = ref[0] if ref is not None else reference_targets(model_fn, x, targets)[0]
    return randomization_rank_corr(model_fn, x, t, explain, top_k=top_k, seed=seed,
                                   maps=maps).to(x.device)


def summarize(per_image: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Means of :func:`compute_metrics`' per-image values as plain floats (NaN-free input assumed).

    Example::

        >>> summarize({"deletion": torch.tensor([0.25, 0.75])})
        {'deletion': 0.5}
    """
    return {k: float(v.double().mean()) for k, v in per_image.items()}

"""Faithfulness metrics: how well a saliency map explains a classifier's decision, one module per
family (pure torch, batched, on the device of the input):

* :mod:`.curves` — deletion and insertion (RISE);
* :mod:`.road` — ROAD and its noisy linear imputation;
* :mod:`.confidence` — Grad-CAM++'s average drop and increase in confidence;
* :mod:`.localisation` — energy in the ground-truth box, pointing game;
* :mod:`.sanity` — model-parameter randomisation;
* :mod:`.compute` — the front door: :func:`compute_metrics` by key, :func:`cost`, :func:`summarize`;
* :mod:`.base` — what they share: input checks, the one reference pass, pixel ranks, reference maps.

Every metric spends at most one forward pass of the whole batch per perturbation step. The common
arguments: ``model_fn``, any callable ``x (B, 3, H, W) -> logits (B, C)`` (an ``nn.Module`` in the
mode the caller chose — never changed here — or a plain function, e.g. an onnxruntime run; called
under ``torch.no_grad()``); ``x``, the preprocessed (normalised) images, the space perturbation
baselines are computed in; ``maps`` (B, h, w), higher = more relevant, resized bilinearly to
(H, W); ``targets``, a class per image (:data:`ClassTargets`; ``None`` takes the prediction);
scores are softmax probabilities of the target class. Every name is importable from
``camserve.metrics``. The manual (protocols, options, costs, the evaluation table):
docs/metrics.md.

Example::

    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()
    >>> x = torch.randn(2, 3, 16, 16)
    >>> maps = center_map((2, 16, 16))
    >>> out = compute_metrics(model, x, maps, keys=("deletion", "insertion", "avg_drop"), steps=8)
    >>> sorted(out), out["deletion"].shape
    (['avg_drop', 'deletion', 'insertion'], torch.Size([2]))
    >>> cost(("deletion", "insertion", "avg_drop"), steps=8)
    {'reference': 1, 'deletion': 8, 'insertion': 8, 'avg_drop': 1}
"""
from __future__ import annotations

from .base import (ClassTargets, ModelFn, Reference, center_map, check_x, random_map,
                   reference_targets, relevance_rank, resize_maps, target_probs)
from .compute import (BOX_KEYS, LOWER_IS_BETTER, METRIC_KEYS, PER_IMAGE_KEYS, check_keys,
                      compute_metrics, cost, summarize)
from .confidence import ConfidenceChange, avg_drop, avg_increase, confidence_change, normalize_per_image
from .curves import (BLUR_KERNEL, BLUR_SIGMA, DEFAULT_STEPS, Baseline, Curve, baseline_image, deletion,
                     deletion_curve, gaussian_blur, insertion, insertion_curve)
from .localisation import energy_in_box, pointing_game
from .road import (DEFAULT_IMPUTE_TOL, DEFAULT_NOISE, DEFAULT_PERCENTILES, RoadResult, impute_linear,
                   road, road_masks)
from .sanity import (ExplainFn, parameterised_layers, randomization_rank_corr, randomize_top_layers,
                     spearman)

__all__ = [
    "BLUR_KERNEL", "BLUR_SIGMA", "BOX_KEYS", "Baseline", "ClassTargets", "ConfidenceChange", "Curve",
    "DEFAULT_IMPUTE_TOL", "DEFAULT_NOISE", "DEFAULT_PERCENTILES", "DEFAULT_STEPS", "ExplainFn",
    "LOWER_IS_BETTER", "METRIC_KEYS", "ModelFn", "PER_IMAGE_KEYS", "Reference", "RoadResult",
    "avg_drop", "avg_increase", "baseline_image", "center_map", "check_keys", "check_x",
    "compute_metrics", "confidence_change", "cost", "deletion", "deletion_curve", "energy_in_box",
    "gaussian_blur", "impute_linear", "insertion", "insertion_curve", "normalize_per_image",
    "parameterised_layers", "pointing_game", "random_map", "randomization_rank_corr",
    "randomize_top_layers", "reference_targets", "relevance_rank", "resize_maps", "road",
    "road_masks", "spearman", "summarize", "target_probs",
]

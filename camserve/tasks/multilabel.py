"""Multi-label classification: one sigmoid per label; every label above a threshold is predicted.

A target is a label; its score is the label's logit (so each label's map is pytorch-grad-cam's
``BinaryClassifierOutputTarget`` on that label's output). ``threshold`` — the ``handler:`` key and
the request option of the same name, default 0.5 — decides the predicted labels; a row explains
its predicted labels (at most ``topk``, best first) unless the request names labels.

Example::

    >>> import torch
    >>> task = Multilabel(["cat", "dog", "ball"], {"threshold": 0.5})
    >>> logits = torch.tensor([[2.0, -1.0, 0.5], [-3.0, -2.0, -1.0]])
    >>> [[p.label for p in task.labels_of(row, 0.5)] for row in logits]
    [['cat', 'ball'], []]
    >>> o = task.parse_options({"threshold": "0.8"}, max_targets=16)
    >>> task.request_targets(logits, [o, o], [], [3, 3]).count
    (1, 0)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch

from ..errors import OptionError
from ..parsing import short_repr
from ..records import Prediction, TargetError, parse_targets, top_predictions
from .base import Geometry, Shown, TargetBatch, TaskError
from .classification import Classification

DEFAULT_THRESHOLD = 0.5


def parse_threshold(value: Any, key: str, exc: type[Exception]) -> float:
    """A probability threshold in [0, 1] (a number, or its text)."""
    num: Any = value
    if isinstance(value, str):
        try:
            num = float(value.strip()) if len(value) <= 40 else None
        except ValueError:
            num = None
    if isinstance(num, bool) or not isinstance(num, (int, float)) or not math.isfinite(num) \
            or not 0.0 <= float(num) <= 1.0:
        raise exc(f"invalid value for {key}: {short_repr(value)} (a number in [0, 1])")
    return float(num)


@dataclass(frozen=True)
class MultilabelOptions:
    """A request's labels to explain (None: the predicted ones) and its ``threshold``."""

    targets: Optional[tuple[int, ...]] = None
    threshold: float = DEFAULT_THRESHOLD


class Multilabel(Classification):
    """A (B, labels) output read as independent sigmoids (see the module docstring)."""

    name = "multilabel"
    option_keys = ("target", "threshold")
    config_keys = ("threshold",)

    def __init__(self, labels: Sequence[str] = (), settings: Optional[Mapping[str, Any]] = None) -> None:
        super().__init__(labels, settings)
        self.threshold = parse_threshold(self.settings.get("threshold", DEFAULT_THRESHOLD),
                                         "handler.threshold", TaskError)

    def probabilities(self, out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out.detach().float())

    def labels_of(self, out_row: torch.Tensor, threshold: float) -> list[Prediction]:
        """The predicted labels of one row: sigmoid >= ``threshold``, best first."""
        probs = self.probabilities(out_row).tolist()
        above = [i for i, p in enumerate(probs) if p >= threshold]
        return sorted((Prediction(i, self.labels[i], probs[i]) for i in above),
                      key=lambda p: (-p.score, p.index))

    # -- serving ------------------------------------------------------------------------------
    def parse_options(self, options: Mapping[str, Any], *, max_targets: int) -> MultilabelOptions:
        try:
            targets = parse_targets(options.get("target"), self.labels, max_targets=max_targets)
        except TargetError as exc:
            raise OptionError(str(exc)) from None
        threshold = self.threshold
        if options.get("threshold") is not None:
            threshold = parse_threshold(options["threshold"], "threshold", OptionError)
        return MultilabelOptions(targets, threshold)

    def max_targets(self, parsed: MultilabelOptions) -> Optional[int]:
        return len(parsed.targets) if parsed.targets else None  # the predicted ones, <= topk

    def request_targets(self, out: torch.Tensor, parsed: Sequence[MultilabelOptions],
                        geometry: Sequence[Geometry], topk: Sequence[int]) -> TargetBatch:
        lists = []
        for r, p in enumerate(parsed):
            if p.targets:
                lists.append(list(p.targets))
            else:
                lists.append([q.index for q in self.labels_of(out[r], p.threshold)][:topk[r]])
        return TargetBatch.of_classes(lists, out.device)

    def known_targets(self, parsed: Sequence[MultilabelOptions], geometry: Sequence[Geometry],
                      topk: Sequence[int]) -> Optional[TargetBatch]:
        """Known only when every row names its labels (the predicted ones need the output)."""
        if all(p.targets for p in parsed):
            return TargetBatch.of_classes([list(p.targets) for p in parsed])
        return None

    def answer(self, out_row: torch.Tensor, parsed: MultilabelOptions, topk: int,
               geometry: Geometry, explanations: Optional[list[dict[str, Any]]]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "labels": [p.to_json() for p in self.labels_of(out_row, parsed.threshold)],
            "threshold": parsed.threshold,
            "predictions": [p.to_json() for p in top_predictions(
                self.probabilities(out_row).tolist(), self.labels, topk)]}
        if explanations is not None:
            body["explanations"] = explanations
        return body

"""Single-label classification: softmax over classes; a target is a class, its score the logit.

Example::

    >>> import torch
    >>> task = Classification(["cat", "dog", "bird"])
    >>> logits = torch.tensor([[0.1, 2.0, 0.3], [1.5, 0.0, 0.2]])
    >>> task.scores(logits, task.as_targets([2, 0], logits)).tolist()
    [[0.30000001192092896], [1.5]]
    >>> task.default_targets(logits).index.tolist()
    [[1], [0]]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch

from ..errors import OptionError
from ..parsing import short_repr
from ..records import Prediction, TargetError, parse_targets, top_predictions
from ..sources import logits_of
from .base import GraphInput, Geometry, Shown, TargetBatch, Task, TaskError

#: The class input of a classifier's CAM graph.
CLASS_INPUT = GraphInput("target", torch.int64, (), "class", -1,
                         "int64 (N,) or (1,); negative = top-1 class; optional, default [-1]")


@dataclass(frozen=True)
class ClassOptions:
    """A request's class targets: class indices, or None for the row's top-1 class."""

    targets: Optional[tuple[int, ...]] = None


def class_index(value: Any, b: int, n_cls: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The engine's classic ``targets=`` forms for a batch of ``b`` rows and ``n_cls`` classes as
    (B, K) int64 class indices: None (``-1``), an int, a sequence of B ints, a LongTensor (B,) or
    (B, K); ``-1`` stands for a row's default class and is kept (the task resolves it)."""
    if value is None:
        t = torch.full((b, 1), -1, dtype=torch.long, device=device)
    elif isinstance(value, bool):
        raise TaskError(f"invalid value for targets: {value!r}")
    elif isinstance(value, int):
        t = torch.full((b, 1), value, dtype=torch.long, device=device)
    elif isinstance(value, torch.Tensor):
        if value.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TaskError(f"invalid value for targets: integer tensor expected, got {value.dtype}")
        t = value.to(device=device, dtype=torch.long)
        if t.dim() == 0:
            t = t.expand(b)
        if t.dim() == 1:
            t = t[:, None]
    else:
        try:
            t = torch.tensor([int(v) for v in value], dtype=torch.long, device=device)[:, None]
        except (TypeError, ValueError):
            raise TaskError(f"invalid value for targets: {short_repr(value)} (None, an int, a "
                            f"sequence of B ints, or a LongTensor (B,) or (B, K))") from None
    if t.dim() != 2 or t.shape[0] != b:
        raise TaskError(f"invalid value for targets: shape {tuple(t.shape)} does not fit a batch "
                        f"of {b} (expected (B,) or (B, K))")
    if t.numel() and (int(t.min()) < -1 or int(t.max()) >= n_cls):
        raise TaskError(f"invalid value for targets: class index out of range 0..{n_cls - 1}")
    return t


def class_targets(value: Any, out: torch.Tensor) -> TargetBatch:
    """The engine's classic ``targets=`` forms (:func:`class_index`) for a (B, classes) output;
    ``-1`` stands for a row's top-1 class."""
    b, n_cls = out.shape
    t = class_index(value, b, n_cls, out.device)
    top1 = out.detach().argmax(dim=1, keepdim=True).expand_as(t)
    t = torch.where(t < 0, top1, t)
    return TargetBatch(t.contiguous(), (int(t.shape[1]),) * b)


class Classification(Task):
    """A (B, classes) output read as softmax probabilities (see the module docstring)."""

    name = "classification"
    option_keys = ("target",)
    logits_output = True

    def output(self, raw: Any) -> torch.Tensor:
        out = logits_of(raw)
        if out.dim() != 2:
            raise TaskError(f"the {self.name} task needs logits of shape (B, classes); the model "
                            f"gives {tuple(out.shape)}")
        return out

    def scores(self, out: torch.Tensor, targets: TargetBatch) -> torch.Tensor:
        return out.gather(1, targets.index.to(out.device))

    def default_targets(self, out: torch.Tensor) -> TargetBatch:
        return class_targets(None, out)

    def as_targets(self, value: Any, out: torch.Tensor) -> TargetBatch:
        if value is None or isinstance(value, TargetBatch):
            return super().as_targets(value, out)
        return class_targets(value, out)

    def probe_score(self, out: Any) -> torch.Tensor:
        logits = self.output(out)
        return logits[0, logits[0].argmax()]

    def graph_inputs(self, input_size: tuple[int, int]) -> tuple[GraphInput, ...]:
        return (CLASS_INPUT,)

    def graph_targets(self, out: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> TargetBatch:
        """``target`` per row; negative: the row's top-1 class."""
        top1 = out.argmax(dim=1)
        t = torch.where(inputs["target"] < 0, top1, inputs["target"].to(top1.dtype))
        return TargetBatch(t[:, None], None)

    def probability(self, out: torch.Tensor, targets: TargetBatch) -> torch.Tensor:
        return self.probabilities(out).gather(1, targets.index.to(out.device))

    def probabilities(self, out: torch.Tensor) -> torch.Tensor:
        """The scores a row's answer shows: softmax probabilities (float32)."""
        return torch.softmax(out.detach().float(), dim=-1)

    # -- serving ------------------------------------------------------------------------------
    def parse_options(self, options: Mapping[str, Any], *, max_targets: int) -> ClassOptions:
        try:
            return ClassOptions(parse_targets(options.get("target"), self.labels,
                                              max_targets=max_targets))
        except TargetError as exc:
            raise OptionError(str(exc)) from None

    def max_targets(self, parsed: ClassOptions) -> int:
        return len(parsed.targets) if parsed.targets else 1

    def request_targets(self, out: torch.Tensor, parsed: Sequence[ClassOptions],
                        geometry: Sequence[Geometry], topk: Sequence[int]) -> TargetBatch:
        top1 = out.argmax(dim=1).tolist()
        lists = [list(p.targets) if p.targets else [top1[r]] for r, p in enumerate(parsed)]
        return TargetBatch.of_classes(lists, out.device)

    def known_targets(self, parsed: Sequence[ClassOptions], geometry: Sequence[Geometry],
                      topk: Sequence[int]) -> TargetBatch:
        """The classes asked for, ``-1`` (the row's top-1 class) where none is."""
        return TargetBatch.of_classes([list(p.targets) if p.targets else [-1] for p in parsed])

    def shown(self, out_row: torch.Tensor, targets: TargetBatch, r: int,
              geometry: Geometry) -> list[Shown]:
        probs = self.probabilities(out_row).tolist()
        idx = targets.index[r, :targets.count[r]].tolist()
        return [Shown(i, self.labels[i], float(probs[i])) for i in idx]

    def predictions(self, out_row: torch.Tensor, topk: int) -> list[Prediction]:
        """The row's top-k."""
        return top_predictions(self.probabilities(out_row).tolist(), self.labels, topk)

    def answer(self, out_row: torch.Tensor, parsed: ClassOptions, topk: int, geometry: Geometry,
               explanations: Optional[list[dict[str, Any]]]) -> dict[str, Any]:
        body: dict[str, Any] = {"predictions": [p.to_json() for p in self.predictions(out_row, topk)]}
        if explanations is not None:
            body["explanations"] = explanations
        return body

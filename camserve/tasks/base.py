"""What every task is: targets as data, the task interface, and the geometry of a served row.

A task (classification, multilabel, segmentation, detection, embedding) is one small object that
says how a model's raw output becomes the task's output (:meth:`Task.output`), how targets given
as data become one differentiable score per (row, target) (:meth:`Task.scores`, shape (R, K)),
and — on the serving side — which options a request may carry, which targets a row explains by
default and what a row's answer holds. The engine, the serving core and the ONNX graph never
branch on the task: they call these methods. The manual: docs/tasks.md.

Targets are never per-image Python callables: a :class:`TargetBatch` holds tensors only — the
class (or label) index per target, and where the task needs them a region mask, a reference box or
a reference embedding per target — so one batch of rows with K targets each is scored in one
forward and differentiated in one backward, and the same tensors are inputs of an ONNX graph.

Example::

    >>> import torch
    >>> t = TargetBatch.of_classes([[2, 0], [1]])
    >>> t.index.tolist(), t.count
    ([[2, 0], [1, 1]], (2, 1))
    >>> t.select(torch.tensor([1])).index.tolist()
    [[1, 1]]
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence

import torch

from ..parsing import short_repr


class TaskError(ValueError):
    """A task setting or target that is not allowed; the message names it and what is allowed."""


@dataclass(frozen=True)
class TargetBatch:
    """Targets of R rows, K per row, as tensors (padding repeats a row's first target).

    ``index`` (R, K) long: the class explained (classification, multilabel, segmentation), the
    label of a reference box (detection), 0 for embeddings; ``count``: the real number of targets
    per row (``index[r, count[r]:]`` is padding; a row may have none: count 0). Optional, by task: ``region`` (R, K, H, W) float,
    the mask a segmentation score is summed over, at the task output's resolution; ``box`` (R, K, 4)
    float, a reference box ``x0, y0, x1, y1`` in input pixels (detection); ``reference`` (R, K, D)
    float, the embedding a similarity is taken to. ``mode`` is the task's score mode (detection:
    ``score`` or ``iou+score``).
    """

    index: torch.Tensor
    count: tuple[int, ...]
    region: Optional[torch.Tensor] = None
    box: Optional[torch.Tensor] = None
    reference: Optional[torch.Tensor] = None
    mode: str = "score"

    def __post_init__(self) -> None:
        if self.index.dim() != 2 or self.index.dtype != torch.long:
            raise TaskError(f"invalid value for targets: index must be (R, K) int64, got "
                            f"{tuple(self.index.shape)} {self.index.dtype}")
        if len(self.count) != self.index.shape[0]:
            raise TaskError(f"invalid value for targets: {len(self.count)} counts for "
                            f"{self.index.shape[0]} rows")
        for name in ("region", "box", "reference"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape[:2]) != tuple(self.index.shape):
                raise TaskError(f"invalid value for targets: {name} of shape {tuple(t.shape)} does "
                                f"not fit {tuple(self.index.shape)} targets")

    @property
    def rows(self) -> int:
        """R, the number of rows."""
        return int(self.index.shape[0])

    @property
    def k(self) -> int:
        """K, targets per row (the largest count)."""
        return int(self.index.shape[1])

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor], count: tuple[int, ...]) -> "TargetBatch":
        changes: dict[str, Any] = {"count": count}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                changes[f.name] = fn(v)
        return replace(self, **changes)

    def select(self, rows: torch.Tensor) -> "TargetBatch":
        """The targets of ``rows`` (a 1-D index tensor)."""
        idx = [int(i) for i in rows.tolist()]
        return self._map(lambda t: t.index_select(0, rows.to(t.device)),
                         tuple(self.count[i] for i in idx))

    def repeat(self, n: int) -> "TargetBatch":
        """Each row repeated ``n`` times in a row (for perturbation methods: row r's copies are
        rows ``r*n .. r*n+n-1``)."""
        return self._map(lambda t: t.repeat_interleave(n, dim=0),
                         tuple(c for c in self.count for _ in range(n)))

    def to(self, device: torch.device | str) -> "TargetBatch":
        """The same targets on ``device`` (float tensors keep their dtype)."""
        return self._map(lambda t: t.to(device), self.count)

    @classmethod
    def of_classes(cls, lists: Sequence[Sequence[int]], device: torch.device | str = "cpu",
                   **extra: Any) -> "TargetBatch":
        """Targets from one list of class indices per row (padded with each row's first; a row
        with no target has count 0 and is padded with class 0)."""
        if not lists:
            raise TaskError("invalid value for targets: no rows")
        k = max(1, max(len(t) for t in lists))
        rows = [list(t) + [t[0] if len(t) else 0] * (k - len(t)) for t in lists]
        return cls(torch.tensor(rows, dtype=torch.long, device=device),
                   tuple(len(t) for t in lists), **extra)


@dataclass(frozen=True)
class Geometry:
    """Where a served row's pixels come from: ``size`` the original image (W, H) and ``input``
    the model input (H, W) it was resized to (the whole image, no crop)."""

    size: tuple[int, int]
    input: tuple[int, int]

    @property
    def scale(self) -> tuple[float, float]:
        """(sx, sy): original pixels per input pixel."""
        return self.size[0] / self.input[1], self.size[1] / self.input[0]

    def box_to_image(self, box: Sequence[float]) -> list[float]:
        """A box ``x0, y0, x1, y1`` in input pixels -> original pixels (clipped to the image)."""
        sx, sy = self.scale
        w, h = self.size
        x0, y0, x1, y1 = (float(v) for v in box)
        return [min(max(x0 * sx, 0.0), w), min(max(y0 * sy, 0.0), h),
                min(max(x1 * sx, 0.0), w), min(max(y1 * sy, 0.0), h)]

    def box_to_input(self, box: Sequence[float]) -> list[float]:
        """A box in original pixels -> input pixels."""
        sx, sy = self.scale
        x0, y0, x1, y1 = (float(v) for v in box)
        return [x0 / sx, y0 / sy, x1 / sx, y1 / sy]


@dataclass(frozen=True)
class Shown:
    """One explained target as a row's answer shows it: its class ``index`` and ``label``, the
    ``score`` shown beside it (a probability, a sigmoid, a similarity, a detection score), and
    where the task has one a ``box`` in original pixels (drawn on the overlay; with
    ``box_normalize`` the map is normalised inside it)."""

    index: int
    label: str
    score: float
    box: Optional[tuple[float, float, float, float]] = None


class Task:
    """The interface every task implements (see the module docstring).

    Engine side: :meth:`output`, :meth:`select`, :meth:`scores`, :meth:`default_targets`,
    :meth:`as_targets`. Serving side: :attr:`option_keys`, :meth:`parse_options`,
    :meth:`max_targets`, :meth:`request_targets` (and :meth:`known_targets` for a graph
    backend), :meth:`answer`. A subclass overrides what
    differs; the defaults are those of a model whose output is one score vector per row.
    """

    name: ClassVar[str] = ""
    #: request options the task adds to the common ones (explain, topk, method, outputs)
    option_keys: ClassVar[tuple[str, ...]] = ("target",)
    #: ``handler:`` keys of the model config the task reads (validated by its constructor)
    config_keys: ClassVar[tuple[str, ...]] = ()
    #: the model returns one logit vector per row (possibly wrapped: a tuple, ``.logits``); the
    #: loader then makes it return the tensor itself (:func:`camserve.sources.ensure_logits`)
    logits_output: ClassVar[bool] = False

    def __init__(self, labels: Sequence[str] = (), settings: Optional[Mapping[str, Any]] = None) -> None:
        self.labels = list(labels)
        self.settings = dict(settings or {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.labels)} labels)"

    @classmethod
    def count_labels(cls, model: Any, raw: Any) -> int:
        """The number of labels of ``model``, from its raw output on a blank input (``raw``) or
        its configuration; tasks whose output is a logit vector are counted by the loader."""
        raise TaskError(f"the {cls.name} task cannot count the model's labels")

    # -- engine side --------------------------------------------------------------------------
    def output(self, raw: Any) -> Any:
        """The model's raw output as this task's output (e.g. the logits tensor)."""
        raise NotImplementedError

    def select(self, out: Any, rows: torch.Tensor) -> Any:
        """The output of ``rows`` only (for scoring the explained rows of a batch)."""
        if isinstance(out, torch.Tensor):
            return out.index_select(0, rows.to(out.device))
        raise NotImplementedError

    def row(self, out: Any, j: int) -> Any:
        """Row ``j`` of a (detached) output, without the batch dimension."""
        if isinstance(out, torch.Tensor):
            return out[j]
        raise NotImplementedError

    def to_host(self, out: Any) -> Any:
        """A detached output on the CPU (answers are built there)."""
        if isinstance(out, torch.Tensor):
            return out.detach().cpu()
        raise NotImplementedError

    def detach(self, out: Any) -> Any:
        """The output without autograd history (what predictions and default targets read)."""
        if isinstance(out, torch.Tensor):
            return out.detach()
        raise NotImplementedError

    def scores(self, out: Any, targets: TargetBatch) -> torch.Tensor:
        """One differentiable score per (row, target): (R, K), from this task's output of the R
        rows (:meth:`select`) and their targets."""
        raise NotImplementedError

    def default_targets(self, out: Any) -> TargetBatch:
        """What a row explains when nothing is asked (one target per row; ``out`` detached)."""
        raise NotImplementedError

    def as_targets(self, value: Any, out: Any) -> TargetBatch:
        """The engine's ``targets=`` argument as a :class:`TargetBatch`: None (the default
        targets), a TargetBatch, or a callable of the detached output returning either."""
        if value is None:
            return self.default_targets(out)
        if isinstance(value, TargetBatch):
            return value
        raise TaskError(f"invalid value for targets: {short_repr(value)} (a TargetBatch or None "
                        f"for the {self.name} task)")

    def probe_score(self, out: Any) -> torch.Tensor:
        """A scalar score of the first row, for locating a target layer automatically."""
        raise NotImplementedError

    # -- serving side -------------------------------------------------------------------------
    def parse_options(self, options: Mapping[str, Any], *, max_targets: int) -> Any:
        """This task's request options (``options`` holds only :attr:`option_keys`, as text or
        JSON values, already length-checked) -> a frozen record; 422 ``OptionError`` otherwise."""
        raise NotImplementedError

    def max_targets(self, parsed: Any) -> int:
        """An upper bound of the maps one row asks for, before the forward (work budget)."""
        return 1

    def request_targets(self, out: Any, parsed: Sequence[Any], geometry: Sequence[Geometry],
                        topk: Sequence[int]) -> TargetBatch:
        """The targets of explained rows from their parsed options, their detached output, their
        geometry and their ``topk`` (a row may get no target: count 0)."""
        raise NotImplementedError

    def known_targets(self, parsed: Sequence[Any], geometry: Sequence[Geometry],
                      topk: Sequence[int]) -> Optional[TargetBatch]:
        """The explained rows' targets as far as they are known before the forward, for a backend
        that feeds them to a CAM graph: index ``-1`` stands for the row's default target, which
        the graph takes from its own output as :meth:`request_targets` would; None (the default)
        when they depend on the output (the backend then runs the forward first)."""
        return None

    def shown(self, out_row: Any, targets: TargetBatch, r: int, geometry: Geometry) -> list[Shown]:
        """How row ``r``'s explained targets are shown (label, score, box)."""
        raise NotImplementedError

    def answer(self, out_row: Any, parsed: Any, topk: int, geometry: Geometry,
               explanations: Optional[list[dict[str, Any]]]) -> dict[str, Any]:
        """A row's answer body: its predictions, and ``explanations`` when it explains."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What the task adds to the server's describe answer."""
        return {"task": self.name, "options": list(self.option_keys)}

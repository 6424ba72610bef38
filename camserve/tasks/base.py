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
    per row (``index[r, count[r]:]`` is padding; a row may have none: count 0). Optional, by
    task: ``region`` (R, K, H, W) float,
    the mask a segmentation score is summed over, at the task output's resolution; ``box`` (R, K, 4)
    float, a reference box ``x0, y0, x1, y1`` in input pixels (detection); ``reference`` (R, K, D)
    float, the embedding a similarity is taken to. ``mode`` is the task's score mode (detection:
    ``score`` or ``iou+score``). ``count`` None: every row has K real targets (inside a traced
    graph, where the number of rows is symbolic: :meth:`Task.graph_targets`).
    """

    index: torch.Tensor
    count: Optional[tuple[int, ...]]
    region: Optional[torch.Tensor] = None
    box: Optional[torch.Tensor] = None
    reference: Optional[torch.Tensor] = None
    mode: str = "score"

    def __post_init__(self) -> None:
        if self.index.dim() != 2 or self.index.dtype != torch.long:
            raise TaskError(f"invalid value for targets: index must be (R, K) int64, got "
                            f"{tuple(self.index.shape)} {self.index.dtype}")
        if self.count is not None and len(self.count) != self.index.shape[0]:
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

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor],
             count: Optional[tuple[int, ...]]) -> "TargetBatch":
        changes: dict[str, Any] = {"count": count}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, torch.Tensor):
                changes[f.name] = fn(v)
        return replace(self, **changes)

    def select(self, rows: torch.Tensor) -> "TargetBatch":
        """The targets of ``rows`` (a 1-D index tensor)."""
        count = None if self.count is None else tuple(self.count[int(i)] for i in rows.tolist())
        return self._map(lambda t: t.index_select(0, rows.to(t.device)), count)

    def repeat(self, n: int) -> "TargetBatch":
        """Each row repeated ``n`` times in a row (for perturbation methods: row r's copies are
        rows ``r*n .. r*n+n-1``)."""
        count = None if self.count is None else tuple(c for c in self.count for _ in range(n))
        return self._map(lambda t: t.repeat_interleave(n, dim=0), count)

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
    #: (W, H) the answer's images (maps, a segmentation mask) are made at: the original size, or
    #: smaller where the work budget caps it (None: the original size)
    render: Optional[tuple[int, int]] = None

    @property
    def render_size(self) -> tuple[int, int]:
        """(W, H) of the answer's images (:attr:`render`, else the original size)."""
        return self.render if self.render is not None else self.size

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


#: What the values of a graph input mean; verification draws explicit values by kind.
GRAPH_INPUT_KINDS: tuple[str, ...] = ("class", "region", "vector")


@dataclass(frozen=True)
class GraphInput:
    """One target input of a task's CAM graph (after ``input``, the images): its ``name``,
    ``dtype``, per-row ``shape`` (after the batch dimension), what its values are (``kind``, one of
    :data:`GRAPH_INPUT_KINDS`), and its ``default``: the value of every entry when the input is
    not fed (a broadcastable (1, 1, ...) initializer of the graph; None: the input is required).

    Example::

        >>> GraphInput("target", torch.int64, (), "class", -1).fill(3).tolist()
        [-1, -1, -1]
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    kind: str
    default: Optional[float] = None
    doc: str = ""

    def __post_init__(self) -> None:
        if self.kind not in GRAPH_INPUT_KINDS:
            raise ValueError(f"invalid value for kind: {self.kind!r} (known: "
                             f"{', '.join(GRAPH_INPUT_KINDS)})")

    @property
    def optional(self) -> bool:
        """The graph has a default for it."""
        return self.default is not None

    def fill(self, n: int) -> torch.Tensor:
        """``n`` rows of the default (zeros for a required input)."""
        return torch.full((n, *self.shape), self.default if self.default is not None else 0,
                          dtype=self.dtype)


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
    #: the ``transformers`` auto class a Hugging Face folder (``hf:``) of this task is loaded with
    hf_auto_class: ClassVar[str] = "AutoModelForImageClassification"
    #: the Hugging Face config's ``id2label`` / ``num_labels`` are this task's labels
    hf_labels: ClassVar[bool] = True
    #: options that may carry a file (an image, a mask PNG): they are not held to the option
    #: text-length limit but bounded like images (request size, pixel count, formats)
    binary_options: ClassVar[tuple[str, ...]] = ()
    #: name of a CAM graph's first output, the task's output (:mod:`camserve.onnx.format`)
    graph_output: ClassVar[str] = "logits"
    #: a CAM graph explains several targets per row (detection: its top detections): its
    #: gradients are (N, K, C, h, w) and its maps (N, K, h, w) instead of (N, C, h, w), (N, h, w)
    graph_per_target: ClassVar[bool] = False

    def __init__(self, labels: Sequence[str] = (), settings: Optional[Mapping[str, Any]] = None) -> None:
        self.labels = list(labels)
        self.settings = dict(settings or {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.labels)} labels)"

    @classmethod
    def prepare_model(cls, model: Any, spec: Any) -> None:
        """Adapt a freshly built serving copy of ``model`` to the task and ``spec`` (the loader
        calls it before counting labels; detectors: their family's thresholds, NMS and resize
        from the task's keys). Default: nothing."""

    def count_labels(self, model: Any, raw: Any) -> int:
        """The number of labels of ``model`` (the width of this task's output), from its raw
        output on a blank input of the model's input size (``raw``) or its configuration; tasks
        whose output is a logit vector are counted by the loader. A task may make the model's
        output the form it reads from now on (as the loader does for logits:
        :func:`camserve.sources.ensure_logits`)."""
        raise TaskError(f"the {self.name} task cannot count the model's labels")

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

    def probability(self, out: Any, targets: TargetBatch) -> torch.Tensor:
        """(R, K) in [0, 1]: how strongly each target holds on ``out`` (no gradient needed) — a
        class's softmax probability, a label's sigmoid, ... What faithfulness metrics (deletion,
        insertion, ROAD, average drop) follow as pixels are removed."""
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

    # -- the CAM graph (camserve.onnx) ---------------------------------------------------------
    def graph_inputs(self, input_size: tuple[int, int]) -> tuple[GraphInput, ...]:
        """The target inputs of this task's CAM graph for inputs of ``input_size`` (H, W)."""
        raise TaskError(f"the {self.name} task has no CAM graph")

    def graph_targets(self, out: Any, inputs: Mapping[str, torch.Tensor]) -> TargetBatch:
        """One target per row (``count`` None) from the graph's target ``inputs`` (by name, each
        (N, ...) or broadcastable (1, ...)) and the detached output, with tensor operations only
        (it is traced: the number of rows is symbolic)."""
        raise TaskError(f"the {self.name} task has no CAM graph")

    def graph_forward(self, model: Any, x: torch.Tensor) -> Any:
        """The task's output of ``model`` on ``x`` inside a CAM graph, with tensor operations only
        (default: :meth:`output` of the model's output)."""
        return self.output(model(x))

    def graph_scores(self, out: Any, targets: TargetBatch) -> torch.Tensor:
        """The differentiable scores a CAM graph explains: (N,) one target per row (default:
        :meth:`scores`), or (N, K) for a :attr:`graph_per_target` task."""
        return self.scores(out, targets)[:, 0]

    def graph_value(self, out: Any) -> torch.Tensor:
        """The detached output as the graph's first output (a tensor; default: itself)."""
        return out

    # -- serving side -------------------------------------------------------------------------
    def parse_options(self, options: Mapping[str, Any], *, max_targets: int) -> Any:
        """This task's request options (``options`` holds only :attr:`option_keys`, as text or
        JSON values, already length-checked) -> a frozen record; 422 ``OptionError`` otherwise."""
        raise NotImplementedError

    def max_targets(self, parsed: Any) -> Optional[int]:
        """An upper bound of the maps one row asks for, before the forward (work budget); None:
        as many as the request's ``topk`` (default targets are capped there)."""
        return 1

    def answer_maps(self, parsed: Any) -> int:
        """Images the answer makes besides its explanations, each counted as a map in the work
        budget whether the request explains or not (a segmentation mask)."""
        return 0

    def bind(self, parsed: Any, geometry: Geometry) -> Any:
        """The parsed options once the image size is known (from its header, before the pixels
        are decoded): what depends on it is checked and converted here (a region in original
        pixels -> a mask at the input size); 422 ``OptionError`` otherwise."""
        return parsed

    def companions(self, parsed: Any) -> tuple[bytes, ...]:
        """Images a request carries besides its own (an embedding's reference image): each is
        decoded under the same image limits, forwarded in the same batch right after the
        request's own row, and explained when the request explains."""
        return ()

    def companion_options(self, parsed: Any, i: int) -> Any:
        """The parsed options of the row of companion image ``i`` of a request."""
        raise TaskError(f"the {self.name} task has no companion images")

    def join(self, out_row: Any, companions: Sequence[Any]) -> Any:
        """A request's output row for :meth:`answer`, with its companion rows' outputs."""
        if companions:
            raise TaskError(f"the {self.name} task has no companion images")
        return out_row

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

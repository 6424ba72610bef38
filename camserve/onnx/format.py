"""The CAM graph's file format: input and output names, and its metadata.

Inputs: ``input`` float32 (N, 3, H, W), then the task's target inputs
(:meth:`camserve.tasks.Task.graph_inputs`): for classification and multilabel ``target`` int64
(N,) or (1,), optional (default ``[-1]``: each row's top-1 class or label); segmentation adds
``region`` float32 (N, H, W), optional (default ``-1``: the predicted mask of the target class);
an embedding graph takes ``reference`` float32 (N, D), required. Outputs: the task's output
(``logits``; ``embedding`` for embeddings), ``activations``, ``gradients`` (only in a graph with a
method that needs them: a *gradient-free* graph has no backward), ``cam`` (the first method's
map), then ``cam_<method>`` per extra method (:func:`output_names`).

The ``metadata_props`` are written from and read back into one description, :class:`GraphMeta`: the
model's :class:`~camserve.models.ModelSpec` (what a consumer needs: arch, input size, mean, std,
topk, ... the target layer, the task and its settings), the class labels, the methods, whether
the graph carries ``gradients`` (a backward), its ``quantize`` form (``null`` or ``"int8"``), the
task's target inputs (``inputs``: name -> what it holds) and the camserve version. Each key
is spelled once, in :data:`SPEC_KEYS` / :data:`KEYS`; values are strings (lists and maps as JSON).

Example::

    >>> from camserve.models import ModelSpec
    >>> meta = GraphMeta(ModelSpec(arch="net:Net", num_classes=2, target_layer="features",
    ...                            input_size=(32, 32)), labels=("cat", "dog"),
    ...                  methods=("gradcam", "gradcam++"))
    >>> props = meta.to_props()
    >>> props["layer"], props["cam_outputs"]
    ('features', '{"gradcam": "cam", "gradcam++": "cam_gradcampp"}')
    >>> GraphMeta.from_props(props) == meta
    True
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from .. import __version__
from ..methods import available_methods, get_method
from ..models import ConfigError, ModelSpec
from ..tasks import GraphInput, Task, TaskError, make_task

#: Graph input names of a classifier, in order (other tasks: :attr:`GraphMeta.input_names`).
INPUT_NAMES: tuple[str, str] = ("input", "target")
#: Names of the fixed outputs of a classifier's CAM graph, in order (the first one is the task's
#: output: :attr:`camserve.tasks.Task.graph_output`; a gradient-free graph has no ``gradients``);
#: ``cam_<method>`` outputs follow.
BASE_OUTPUTS: tuple[str, ...] = ("logits", "activations", "gradients", "cam")
#: The forms a graph may be quantised to (``camserve-export --quantize``).
QUANTIZE: tuple[str, ...] = ("int8",)
#: The symbolic batch dimension's name.
BATCH_DIM = "batch"

#: ModelSpec field -> metadata key. ``weights`` and ``labels`` name files of a model folder and are
#: not written (the labels themselves are, under ``labels``).
SPEC_KEYS: dict[str, str] = {
    "arch": "arch", "num_classes": "num_classes", "target_layer": "layer",
    "input_size": "input_size", "mean": "mean", "std": "std", "method": "method", "topk": "topk",
    "max_pixels": "max_pixels", "outputs": "outputs", "layout": "layout",
    "arch_args": "arch_args", "interpolation": "interpolation", "crop": "crop", "task": "task",
    "task_settings": "task_settings",
}
#: Spec fields written even when unset (JSON ``null``), so every graph has the key.
ALWAYS_WRITTEN: tuple[str, ...] = ("interpolation", "crop")
#: ModelSpec fields the graph does not record: files of a model folder (``weights``, ``labels``: the
#: labels themselves are written), the limits of the REST server and how it runs (``backend``, ``optimize``).
NOT_WRITTEN: tuple[str, ...] = ("weights", "labels", "formats", "max_response_size",
                                "max_option_length", "max_map_side", "max_row_work", "max_batch_work",
                                "methods", "max_row_forwards", "max_batch_forwards",
                                "given", "backend", "optimize")
#: The other keys. ``grid``: (h, w) of the graph's maps; ``prefix_tokens``: the leading tokens
#: (class, distillation, register) a token layer's map leaves out (JSON ``null`` when unknown or
#: not a token layer).
#: ``target``: what the ``target`` input holds (graphs with one); ``inputs``: every target input,
#: name -> what it holds (JSON).
#: ``gradients``: whether the graph has a backward (JSON bool; graphs written before it was
#: recorded have one); ``quantize``: ``null`` or one of :data:`QUANTIZE`.
KEYS: dict[str, str] = {"labels": "labels", "methods": "methods", "cam_outputs": "cam_outputs",
                        "version": "camserve_version", "target": "target", "grid": "grid",
                        "prefix_tokens": "prefix_tokens", "inputs": "inputs",
                        "gradients": "gradients", "quantize": "quantize"}
#: Keys a graph must have to be a camserve CAM graph.
REQUIRED: tuple[str, ...] = ("arch", "layer", "input_size", "mean", "std", "labels", "methods",
                             "cam_outputs")


class GraphFormatError(ValueError):
    """A file that is not a camserve CAM graph, or whose metadata is invalid; names the key."""


def method_output_name(method: str) -> str:
    """Graph output name for an extra CAM method: ``cam_`` + the method name with ``+`` spelled
    ``p`` and any other character outside ``[A-Za-z0-9_]`` dropped (``gradcam++`` ->
    ``cam_gradcampp``)."""
    name = str(method).lower().replace("+", "p")
    return "cam_" + re.sub(r"[^a-z0-9_]", "", name)


def needs_gradients(methods: Sequence[str]) -> bool:
    """Whether a graph with ``methods`` computes gradients (one of them needs them); a graph
    without is *gradient-free*: no backward, no ``gradients`` output."""
    return any(get_method(m).gradients for m in methods)


def output_names(methods: Sequence[str], task: Optional[Task] = None) -> list[str]:
    """Output names of a CAM graph of ``task`` (default: classification) for ``methods`` (the
    first one is ``cam``); ``gradients`` only when a method needs them.

    Example::

        >>> output_names(["hirescam", "gradcam++"])
        ['logits', 'activations', 'gradients', 'cam', 'cam_gradcampp']
        >>> output_names(["eigencam", "reciprocam"])
        ['logits', 'activations', 'cam', 'cam_reciprocam']
    """
    first = BASE_OUTPUTS[0] if task is None else task.graph_output
    base = [n for n in BASE_OUTPUTS[1:] if n != "gradients" or needs_gradients(methods)]
    return [first, *base] + [method_output_name(m) for m in methods[1:]]


def input_names(inputs: Sequence[GraphInput]) -> list[str]:
    """Input names of a CAM graph whose task has target ``inputs``: ``input`` (the images), then
    theirs."""
    return ["input", *(g.name for g in inputs)]


def cam_outputs(methods: Sequence[str]) -> dict[str, str]:
    """``{method: output name}`` of a graph with ``methods``."""
    return {m: ("cam" if i == 0 else method_output_name(m)) for i, m in enumerate(methods)}


def check_methods(methods: Sequence[str]) -> tuple[str, ...]:
    """Validate and normalise a method list (lower case, no repeats, at least one)."""
    out: list[str] = []
    for m in methods:
        key = str(m).strip().lower()
        if not key:
            continue
        if not get_method(key).exportable:  # get_method: ValueError naming the known methods
            raise ValueError(f"invalid value for methods: {key!r} cannot be computed inside the "
                             f"graph (graph methods: {', '.join(available_methods(exportable=True))})")
        if key not in out:
            out.append(key)
    if not out:
        raise ValueError(f"invalid value for methods: {list(methods)!r} is empty "
                         f"(known: {', '.join(available_methods(exportable=True))})")
    names = [method_output_name(m) for m in out]
    if len(set(names)) != len(names):
        raise ValueError(f"invalid value for methods: {out!r} map to clashing output names {names}")
    return tuple(out)


def _encode(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(list(value) if isinstance(value, tuple)
                                                           else value)


@dataclass(frozen=True)
class GraphMeta:
    """What a CAM graph records about its model: ``spec`` (``target_layer`` is the graph's layer,
    ``layout`` its layout; the fields of :data:`NOT_WRITTEN` are reset to their defaults), the
    class ``labels``, the ``methods`` (the first one is output ``cam``), the camserve ``version``
    that wrote it, the map ``grid`` (h, w) and, for a token layer, ``prefix_tokens``."""

    spec: ModelSpec
    labels: tuple[str, ...]
    methods: tuple[str, ...]
    version: str = __version__
    grid: Optional[tuple[int, int]] = None
    prefix_tokens: Optional[int] = None
    quantize: Optional[str] = None

    def __post_init__(self) -> None:
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise ValueError(f"invalid value for quantize: {str(self.quantize)[:40]!r} (allowed: "
                             f"{', '.join(QUANTIZE)} or none)")
        object.__setattr__(self, "labels", tuple(str(v) for v in self.labels))
        if self.grid is not None:
            object.__setattr__(self, "grid", (int(self.grid[0]), int(self.grid[1])))
        if self.prefix_tokens is not None:
            object.__setattr__(self, "prefix_tokens", int(self.prefix_tokens))
        object.__setattr__(self, "methods", check_methods(self.methods))
        if not self.spec.target_layer:
            raise ValueError("invalid value for spec.target_layer: a CAM graph has a target layer")
        if self.spec.num_classes is not None and self.spec.num_classes != len(self.labels):
            raise ValueError(f"invalid value for labels: {len(self.labels)} labels for "
                             f"{self.spec.num_classes} classes")
        unwritten = {f: getattr(ModelSpec, f) for f in NOT_WRITTEN if hasattr(ModelSpec, f)}
        object.__setattr__(self, "spec", dataclasses.replace(
            self.spec, **unwritten, num_classes=len(self.labels)))

    @classmethod
    def from_loaded(cls, loaded: Any, methods: Sequence[str], layer: Optional[str] = None) -> "GraphMeta":
        """The description of ``loaded`` (a :class:`camserve.models.LoadedModel`) exported with
        ``methods`` at ``layer`` (default: its layer)."""
        own = layer is None or layer == loaded.layer
        layout = loaded.spec.layout
        if own and layout is None:
            layout = getattr(loaded, "layout", None)
        spec = dataclasses.replace(loaded.spec, target_layer=layer or loaded.layer, layout=layout)
        reshape = getattr(loaded, "reshape", None) if own else None
        prefix = getattr(reshape, "prefix", None)
        grid = getattr(loaded, "grid", None) if own else None
        return cls(spec, tuple(loaded.labels), tuple(methods), grid=grid, prefix_tokens=prefix)

    # -- what consumers read -----------------------------------------------------------------
    @property
    def layer(self) -> str:
        """The target layer's dotted name."""
        return str(self.spec.target_layer)

    @property
    def arch(self) -> str:
        return self.spec.arch

    @property
    def input_size(self) -> tuple[int, int]:
        return self.spec.input_size

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.spec.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.spec.std

    @property
    def topk(self) -> int:
        return self.spec.topk

    @property
    def max_pixels(self) -> int:
        return self.spec.max_pixels

    @property
    def cam_outputs(self) -> dict[str, str]:
        """``{method: output name}``."""
        return cam_outputs(self.methods)

    @property
    def gradients(self) -> bool:
        """Whether the graph computes gradients (False: a gradient-free graph, no backward)."""
        return needs_gradients(self.methods)

    @property
    def task(self) -> Task:
        """The model's task (:mod:`camserve.tasks`), with its labels and settings."""
        return make_task(self.spec.task, self.labels, self.spec.task_settings)

    @property
    def inputs(self) -> tuple[GraphInput, ...]:
        """The task's target inputs of the graph, in order (after ``input``)."""
        return self.task.graph_inputs(self.spec.input_size)

    @property
    def input_names(self) -> list[str]:
        """Names of the graph's inputs, in order."""
        return input_names(self.inputs)

    @property
    def output_names(self) -> list[str]:
        """Names of the graph's outputs, in order (the task's output first)."""
        return output_names(self.methods, self.task)

    def output_for(self, method: str) -> str:
        """Output name of ``method``'s map; ValueError naming the methods the graph has."""
        key = str(method).lower()
        if key not in self.cam_outputs:
            raise ValueError(f"invalid value for method: {str(method)[:100]!r} is not in this graph "
                             f"(available: {', '.join(self.methods)}; export with --methods)")
        return self.cam_outputs[key]

    # -- the metadata map ---------------------------------------------------------------------
    def to_props(self) -> dict[str, str]:
        """The ``metadata_props`` (all values strings; lists and maps as JSON)."""
        props = {KEYS["version"]: self.version}
        for f, key in SPEC_KEYS.items():
            value = getattr(self.spec, f)
            if value is not None or f in ALWAYS_WRITTEN:
                props[key] = _encode(value)
        props[KEYS["labels"]] = json.dumps(list(self.labels))
        props[KEYS["methods"]] = json.dumps(list(self.methods))
        props[KEYS["cam_outputs"]] = json.dumps(self.cam_outputs)
        props[KEYS["gradients"]] = json.dumps(self.gradients)
        props[KEYS["quantize"]] = json.dumps(self.quantize)
        inputs = self.inputs
        for g in inputs:
            if g.name == "target":
                props[KEYS["target"]] = g.doc
        props[KEYS["inputs"]] = json.dumps({g.name: g.doc for g in inputs})
        props[KEYS["grid"]] = json.dumps(None if self.grid is None else list(self.grid))
        props[KEYS["prefix_tokens"]] = json.dumps(self.prefix_tokens)
        return props

    @classmethod
    def from_props(cls, props: Mapping[str, str]) -> "GraphMeta":
        """Parse a metadata map; :class:`GraphFormatError` naming a missing or invalid key. The
        spec values are validated like a model config's."""
        missing = [k for k in REQUIRED if k not in props]
        if missing:
            raise GraphFormatError(f"not a camserve CAM graph: metadata key {missing[0]!r} is "
                                   f"missing (export the model with python -m export.onnx_export)")
        cfg: dict[str, Any] = {}
        key = ""
        try:
            for f, key in SPEC_KEYS.items():
                if key in props:
                    raw = props[key]
                    if f == "interpolation":  # a plain string, or null when unset
                        cfg[f] = None if raw == "null" else raw
                    elif f == "task_settings":  # the task's own handler keys, as a map
                        settings = json.loads(raw)
                        if not isinstance(settings, dict):
                            raise ValueError("task_settings must be a map")
                        cfg.update({str(k): v for k, v in settings.items()
                                    if str(k) not in ModelSpec.BASE_KEYS})
                    else:
                        cfg[f] = raw if f in ("arch", "target_layer", "method", "layout", "task") \
                            else json.loads(raw)
            key = KEYS["labels"]
            labels = json.loads(props[key])
            key = KEYS["methods"]
            methods = json.loads(props[key])
            key = KEYS["cam_outputs"]
            outs = json.loads(props[key])
            if not isinstance(labels, list) or not isinstance(methods, list) or not isinstance(outs, dict):
                raise ValueError("labels and methods must be lists, cam_outputs a map")
            key = "spec"
            spec = ModelSpec.from_config(cfg)
            key = KEYS["grid"]
            grid = json.loads(props.get(key, "null"))
            if grid is not None and (not isinstance(grid, list) or len(grid) != 2):
                raise ValueError("grid must be [h, w] or null")
            key = KEYS["prefix_tokens"]
            prefix = json.loads(props.get(key, "null"))
            if prefix is not None and (not isinstance(prefix, int) or prefix < 0):
                raise ValueError("prefix_tokens must be a count or null")
            key = KEYS["quantize"]
            quantize = json.loads(props.get(key, "null"))
            key = KEYS["methods"]
            meta = cls(spec, tuple(str(v) for v in labels), tuple(str(m) for m in methods),
                       props.get(KEYS["version"], ""), grid=None if grid is None else tuple(grid),
                       prefix_tokens=prefix, quantize=quantize)
        except (json.JSONDecodeError, ConfigError, TypeError, ValueError) as exc:
            raise GraphFormatError(f"not a camserve CAM graph: invalid metadata {key!r}: "
                                   f"{str(exc)[:200]}") from None
        if {str(k): str(v) for k, v in outs.items()} != meta.cam_outputs:
            raise GraphFormatError("not a camserve CAM graph: invalid metadata 'cam_outputs' (does "
                                   "not fit 'methods')")
        if props.get(KEYS["gradients"], json.dumps(meta.gradients)) != json.dumps(meta.gradients):
            raise GraphFormatError(f"not a camserve CAM graph: invalid metadata 'gradients' (the "
                                   f"methods {', '.join(meta.methods)} make it "
                                   f"{json.dumps(meta.gradients)})")
        try:
            names = [g.name for g in meta.inputs]
        except TaskError as exc:
            raise GraphFormatError(f"not a camserve CAM graph: invalid metadata 'task': "
                                   f"{str(exc)[:200]}") from None
        if KEYS["inputs"] in props:  # graphs written before it was recorded have a target input
            try:
                recorded = json.loads(props[KEYS["inputs"]])
            except json.JSONDecodeError:
                recorded = None
            if not isinstance(recorded, dict) or list(recorded) != names:
                raise GraphFormatError(f"not a camserve CAM graph: invalid metadata 'inputs' (the "
                                       f"{meta.spec.task} task's graph takes {', '.join(names)})")
        return meta

    @classmethod
    def from_file(cls, path: str | Path) -> "GraphMeta":
        """:meth:`from_props` of an ``.onnx`` file (reads the header, not the weights)."""
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        return cls.from_props({p.key: p.value for p in proto.metadata_props})


@dataclass
class ExportInfo:
    """What :func:`camserve.onnx.export.export_cam_onnx` did."""

    path: Path
    layer: str
    methods: tuple[str, ...]
    outputs: list[str]
    exporter: str
    seconds: float
    errors: dict[str, dict[str, float]] = field(default_factory=dict)
    redrawn: int = 0
    baseline: dict[str, dict[str, float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    #: whether the graph has a backward (False: gradient-free)
    gradients: bool = True
    #: ``"int8"`` for a quantised graph, and what int8 changed against the float graph
    quantize: Optional[str] = None
    quantized: Optional[Any] = None  #: a :class:`camserve.onnx.quantize.QuantCheck`

"""The onnxruntime backend: serve from the model folder's exported CAM graph (``model.cam.onnx``).

Needs the ``onnx`` extra, and not the model's Python code: everything the server needs is in the
graph and its metadata (:class:`camserve.onnx.format.GraphMeta`: labels, layer, methods,
preprocessing). Two sessions over the one file:

* the **CAM graph** (logits, activations, exact gradients and one map per exported method) for
  the explain rows — one graph row per (row, target): a row with K targets runs K times, in runs
  of at most ``chunk`` graph rows; only the maps of the methods the batch asks for are fetched;
* the **forward graph** — the same file's ``input -> logits`` subgraph, extracted when the backend
  starts — for predict-only rows (onnxruntime runs every node of a graph whatever is fetched, so
  asking the CAM graph for logits alone would still run its backward).

Targets are the task's (:meth:`camserve.tasks.Task.graph_inputs` names the graph's target inputs:
a class, a segmentation ``region``, an embedding's ``reference``). A task that knows its targets
before the forward (:meth:`camserve.tasks.Task.known_targets`; classification, multilabel with
named labels) feeds them with ``-1`` for a row's default (its top-1 class, resolved inside the
graph); otherwise the forward graph runs first and the task picks the targets from its output
(multilabel: the labels over the threshold; segmentation: the predicted classes over their
predicted masks, or the request's region; embedding: the ``reference_embedding`` or the
reference image's embedding, a companion row of the same batch), and each graph row is fed its
target's class, region or reference. Either way the targets the answer shows come from the task
and the graph's output (:meth:`camserve.tasks.Task.request_targets`), exactly as with the
PyTorch engine, and the raw maps go to the same rendering. Detection graphs are not served
(a :class:`~camserve.models.ConfigError`: serve detectors with ``backend: torch``).

The served :class:`~camserve.models.ModelSpec` is the graph's for what the graph fixes (arch,
classes, layer, input size, mean, std, interpolation, task) and the folder's for how it is served
(method, topk, outputs, formats, budgets). A folder key that contradicts the graph is a
:class:`~camserve.models.ConfigError` naming it (the graph is stale: export it again), and so is
a default method the graph lacks.

Example::

    >>> import tempfile, torch
    >>> from camserve.models import ModelSpec, from_module
    >>> from camserve.onnx.export import export_cam_onnx
    >>> from camserve.testing.nets import TinyNet, frozen
    >>> lm = from_module(frozen(TinyNet(num_classes=3, seed=0)),
    ...                  ModelSpec(arch="tiny", target_layer="features", input_size=(32, 32)))
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = export_cam_onnx(lm, f"{d}/model.cam.onnx", methods=("gradcam", "layercam"))
    ...     backend = OnnxBackend(f"{d}/model.cam.onnx", threads=1)
    >>> backend.layer, backend.methods, tuple(backend.predict(torch.rand(2, 3, 32, 32)).shape)
    ('features', ('gradcam', 'layercam'), (2, 3))
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..errors import MethodUnavailable
from ..explain import BatchCams, CamRequest
from ..models import LABELS_FILE, ConfigError, ModelSpec, load_labels
from ..parsing import short_repr
from ..tasks import TargetBatch, make_task
from .base import GRAPH_FILE, Backend

log = logging.getLogger(__name__)

#: Graph rows per session run (a batch whose rows ask for many targets runs in several).
DEFAULT_CHUNK = 32
#: ModelSpec fields the graph fixes (the folder may repeat them, not contradict them).
MODEL_FIELDS: tuple[str, ...] = ("arch", "num_classes", "target_layer", "input_size", "mean", "std",
                                 "layout", "arch_args", "interpolation", "crop", "task")
#: What a graph input of each kind (:data:`camserve.tasks.GRAPH_INPUT_KINDS`) is fed from: the
#: :class:`~camserve.tasks.TargetBatch` field of the graph row's target.
FED_FROM: dict[str, str] = {"class": "index", "region": "region", "vector": "reference"}
#: Tasks whose CAM graphs this backend does not serve (their targets are not rows of tensors yet).
NOT_SERVED: tuple[str, ...] = ("detection",)


class OnnxBackend(Backend):
    """onnxruntime sessions over the CAM graph at ``graph`` (see the module docstring).

    Args:
        graph: the ``.onnx`` file (exported by :func:`camserve.onnx.export.export_cam_onnx`).
        spec: the folder's :class:`~camserve.models.ModelSpec` (how the model is served); default:
            the graph's own.
        device: ``cpu``, or ``cuda`` / ``cuda:N`` for onnxruntime's CUDA (and TensorRT)
            providers (:func:`camserve.onnx.session.providers`: the CPU, with a warning, where
            onnxruntime has no CUDA provider).
        threads: intra-op threads of each session (the worker's share of the cores,
            :func:`camserve.backends.threads.worker_threads`); None: onnxruntime's default.
        chunk: graph rows per session run.
    """

    name = "onnxruntime"

    def __init__(self, graph: str | Path, *, spec: Optional[ModelSpec] = None,
                 device: str | torch.device = "cpu", threads: Optional[int] = None,
                 chunk: int = DEFAULT_CHUNK) -> None:
        from ..onnx.format import GraphFormatError, GraphMeta

        self.graph = Path(graph)
        if not self.graph.is_file():
            raise ConfigError(f"invalid value for handler.backend: onnxruntime serves the model "
                              f"folder's {GRAPH_FILE}, and {short_repr(str(self.graph))} does not "
                              f"exist (export it: python -m export.onnx_export FOLDER --out "
                              f"FOLDER/{GRAPH_FILE})")
        try:
            self.meta = GraphMeta.from_file(self.graph)
        except GraphFormatError as exc:
            raise ConfigError(f"invalid value for handler.backend: {self.graph.name}: {exc}") from None
        if self.meta.spec.task in NOT_SERVED:
            raise ConfigError(f"invalid value for handler.backend: onnxruntime does not serve "
                              f"{self.meta.spec.task} graphs ({self.graph.name}); serve this model "
                              f"with backend: torch")
        self.spec = serving_spec(self.meta, spec)
        self.labels = list(self.meta.labels)
        self.task = make_task(self.spec.task, self.labels, self.spec.task_settings)
        self.layer = self.meta.layer
        self.inputs = self.task.graph_inputs(self.spec.input_size)
        self.output_name = self.task.graph_output
        self.methods = tuple(self.meta.methods)
        if self.spec.method not in self.methods:
            raise ConfigError(f"invalid value for handler.method: {self.spec.method!r} is not in "
                              f"{self.graph.name} (its methods: {', '.join(self.methods)}; export "
                              f"with --methods)")
        self.chunk = max(1, int(chunk))
        self.threads = threads
        self.device = torch.device("cpu")  # inputs are fed and outputs read on the host
        self.provider_device = str(device)  # the session factory checks it
        self.cam_session = self._session(self.graph)
        self._check_inputs()
        self.forward_session = self._session(forward_graph(self.graph, self.output_name))

    # -- sessions -------------------------------------------------------------------------------
    def _session(self, model: str | Path | bytes) -> Any:
        from ..onnx.session import ort_session

        return ort_session(model, device=self.provider_device, threads=self.threads,
                           spinning=False)

    def _check_inputs(self) -> None:
        # an optional target input is an initializer the graph's caller may override
        required = [i.name for i in self.cam_session.get_inputs()]
        overridable = {i.name for i in self.cam_session.get_overridable_initializers()}
        want = ["input", *(g.name for g in self.inputs)]
        if [n for n in required if n not in want] or [n for n in want if n not in required and
                                                      (n == "input" or n not in overridable)]:
            raise ConfigError(f"invalid value for handler.backend: {self.graph.name} takes inputs "
                              f"{required}, but the {self.task.name} task feeds {', '.join(want)} "
                              f"(export the graph again)")
        outs = {o.name for o in self.cam_session.get_outputs()}
        missing = [o for o in [self.output_name, *self.meta.cam_outputs.values()] if o not in outs]
        if missing:
            raise ConfigError(f"invalid value for handler.backend: {self.graph.name} has no output "
                              f"{missing[0]!r} (its metadata names it)")

    @property
    def layer_size(self) -> Any:
        """The target layer's (channels, h, w) from the graph's ``activations`` output, where
        static: what the served methods' costs are counted on."""
        from ..methods import LayerSize

        for o in self.cam_session.get_outputs():
            if o.name == "activations" and len(o.shape) == 4 and \
                    all(isinstance(d, int) for d in o.shape[1:]):
                return LayerSize(*(int(d) for d in o.shape[1:]))
        return None

    @property
    def providers(self) -> list[str]:
        """The providers of the CAM graph's session, in order."""
        return list(self.cam_session.get_providers())

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "graph": self.graph.name, "providers": self.providers,
                "threads": self.threads}

    def check(self, spec: Any) -> None:
        given = spec.given()
        if given:
            raise MethodUnavailable(f"{spec.name} with {', '.join(sorted(given))}",
                                    [m for m in self.methods], what="the exported graph runs "
                                    "its methods with their default options")

    # -- the two questions ----------------------------------------------------------------------
    def predict(self, x: torch.Tensor) -> Any:
        return self.task.output(torch.from_numpy(self._forward(_host(x))))

    def explain(self, x: torch.Tensor, rows: Sequence[int], request: CamRequest) -> BatchCams:
        xn = _host(x)
        rows = [int(r) for r in rows]
        outs: dict[int, np.ndarray] = {}  # batch row -> its output row
        known = request.known_targets(self.task)
        resolved = known is None
        if known is None:  # the targets need the output: the forward graph first
            first = self._forward(xn[rows])
            outs.update(zip(rows, first))
            out = self.task.output(torch.from_numpy(first))
            known = request.targets(self.task, self.task.detach(out)).to("cpu")
        owner = [r for r in range(len(rows)) for _ in range(known.count[r])]
        slot = [k for r in range(len(rows)) for k in range(known.count[r])]
        methods = request.methods
        names = {m: self.meta.output_for(m) for m in dict.fromkeys(methods)}
        out_g, maps = self._run_cam(xn[rows][owner], self._feed(known, owner, slot),
                                    list(names.values()))
        # the batch's output: explained rows from their first graph row, the others forward only
        for g, r in enumerate(owner):
            outs.setdefault(rows[r], out_g[g])
        rest = [i for i in range(xn.shape[0]) if i not in outs]
        if rest:
            outs.update(zip(rest, self._forward(xn[rest])))
        output = self.task.output(torch.from_numpy(np.stack([outs[i] for i in range(len(outs))])))
        if resolved:  # the targets were picked from this very output
            tb = known
        else:
            chosen = self.task.select(output, torch.tensor(rows, dtype=torch.long))
            tb = request.targets(self.task, self.task.detach(chosen)).to("cpu")
            _check_resolved(known, tb)
        cams = self._assemble(tb, owner, slot, [methods[r] for r in owner], names, maps)
        return BatchCams(cams=cams, targets=tb, output=output, layer=self.layer)

    # -- internals ------------------------------------------------------------------------------
    def _forward(self, x: np.ndarray) -> np.ndarray:
        """The task's output of ``x`` from the forward graph, in runs of at most ``chunk`` rows
        (``x`` has at least one row)."""
        parts = [self.forward_session.run([self.output_name], {"input": x[i:i + self.chunk]})[0]
                 for i in range(0, x.shape[0], self.chunk)]
        return np.concatenate(parts)

    def _feed(self, targets: TargetBatch, owner: list[int], slot: list[int]) -> dict[str, np.ndarray]:
        """The graph's target inputs of the graph rows (``owner[g]``, ``slot[g]``): each input from
        the target's field of its kind (:data:`FED_FROM`); an optional input whose field the
        targets lack gets the graph's default."""
        feed: dict[str, np.ndarray] = {}
        for g in self.inputs:
            value = getattr(targets, FED_FROM[g.kind])
            if value is None:
                if not g.optional:
                    raise RuntimeError(f"the {self.task.name} task gave no {FED_FROM[g.kind]} for "
                                       f"the graph input {g.name!r}")
                feed[g.name] = g.fill(len(owner)).numpy()
                continue
            rows = value.cpu()[owner, slot] if owner else value.cpu()[:0, 0]
            if tuple(rows.shape[1:]) != tuple(g.shape):
                raise RuntimeError(f"the graph input {g.name!r} takes rows of shape {g.shape}, the "
                                   f"task's targets have {tuple(rows.shape[1:])}")
            feed[g.name] = np.ascontiguousarray(rows.to(g.dtype).numpy())
        return feed

    def _run_cam(self, x: np.ndarray, feed: dict[str, np.ndarray],
                 outputs: list[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The task's output (G, ...) and the maps ``outputs`` (each (G, h, w)) of G graph rows
        (``x`` and each target input of ``feed`` row by row)."""
        fetch = [self.output_name, *outputs]
        parts: list[list[np.ndarray]] = []
        for i in range(0, x.shape[0], self.chunk):
            part = {"input": x[i:i + self.chunk],
                    **{k: v[i:i + self.chunk] for k, v in feed.items()}}
            parts.append(self.cam_session.run(fetch, part))
        if not parts:
            return np.zeros((0,), np.float32), {}
        joined = [np.concatenate([p[j] for p in parts]) for j in range(len(fetch))]
        return joined[0], dict(zip(outputs, joined[1:]))

    @staticmethod
    def _assemble(tb: TargetBatch, owner: list[int], slot: list[int], row_methods: list[str],
                  names: dict[str, str], maps: dict[str, np.ndarray]) -> torch.Tensor:
        """(R, K, h, w) maps: graph row g at (owner[g], slot[g]) from its row's method's output;
        padding targets repeat the row's first map (as the engine computes them)."""
        if not maps:
            return torch.zeros(tb.rows, tb.k, 1, 1)
        h, w = next(iter(maps.values())).shape[-2:]
        cams = torch.zeros(tb.rows, tb.k, h, w)
        for g, (r, k, m) in enumerate(zip(owner, slot, row_methods)):
            cams[r, k] = torch.from_numpy(maps[names[m]][g])
        for r, c in enumerate(tb.count):
            if 0 < c < tb.k:
                cams[r, c:] = cams[r, :1]
        return cams


def _host(x: torch.Tensor) -> np.ndarray:
    """A batch as the contiguous float32 array a session is fed."""
    return np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())


def _check_resolved(known: TargetBatch, resolved: TargetBatch) -> None:
    """The targets the graph ran (``-1``: the row's default) are the ones the task resolves."""
    fixed = known.index >= 0
    if known.count != resolved.count or known.index.shape != resolved.index.shape or \
            not torch.equal(known.index[fixed], resolved.index.to(known.index.device)[fixed]):
        raise RuntimeError("the task resolved other targets than the graph was given")


def serving_spec(meta: Any, spec: Optional[ModelSpec]) -> ModelSpec:
    """The spec a graph is served with: the graph's :data:`MODEL_FIELDS`, the folder's serving
    keys (``spec``; the graph's own when None). A model key the folder sets to another value than
    the graph's is a :class:`~camserve.models.ConfigError` naming it."""
    graph: ModelSpec = meta.spec
    if spec is None:
        return dataclasses.replace(graph, backend="onnxruntime")
    for f in MODEL_FIELDS:
        mine, theirs = getattr(spec, f), getattr(graph, f)
        if f in spec.given and _norm(mine) != _norm(theirs):
            raise ConfigError(f"invalid value for handler.{f}: {short_repr(_norm(mine))}, but the "
                              f"graph was exported with {short_repr(_norm(theirs))} (export it "
                              f"again: python -m export.onnx_export FOLDER --out FOLDER/{GRAPH_FILE})")
    changes = {f: getattr(graph, f) for f in MODEL_FIELDS}
    if not spec.task_settings:
        changes["task_settings"] = dict(graph.task_settings)
    return dataclasses.replace(spec, **changes)


def check_labels(backend: OnnxBackend, model_dir: str | Path) -> None:
    """The folder's labels (its labels file, when it has one) are the graph's; ConfigError naming
    ``handler.labels`` and the first difference otherwise."""
    if backend.spec.labels is None and not (Path(model_dir) / LABELS_FILE).is_file():
        return  # no labels file: the graph's labels stand
    folder = load_labels(backend.spec, model_dir, len(backend.labels))
    for i, (mine, theirs) in enumerate(zip(folder, backend.labels)):
        if mine != theirs:
            raise ConfigError(f"invalid value for handler.labels: label {i} is "
                              f"{short_repr(mine)} in the folder but {short_repr(theirs)} in "
                              f"{backend.graph.name} (export the graph again: python -m "
                              f"export.onnx_export FOLDER --out FOLDER/{GRAPH_FILE})")


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def forward_graph(path: str | Path, output: str = "logits") -> bytes:
    """The ``input -> output`` subgraph of the CAM graph at ``path`` (the forward pass only; the
    task's output, :attr:`camserve.tasks.Task.graph_output`), as a serialized ONNX model with the
    same metadata."""
    import onnx
    from onnx.utils import Extractor

    model = onnx.load(str(path))
    sub = Extractor(model).extract_model(["input"], [output])
    del sub.metadata_props[:]
    sub.metadata_props.extend(model.metadata_props)
    return sub.SerializeToString()

"""A fake TorchServe context: what a handler sees in a TorchServe 0.12 worker, without TorchServe.

:class:`FakeContext` has the attributes and methods of ``ts.context.Context`` that a handler uses
(``system_properties``, ``manifest``, ``model_name``, ``model_yaml_config``, ``metrics``,
``request_ids``, per-row request headers, per-row response status, phrase, headers and content
type), with the same names and signatures, so a handler runs on it exactly as in a worker; it
needs neither the ``ts`` package nor a server. :class:`MetricsRecorder` stands in for the worker's
metrics cache and records every call.

Example::

    >>> ctx = FakeContext("/models/shapes", model_yaml_config={"batchSize": 4, "handler": {}})
    >>> ctx.system_properties["model_dir"], ctx.system_properties["batch_size"]
    ('/models/shapes', 4)
    >>> ctx.set_requests([{"explain": "True"}, {}])
    >>> ctx.get_request_header(0, "explain"), ctx.get_request_header(1, "explain")
    ('True', None)
    >>> ctx.set_response_status(422, "Unprocessable Entity", 1)
    >>> ctx.set_response_content_type(1, "application/json")
    >>> ctx.statuses()
    [(200, None), (422, 'Unprocessable Entity')]
    >>> ctx.get_response_content_type(1)
    'application/json'
    >>> ctx.metrics.add_counter("CamRequestErrors", 1)
    >>> ctx.metrics.names()
    {'CamRequestErrors'}
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

#: TorchServe version the fake reports (``system_properties["server_version"]``).
TS_VERSION = "0.12.0"


@dataclass(frozen=True)
class MetricCall:
    """One recorded metrics call: ``kind`` is the method (``time``, ``counter``, ``size``,
    ``percent``, ``error`` or ``metric``)."""

    kind: str
    name: str
    value: float
    unit: Optional[str] = None
    idx: Optional[str] = None
    dimensions: tuple[Any, ...] = ()


class MetricsRecorder:
    """Stands in for TorchServe's metrics cache (``context.metrics``): records ``add_*`` calls.

    The signatures are those of ``ts.metrics.metric_cache_abstract.MetricCacheAbstract``.
    """

    def __init__(self) -> None:
        self.calls: list[MetricCall] = []

    def _add(self, kind: str, name: str, value: float, unit: Optional[str], idx: Optional[str],
             dimensions: Optional[Sequence[Any]]) -> None:
        self.calls.append(MetricCall(kind, name, value, unit, idx, tuple(dimensions or ())))

    def add_metric(self, name: str, value: float, unit: str, idx: Optional[str] = None,
                   dimensions: Optional[Sequence[Any]] = None, metric_type: Any = None) -> None:
        self._add("metric", name, value, unit, idx, dimensions)

    def add_counter(self, name: str, value: float, idx: Optional[str] = None,
                    dimensions: Optional[Sequence[Any]] = None) -> None:
        self._add("counter", name, value, None, idx, dimensions)

    def add_time(self, name: str, value: float, idx: Optional[str] = None, unit: str = "ms",
                 dimensions: Optional[Sequence[Any]] = None, metric_type: Any = None) -> None:
        self._add("time", name, value, unit, idx, dimensions)

    def add_size(self, name: str, value: float, idx: Optional[str] = None, unit: str = "MB",
                 dimensions: Optional[Sequence[Any]] = None, metric_type: Any = None) -> None:
        self._add("size", name, value, unit, idx, dimensions)

    def add_percent(self, name: str, value: float, idx: Optional[str] = None,
                    dimensions: Optional[Sequence[Any]] = None, metric_type: Any = None) -> None:
        self._add("percent", name, value, "percent", idx, dimensions)

    def add_error(self, name: str, value: float,
                  dimensions: Optional[Sequence[Any]] = None) -> None:
        self._add("error", name, value, None, None, dimensions)

    def names(self) -> set[str]:
        """Names of all recorded metrics."""
        return {c.name for c in self.calls}

    def values(self, name: str) -> list[float]:
        """Recorded values of metric ``name``, in call order."""
        return [c.value for c in self.calls if c.name == name]

    def clear(self) -> None:
        """Forget the recorded calls."""
        self.calls.clear()


@dataclass
class FakeRequest:
    """One row's request headers and the response status, phrase and headers a handler sets
    (``ts.context.RequestProcessor``)."""

    headers: dict[str, str] = field(default_factory=dict)
    status: int = 200
    phrase: Optional[str] = None
    response_headers: dict[str, str] = field(default_factory=dict)

    # the RequestProcessor methods, for code that reaches into context.request_processor
    def get_request_property(self, key: str) -> Optional[str]:
        return self.headers.get(key)

    def get_request_properties(self) -> dict[str, str]:
        return self.headers

    def report_status(self, code: int, reason_phrase: Optional[str] = None) -> None:
        self.status, self.phrase = code, reason_phrase

    def get_response_status_code(self) -> int:
        return self.status

    def get_response_status_phrase(self) -> Optional[str]:
        return self.phrase

    def add_response_property(self, key: str, value: str) -> None:
        self.response_headers[key] = value

    def get_response_headers(self) -> dict[str, str]:
        return self.response_headers

    def get_response_header(self, key: str) -> Optional[str]:
        return self.response_headers.get(key)


def default_manifest(model_name: str, *, serialized_file: Optional[str] = "weights.pt",
                     model_file: Optional[str] = None, handler: str = "gradcam_handler.py",
                     config_file: Optional[str] = "model-config.yaml") -> dict[str, Any]:
    """The ``MAR-INF/MANIFEST.json`` torch-model-archiver 0.12 writes for such an archive."""
    model: dict[str, Any] = {"modelName": model_name, "handler": handler, "modelVersion": "1.0"}
    if serialized_file:
        model["serializedFile"] = serialized_file
    if model_file:
        model["modelFile"] = model_file
    if config_file:
        model["configFile"] = config_file
    return {"runtime": "python", "model": model, "archiverVersion": TS_VERSION}


class FakeContext:
    """What a TorchServe 0.12 worker hands to ``initialize`` and ``handle``.

    ``model_dir`` is the (extracted archive's) model folder. ``model_yaml_config`` defaults to the
    folder's ``model-config.yaml`` (read like TorchServe reads the archive's config file), or ``{}``
    when there is none; ``batch_size`` defaults to its ``batchSize`` (else 1). ``manifest``
    defaults to :func:`default_manifest`. ``gpu_id`` is what TorchServe assigns (None: CPU).
    Call :meth:`set_requests` before each ``handle`` with one header mapping per row.
    """

    def __init__(self, model_dir: str | Path, *, model_yaml_config: Optional[Mapping[str, Any]] = None,
                 manifest: Optional[Mapping[str, Any]] = None, model_name: str = "model",
                 batch_size: Optional[int] = None, gpu_id: Optional[int] = None,
                 serialized_file: Optional[str] = "weights.pt", model_file: Optional[str] = None,
                 metrics: Any = None, limit_max_image_pixels: bool = True) -> None:
        if model_yaml_config is None:
            model_yaml_config = _read_config(Path(model_dir) / "model-config.yaml")
        self.model_name = model_name
        self.model_yaml_config: dict[str, Any] = dict(model_yaml_config)
        if batch_size is None:
            batch_size = int(self.model_yaml_config.get("batchSize", 1))
        self.manifest: dict[str, Any] = dict(manifest) if manifest is not None else default_manifest(
            model_name, serialized_file=serialized_file, model_file=model_file)
        self._system_properties: dict[str, Any] = {
            "model_dir": str(model_dir), "gpu_id": gpu_id, "batch_size": batch_size,
            "server_name": "MMS", "server_version": TS_VERSION,
            "limit_max_image_pixels": limit_max_image_pixels}
        self.metrics = metrics if metrics is not None else MetricsRecorder()
        self.request_ids: Optional[dict[int, str]] = None
        self.request_processor: Optional[list[FakeRequest]] = None

    @property
    def system_properties(self) -> dict[str, Any]:
        """``model_dir``, ``gpu_id``, ``batch_size``, ``server_name``, ``server_version``,
        ``limit_max_image_pixels`` (as TorchServe sets them)."""
        return self._system_properties

    # -- per batch ----------------------------------------------------------------------------

    def set_requests(self, headers: Sequence[Mapping[str, str]]) -> None:
        """Start a batch: one request (its header mapping) per row, ids ``req-0``, ``req-1``, ..."""
        self.request_processor = [FakeRequest(headers=dict(h)) for h in headers]
        self.request_ids = {i: f"req-{i}" for i in range(len(headers))}

    def _row(self, idx: int) -> FakeRequest:
        if self.request_processor is None:  # TorchServe's Context raises TypeError here too
            raise TypeError("FakeContext: no requests yet (call set_requests with one header "
                            "mapping per row first)")
        return self.request_processor[idx]

    def get_request_id(self, idx: int = 0) -> Optional[str]:
        return None if self.request_ids is None else self.request_ids.get(idx)

    def get_request_header(self, idx: int, key: str) -> Optional[str]:
        return self._row(idx).headers.get(key)

    def get_all_request_header(self, idx: int) -> dict[str, str]:
        return self._row(idx).headers

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        if self.request_processor is not None:
            self._row(idx).report_status(code, phrase)

    def set_all_response_status(self, code: int = 200, phrase: str = "") -> None:
        for row in self.request_processor or ():
            row.report_status(code, phrase)

    def get_response_status(self, idx: int) -> tuple[int, Optional[str]]:
        row = self._row(idx)
        return row.status, row.phrase

    def set_response_header(self, idx: int, key: str, value: str) -> None:
        self._row(idx).response_headers[key] = value

    def get_response_headers(self, idx: int) -> dict[str, str]:
        return self._row(idx).response_headers

    def set_response_content_type(self, idx: int, value: str) -> None:
        self.set_response_header(idx, "content-type", value)

    def get_response_content_type(self, idx: int) -> Optional[str]:
        return self.get_response_headers(idx).get("content-type")

    # -- conveniences for tests ---------------------------------------------------------------

    def statuses(self) -> list[tuple[int, Optional[str]]]:
        """``(status, phrase)`` of every row of the current batch."""
        return [(r.status, r.phrase) for r in self.request_processor or ()]

    def content_types(self) -> list[Optional[str]]:
        """The response content type of every row of the current batch."""
        return [r.response_headers.get("content-type") for r in self.request_processor or ()]


def _read_config(path: Path) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        return {}
    doc = yaml.safe_load(path.read_text())
    return dict(doc) if isinstance(doc, Mapping) else {}

"""Serving core: request parsing, option validation, one batched explain pass, JSON responses.

Everything a model server needs except the server: the TorchServe handler
(``handler/gradcam_handler.py``) is a thin adapter over :class:`CamService`, and this module never
imports TorchServe. It lives here because TorchServe's loader refuses a handler module that
defines more than one class.

A request row is what TorchServe hands a handler for one request:

* raw body: ``{"body": b"<image bytes>"}``;
* multipart/form-data: one key per form field, ``{"data": b"<image>", "explain": "true", ...}``;
* JSON (``Content-Type: application/json``): ``{"body": {"data": "<base64>", "explain": true}}``;
* KServe v1 ``{"instances": [{"data": "<base64>", ...}]}`` (one instance) and v2
  ``{"inputs": [{"name": "data", "datatype": "BYTES", "data": ["<base64>"]}], "parameters": {...}}``.

Options: ``explain`` (true/false), ``target`` (class index, label, or a list of them), ``topk``,
``method`` (a registered CAM method), ``outputs`` (a subset of heatmap, overlay, raw, bbox).

A batch is explained with one forward pass (:meth:`CamEngine.__call__` with ``rows=``): gradients
only for the rows that asked to explain, each with its own targets and method; predict-only
batches run under ``torch.inference_mode()``. Maps are upsampled, normalised and turned into uint8
on the model's device and copied to the host once per batch; PNGs are encoded on the CPU.

Example::

    >>> import io, torch, torchvision
    >>> from PIL import Image
    >>> from camserve.models import ModelSpec
    >>> spec = ModelSpec.from_config({"arch": "torchvision.models.resnet18", "num_classes": 4,
    ...                               "target_layer": "layer4", "input_size": 64})
    >>> svc = CamService(torchvision.models.resnet18(num_classes=4).eval(), spec)
    >>> buf = io.BytesIO(); Image.new("RGB", (40, 30), "red").save(buf, "PNG")
    >>> [res] = svc.handle_batch([{"data": buf.getvalue(), "explain": "true"}])
    >>> res.status, sorted(res.body), res.body["explanations"][0]["width"]
    (200, ['explanations', 'predictions'], 40)
"""
from __future__ import annotations

import base64
import binascii
import http
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from .engine import CamEngine, heatmaps_at_sizes
from .images import ImageError, decode_image, preprocess
from .methods import available_methods, get_method
from .models import ConfigError, ModelSpec, build_model, load_labels, parse_outputs
from .render import b64, bbox_from_heatmap, heatmap_png, overlay_png

log = logging.getLogger(__name__)

OPTION_KEYS: tuple[str, ...] = ("explain", "target", "topk", "method", "outputs")
DATA_KEYS: tuple[str, ...] = ("data", "body")
MAX_TARGETS = 16
TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
FALSE_WORDS = frozenset({"false", "0", "no", "off", ""})
MAP_OUTPUTS = frozenset({"heatmap", "overlay", "bbox"})


class RequestError(ValueError):
    """A request that cannot be answered: ``code`` is the HTTP status, ``type`` a short name.

    Codes: 400 (no or undecodable image, bad base64, bad JSON), 413 (image over the pixel limit),
    422 (a bad option).
    """

    def __init__(self, message: str, code: int = 400, type: str = "InvalidRequest") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.type = type

    @property
    def phrase(self) -> str:
        """The HTTP reason phrase of :attr:`code`."""
        try:
            return http.HTTPStatus(self.code).phrase
        except ValueError:
            return "Error"

    def to_body(self) -> dict[str, Any]:
        """The JSON error body: ``{"code": ..., "type": ..., "message": ...}``."""
        return {"code": self.code, "type": self.type, "message": self.message}

    @classmethod
    def from_image_error(cls, exc: ImageError) -> "RequestError":
        """Wrap a :class:`camserve.images.ImageError`, keeping its code and type."""
        return cls(str(exc), exc.code, exc.type)


class OptionError(RequestError):
    """An option value that is not allowed (HTTP 422); the message names the option."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 422, "InvalidOption")


@dataclass(frozen=True)
class RawRequest:
    """One request's image bytes and its options, as sent (not yet validated)."""

    data: bytes
    options: dict[str, Any]


@dataclass(frozen=True)
class RequestOptions:
    """Validated options of one request. ``targets`` None means the top-1 prediction."""

    explain: bool
    targets: Optional[tuple[int, ...]]
    topk: int
    method: str
    outputs: tuple[str, ...]


@dataclass
class RowResult:
    """The answer to one request: HTTP ``status``, its reason ``phrase`` and the JSON ``body``."""

    status: int
    body: dict[str, Any]
    phrase: str = "OK"

    def to_json(self) -> str:
        """The body as compact JSON text."""
        return json.dumps(self.body, separators=(",", ":"))


@dataclass
class BatchStats:
    """What the last batch did, for metrics: rows, explained rows, errors, milliseconds spent."""

    rows: int = 0
    explained_rows: int = 0
    error_rows: int = 0
    maps: int = 0
    cam_ms: float = 0.0
    total_ms: float = 0.0


# -- request parsing ------------------------------------------------------------------------------
def _decode_b64(text: str, where: str) -> bytes:
    s = text.strip()
    if s.startswith("data:"):
        head, sep, rest = s.partition(",")
        if not sep or ";base64" not in head:
            raise RequestError(f"not an image: {where} is a data URL without ';base64,'", 400,
                               "InvalidImage")
        s = rest
    s = "".join(s.split())
    if not s:
        raise RequestError(f"not an image: {where} is empty", 400, "InvalidImage")
    s += "=" * (-len(s) % 4)
    alphabet = "-_" if ("-" in s or "_" in s) else "+/"
    try:
        return base64.b64decode(s, altchars=alphabet.encode(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RequestError(f"not an image: {where} is not valid base64 ({exc}; {len(text)} "
                           f"characters)", 400, "InvalidImage") from None


def _maybe_json(payload: bytes | str) -> Any:
    """Parse a JSON object sent without a JSON content type; the payload itself otherwise."""
    text = payload.lstrip()[:1]
    if text not in (b"{", "{"):
        return payload
    try:
        return json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"invalid JSON body: {exc}", 400, "InvalidRequest") from None


def _image_from(value: Any, where: str) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return _decode_b64(value, where)
    if isinstance(value, Mapping) and isinstance(value.get("b64"), str):
        return _decode_b64(value["b64"], f"{where}.b64")
    raise RequestError(f"invalid value for {where}: expected a base64 string, got "
                       f"{type(value).__name__}", 400, "InvalidRequest")


def _from_json(doc: Mapping[str, Any]) -> RawRequest:
    """A parsed JSON request: ours, KServe v1 (one instance) or KServe v2 (one BYTES input)."""
    if "instances" in doc and "data" not in doc:
        inst = doc["instances"]
        if not isinstance(inst, list) or len(inst) != 1:
            got = len(inst) if isinstance(inst, list) else type(inst).__name__
            raise RequestError(f"invalid value for instances: expected a list of exactly one "
                               f"instance, got {got}", 400, "InvalidRequest")
        item = inst[0]
        if isinstance(item, Mapping) and "b64" not in item:
            return _from_json(item)
        return RawRequest(_image_from(item, "instances[0]"), {})
    if "inputs" in doc and "data" not in doc:
        inputs = doc["inputs"]
        if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], Mapping):
            raise RequestError("invalid value for inputs: expected a list of exactly one input "
                               "object", 400, "InvalidRequest")
        values = inputs[0].get("data")
        if isinstance(values, list) and len(values) == 1:
            values = values[0]
        params = doc.get("parameters") or {}
        if not isinstance(params, Mapping):
            raise OptionError(f"invalid value for parameters: expected an object, got "
                              f"{type(params).__name__}")
        return RawRequest(_image_from(values, "inputs[0].data"), dict(params))
    if "data" not in doc:
        raise RequestError(f"missing field 'data' (a base64-encoded image) in the JSON object; "
                           f"keys sent: {', '.join(map(str, doc)) or 'none'}", 400, "InvalidRequest")
    options = {k: v for k, v in doc.items() if k != "data"}
    return RawRequest(_image_from(doc["data"], "data"), options)


def extract_request(row: Any) -> RawRequest:
    """Image bytes and raw options of one TorchServe request row (see the module docstring).

    Raises :class:`RequestError` (400) when no image is found or the JSON/base64 is bad.
    """
    if isinstance(row, (bytes, bytearray, memoryview, str)):
        row = {"body": row}
    if not isinstance(row, Mapping):
        raise RequestError(f"invalid request: expected a body or form fields, got "
                           f"{type(row).__name__}", 400, "InvalidRequest")
    key = next((k for k in DATA_KEYS if k in row), None)
    if key is None:
        raise RequestError(f"missing image: send it as the request body, as the form field "
                           f"'data', or as JSON {{\"data\": \"<base64>\"}}; fields sent: "
                           f"{', '.join(map(str, row)) or 'none'}", 400, "InvalidRequest")
    fields = {k: v for k, v in row.items() if k not in DATA_KEYS}
    payload = row[key]
    if isinstance(payload, (bytes, bytearray, memoryview)):
        payload = _maybe_json(bytes(payload))
    elif isinstance(payload, str):
        payload = _maybe_json(payload)
    if isinstance(payload, Mapping):
        req = _from_json(payload)
        return RawRequest(req.data, {**fields, **req.options})
    if isinstance(payload, list):
        raise RequestError("invalid JSON body: expected an object {\"data\": \"<base64>\", ...}, "
                           "got a list", 400, "InvalidRequest")
    return RawRequest(_image_from(payload, key), fields)


# -- option validation ----------------------------------------------------------------------------
def _text(name: str, value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise OptionError(f"invalid value for {name}: not UTF-8 text") from None
    return value


def _parse_bool(name: str, value: Any) -> bool:
    value = _text(name, value)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
    raise OptionError(f"invalid value for {name}: {value!r} (allowed: true, false, 1, 0, yes, no)")


def _parse_int(name: str, value: Any, lo: int, hi: int) -> int:
    value = _text(name, value)
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        value = int(value.strip())
    if not isinstance(value, int) or isinstance(value, bool):
        raise OptionError(f"invalid value for {name}: {value!r} (an integer {lo}..{hi})")
    if not lo <= value <= hi:
        raise OptionError(f"invalid value for {name}: {value} (allowed: {lo}..{hi})")
    return value


def _known_labels(labels: Sequence[str]) -> str:
    shown = ", ".join(labels[:10])
    return shown + (f", ... ({len(labels)} in all)" if len(labels) > 10 else "")


def _parse_targets(value: Any, labels: Sequence[str]) -> Optional[tuple[int, ...]]:
    value = _text("target", value)
    if value is None:
        return None
    n = len(labels)
    if isinstance(value, str):
        s = value.strip()
        if not s:
            return None
        if s.startswith("["):
            try:
                value = json.loads(s)
            except json.JSONDecodeError:
                raise OptionError(f"invalid value for target: {value!r} is not a JSON list") from None
        else:
            value = [p for p in (q.strip() for q in s.split(",")) if p]
    items = value if isinstance(value, (list, tuple)) else [value]
    if not items:
        raise OptionError("invalid value for target: empty list (a class index, a label, or a "
                          "list of them)")
    if len(items) > MAX_TARGETS:
        raise OptionError(f"invalid value for target: {len(items)} targets (at most {MAX_TARGETS} "
                          f"per request)")
    lower = {lab.lower(): i for i, lab in reversed(list(enumerate(labels)))}
    exact = {lab: i for i, lab in reversed(list(enumerate(labels)))}
    out: list[int] = []
    for item in items:
        if isinstance(item, str) and item.strip().lstrip("+-").isdigit():
            item = int(item.strip())
        if isinstance(item, int) and not isinstance(item, bool):
            if not 0 <= item < n:
                raise OptionError(f"invalid value for target: class index {item} out of range "
                                  f"(allowed: 0..{n - 1})")
            out.append(item)
        elif isinstance(item, str):
            name = item.strip()
            idx = exact.get(name, lower.get(name.lower()))
            if idx is None:
                raise OptionError(f"invalid value for target: unknown label {name!r} (known: "
                                  f"{_known_labels(labels)}; or a class index 0..{n - 1})")
            out.append(idx)
        else:
            raise OptionError(f"invalid value for target: {item!r} (a class index 0..{n - 1} or "
                              f"a label)")
    return tuple(out)


def _parse_outputs(value: Any) -> tuple[str, ...]:
    value = _text("outputs", value)
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise OptionError(f"invalid value for outputs: {value!r} is not a JSON list") from None
    return parse_outputs(value, key="outputs", exc=OptionError)


def parse_options(options: Mapping[str, Any], spec: ModelSpec, labels: Sequence[str],
                  explain_header: Optional[str] = None) -> RequestOptions:
    """Validate one request's options against the model; :class:`OptionError` (422) otherwise.

    ``explain_header`` is TorchServe's ``explain`` request header (``"True"`` on
    ``/explanations`` and the KServe explain routes), which forces explaining.
    """
    unknown = [str(k) for k in options if k not in OPTION_KEYS]
    if unknown:
        raise OptionError(f"unknown option {unknown[0]!r} (allowed: {', '.join(OPTION_KEYS)}; the "
                          f"image goes in 'data' or the body)")
    n = len(labels)
    explain = str(explain_header).strip().lower() == "true" if explain_header is not None else False
    if not explain and options.get("explain") is not None:
        explain = _parse_bool("explain", options["explain"])
    targets = _parse_targets(options.get("target"), labels)
    topk = min(spec.topk, n)
    if options.get("topk") is not None:
        topk = _parse_int("topk", options["topk"], 1, n)
    method = spec.method
    if options.get("method") is not None:
        m = _text("method", options["method"])
        key = str(m).strip().lower()
        if not isinstance(m, str) or key not in available_methods():
            raise OptionError(f"invalid value for method: {m!r} (allowed: "
                              f"{', '.join(available_methods())})")
        method = key
    outputs = spec.outputs
    if options.get("outputs") is not None:
        outputs = _parse_outputs(options["outputs"])
    return RequestOptions(explain=explain, targets=targets, topk=topk, method=method, outputs=outputs)


def _config_message(exc: ValueError, target_layer: Optional[str]) -> str:
    """An engine error at start-up, phrased as the config key it comes from."""
    msg = str(exc)
    prefix = "invalid value for target_layer"
    if msg.startswith(prefix):
        return "invalid value for handler.target_layer" + msg[len(prefix):]
    return f"invalid value for handler.target_layer: {target_layer!r} ({msg})"


# -- the service ----------------------------------------------------------------------------------
@dataclass
class _Row:
    """A request that parsed and decoded: its batch index, image, input tensor and options."""

    index: int
    image: Image.Image
    tensor: torch.Tensor
    options: RequestOptions
    explanations: list[dict[str, Any]] = field(default_factory=list)


class CamService:
    """One worker's model, engine and settings; :meth:`handle_batch` answers a batch of requests.

    Args:
        model: the classifier in eval mode, on ``device``.
        spec: the validated ``handler:`` block of the model config.
        labels: class labels (default: the class indices as strings, from a warm-up pass).
        device: where the model lives (default: the device of its first parameter).
    """

    def __init__(self, model: nn.Module, spec: ModelSpec, labels: Optional[Sequence[str]] = None,
                 device: Optional[torch.device | str] = None) -> None:
        if device is None:
            first = next(iter(model.parameters()), None)
            device = first.device if first is not None else torch.device("cpu")
        self.model = model
        self.spec = spec
        self.device = torch.device(device)
        try:
            self.engine = CamEngine(model, spec.target_layer, layout=spec.layout)  # type: ignore[arg-type]
        except ValueError as exc:
            raise ConfigError(_config_message(exc, spec.target_layer)) from None
        self.num_classes = self.warm_up()
        if labels is None:
            labels = [str(i) for i in range(self.num_classes)]
        if len(labels) != self.num_classes:
            raise ConfigError(f"invalid value for handler.labels: {len(labels)} labels for a model "
                              f"with {self.num_classes} classes")
        self.labels: list[str] = list(labels)
        self.last_stats = BatchStats()

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, handler_config: Mapping[str, Any] | None,
                       device: torch.device | str = "cpu",
                       weights: Optional[str | Path] = None) -> "CamService":
        """Build the service from a model folder (or an extracted archive) and its ``handler:``
        block: model, weights (``weights_only=True``), labels, warm-up. :class:`ConfigError`
        names the offending key."""
        model_dir = Path(model_dir)
        spec = ModelSpec.from_config(handler_config)
        if spec.labels is None and (model_dir / "index_to_name.json").is_file():
            spec.labels = "index_to_name.json"
        model = build_model(spec, model_dir, device=device, weights=weights)
        svc = cls(model, spec, device=device)
        if spec.labels is not None:
            svc.labels = load_labels(spec, model_dir, svc.num_classes)
        log.info("camserve: serving %s (%d classes, layer %r, input %s) on %s", spec.arch,
                 svc.num_classes, svc.engine.layer_name, spec.input_size, svc.device)
        return svc

    def warm_up(self) -> int:
        """One explain pass and one predict pass on a blank input (locates the target layer when
        the config leaves it out); returns the number of classes."""
        h, w = self.spec.input_size
        x = torch.zeros(1, 3, h, w, device=self.device)
        try:
            res = self.engine(x, method=self.spec.method)
        except ValueError as exc:
            raise ConfigError(_config_message(exc, self.spec.target_layer)) from None
        self.engine.predict(x)
        return int(res.logits.shape[1])

    def describe(self) -> dict[str, Any]:
        """What the model serves and which options it takes (TorchServe's customized describe)."""
        return {"arch": self.spec.arch, "num_classes": self.num_classes, "labels": self.labels,
                "target_layer": self.engine.layer_name, "input_size": list(self.spec.input_size),
                "methods": available_methods(), "options": list(OPTION_KEYS),
                "defaults": {"method": self.spec.method, "topk": min(self.spec.topk, self.num_classes),
                             "outputs": list(self.spec.outputs)},
                "max_pixels": self.spec.max_pixels, "max_targets": MAX_TARGETS,
                "device": str(self.device)}

    # -- one batch ------------------------------------------------------------------------------
    def _prepare(self, index: int, row: Any, explain_header: Optional[str]) -> _Row:
        raw = extract_request(row)
        opts = parse_options(raw.options, self.spec, self.labels, explain_header)
        try:
            img = decode_image(raw.data, max_pixels=self.spec.max_pixels)
        except ImageError as exc:
            raise RequestError.from_image_error(exc) from None
        x = preprocess(img, self.spec.input_size, self.spec.mean, self.spec.std)
        return _Row(index, img, x, opts)

    def handle_batch(self, rows: Sequence[Any],
                     explain_headers: Optional[Sequence[Optional[str]]] = None) -> list[RowResult]:
        """Answer every request of a batch: one :class:`RowResult` per row, in order.

        A bad row gets its own 4xx result; the other rows are answered as usual.
        """
        t0 = time.perf_counter()
        headers = list(explain_headers) if explain_headers is not None else [None] * len(rows)
        if len(headers) != len(rows):
            raise ValueError(f"invalid value for explain_headers: {len(headers)} for {len(rows)} rows")
        results: list[Optional[RowResult]] = [None] * len(rows)
        good: list[_Row] = []
        for i, (row, hdr) in enumerate(zip(rows, headers)):
            try:
                good.append(self._prepare(i, row, hdr))
            except RequestError as exc:
                log.info("camserve: request %d of a batch of %d rejected: %s %s: %s", i, len(rows),
                         exc.code, exc.type, exc.message)
                results[i] = RowResult(exc.code, exc.to_body(), exc.phrase)
        stats = BatchStats(rows=len(rows), error_rows=len(rows) - len(good))
        if good:
            for row, body in zip(good, self._run(good, stats)):
                results[row.index] = RowResult(200, body)
        stats.total_ms = (time.perf_counter() - t0) * 1000.0
        self.last_stats = stats
        log.info("camserve: batch of %d rows (%d explained, %d rejected) in %.1f ms", stats.rows,
                 stats.explained_rows, stats.error_rows, stats.total_ms)
        return [r for r in results if r is not None]

    def _run(self, good: list[_Row], stats: BatchStats) -> list[dict[str, Any]]:
        x = torch.stack([r.tensor for r in good])
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        else:
            x = x.to(self.device)
        explain = [j for j, r in enumerate(good) if r.options.explain]
        t_cam = time.perf_counter()
        if explain:
            logits = self._explain(x, good, explain, stats)
        else:
            logits = self.engine.predict(x)
        probs = torch.softmax(logits.detach().float(), dim=1).cpu()
        if explain:
            for j in explain:
                for e in good[j].explanations:
                    e["score"] = round(float(probs[j, e["target"]]), 6)
            stats.cam_ms = (time.perf_counter() - t_cam) * 1000.0
        bodies = []
        for j, r in enumerate(good):
            top = torch.topk(probs[j], r.options.topk)
            preds = [{"index": int(i), "label": self.labels[int(i)], "score": round(float(s), 6)}
                     for s, i in zip(top.values, top.indices)]
            body: dict[str, Any] = {"predictions": preds}
            if r.options.explain:
                body["explanations"] = r.explanations
            bodies.append(body)
        return bodies

    def _explain(self, x: torch.Tensor, good: list[_Row], explain: list[int],
                 stats: BatchStats) -> torch.Tensor:
        """One forward over the batch, gradients for the explain rows; fills each row's
        ``explanations`` (without scores) and returns the logits of the whole batch."""
        rows = [good[j] for j in explain]
        counts = [len(r.options.targets) if r.options.targets else 1 for r in rows]
        k = max(counts)
        # -1 marks "the top-1 prediction"; shorter target lists are padded with their first entry
        table = []
        for r in rows:
            t = list(r.options.targets) if r.options.targets else [-1]
            table.append(t + [t[0]] * (k - len(t)))
        wanted = torch.tensor(table, dtype=torch.long)

        def targets(sel_logits: torch.Tensor) -> torch.Tensor:
            top1 = sel_logits.argmax(dim=1, keepdim=True).expand(-1, k)
            t = wanted.to(sel_logits.device)
            t = torch.where(t < 0, top1, t)
            return t[:, 0] if k == 1 else t

        by_method = Counter(r.options.method for r in rows)
        main = by_method.most_common(1)[0][0]
        res = self.engine(x, targets=targets, method=main, rows=explain)
        cams = res.cams if k > 1 else res.cams[:, None]  # (R, K, h, w)
        if len(by_method) > 1:
            A = res.activations[:, None]
            G = res.gradients if k > 1 else res.gradients[:, None]
            cams = cams.clone()
            for m in by_method:
                if m == main:
                    continue
                sel = torch.tensor([i for i, r in enumerate(rows) if r.options.method == m],
                                   device=cams.device)
                cams[sel] = get_method(m)(A[sel], G[sel]).to(cams.dtype)
        tgt = (res.targets if k > 1 else res.targets[:, None]).cpu()

        need_maps = [(i, q) for i, r in enumerate(rows) for q in range(counts[i])
                     if MAP_OUTPUTS.intersection(r.options.outputs)]
        maps: dict[tuple[int, int], np.ndarray] = {}
        if need_maps:
            sel_cams = torch.stack([cams[i, q] for i, q in need_maps])
            sizes = [(rows[i].image.height, rows[i].image.width) for i, _ in need_maps]
            maps = dict(zip(need_maps, heatmaps_at_sizes(sel_cams, sizes)))
        raw_rows = [i for i, r in enumerate(rows) if "raw" in r.options.outputs]
        raw_host = cams[raw_rows].float().cpu().numpy() if raw_rows else None
        raw_pos = {i: p for p, i in enumerate(raw_rows)}

        layer = res.layer
        for i, r in enumerate(rows):
            outs = r.options.outputs
            for q in range(counts[i]):
                cls = int(tgt[i, q])
                e: dict[str, Any] = {"target": cls, "label": self.labels[cls], "score": None,
                                     "method": r.options.method, "layer": layer,
                                     "width": r.image.width, "height": r.image.height}
                hm = maps.get((i, q))
                if "bbox" in outs and hm is not None:
                    e["bbox"] = bbox_from_heatmap(hm)
                if "heatmap" in outs and hm is not None:
                    e["heatmap"] = b64(heatmap_png(hm))
                if "overlay" in outs and hm is not None:
                    e["overlay"] = b64(overlay_png(r.image, hm))
                if "raw" in outs and raw_host is not None:
                    arr = raw_host[raw_pos[i], q]
                    e["raw"] = {"shape": [int(arr.shape[0]), int(arr.shape[1])], "data": arr.tolist()}
                r.explanations.append(e)
        stats.explained_rows = len(rows)
        stats.maps = sum(counts)
        return res.logits

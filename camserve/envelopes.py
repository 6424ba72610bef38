"""Request envelopes: one TorchServe request row -> :class:`RawRequest` (image bytes + raw options).

A request row is what TorchServe hands a handler for one request:

* raw body: ``{"body": b"<image bytes>"}``;
* multipart/form-data: one key per form field, ``{"data": b"<image>", "explain": "true", ...}``;
* JSON (``Content-Type: application/json``): ``{"body": {"data": "<base64>", "explain": true}}``
  (or the JSON text itself, when TorchServe did not parse it);
* KServe v1 ``{"instances": [{"data": "<base64>", ...}]}`` (one instance) and v2
  ``{"inputs": [{"name": "data", "datatype": "BYTES", "data": ["<base64>"]}],
  "parameters": {...}}``.

:class:`RawRequest` is the core's request record: :class:`camserve.serving.CamService` takes
rows or records. The rules for one KServe v1 instance (:func:`from_instance`), v2 ``parameters``
(:func:`v2_parameters`) and an image field (:func:`image_from`) live here once; the KServe
predictor (:mod:`camserve.kserve.wire`) reads many images per request with them, so a body gets
the same status and message on either server.

Nothing here validates options (see :mod:`camserve.options`) or decodes pixels. Any input gives
a :class:`RawRequest` or a :class:`camserve.errors.RequestError` (400), never another exception;
user-supplied field names in messages are escaped and cut.

Example::

    >>> import base64
    >>> extract_request({"body": {"data": base64.b64encode(b"img").decode(), "topk": 2}})
    RawRequest(data=b'img', options={'topk': 2})
    >>> extract_request({"data": b"img", "explain": "true"}).options
    {'explain': 'true'}
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any, Mapping

from .errors import InvalidImage, RequestError
from .parsing import log_name

DATA_KEYS: tuple[str, ...] = ("data", "body")
#: at most this many user-supplied field names are listed in a message
LISTED_KEYS = 10


@dataclass(frozen=True)
class RawRequest:
    """One request's image bytes and its options, as sent (not yet validated)."""

    data: bytes
    options: dict[str, Any]


def list_names(keys: Any) -> str:
    """The first :data:`LISTED_KEYS` user-supplied field names, escaped and cut, for a message."""
    names = [log_name(k) for k in list(keys)[:LISTED_KEYS + 1]]
    more = ", ..." if len(names) > LISTED_KEYS else ""
    return ", ".join(names[:LISTED_KEYS]) + more if names else "none"


def _decode_b64(text: str, where: str) -> bytes:
    s = text.strip()
    if s.startswith("data:"):
        head, sep, rest = s.partition(",")
        if not sep or ";base64" not in head:
            raise InvalidImage(f"not an image: {where} is a data URL without ';base64,'")
        s = rest
    s = "".join(s.split())
    if not s:
        raise InvalidImage(f"not an image: {where} is empty")
    s += "=" * (-len(s) % 4)
    alphabet = "-_" if ("-" in s or "_" in s) else "+/"
    try:
        return base64.b64decode(s, altchars=alphabet.encode(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImage(f"not an image: {where} is not valid base64 ({str(exc)[:80]}; "
                           f"{len(text)} characters)") from None


def parse_json(payload: bytes | str) -> Any:
    """JSON text -> value; :class:`RequestError` (400) for bad text, bad UTF-8 or deep nesting."""
    try:
        return json.loads(payload)
    except RecursionError:
        raise RequestError("invalid JSON body: nested too deeply", 400, "InvalidRequest") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        raise RequestError(f"invalid JSON body: {str(exc)[:100]}", 400, "InvalidRequest") from None


def _maybe_json(payload: bytes | str) -> Any:
    """Parse a JSON object sent without a JSON content type; the payload itself otherwise."""
    if payload.lstrip()[:1] not in (b"{", "{"):
        return payload
    return parse_json(payload)


def image_from(value: Any, where: str) -> bytes:
    """Image bytes from a field: bytes as they are, base64 text (plain, URL-safe or a data URL),
    or ``{"b64": "<base64>"}``; :class:`InvalidImage` / :class:`RequestError` (400) otherwise."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return _decode_b64(value, where)
    if isinstance(value, Mapping) and isinstance(value.get("b64"), str):
        return _decode_b64(value["b64"], f"{where}.b64")
    raise RequestError(f"invalid value for {where}: expected a base64 string, got "
                       f"{type(value).__name__}", 400, "InvalidRequest")


def _from_ours(doc: Mapping[str, Any]) -> RawRequest:
    """``{"data": "<base64>", <options>...}``."""
    if "data" not in doc:
        raise RequestError(f"missing field 'data' (a base64-encoded image) in the JSON object; "
                           f"keys sent: {list_names(doc)}", 400, "InvalidRequest")
    options = {k: v for k, v in doc.items() if k != "data"}
    return RawRequest(image_from(doc["data"], "data"), options)


def from_instance(item: Any, where: str = "instances[0]") -> RawRequest:
    """One KServe v1 instance: ours (``{"data": "<base64>", <options>...}``), ``{"b64": ...}`` or
    a base64 string; ``where`` names it in errors. The one rule for an instance, whichever server
    received it (:mod:`camserve.kserve.wire` reads many per request)."""
    if isinstance(item, Mapping) and "b64" not in item:
        return _from_ours(item)
    return RawRequest(image_from(item, where), {})


def v2_parameters(params: Any) -> dict[str, Any]:
    """KServe v2 request ``parameters`` as options: absent/null is none, an object is taken as
    sent, anything else is a :class:`RequestError` (400) — the one rule for every server."""
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise RequestError(f"invalid value for parameters: expected an object, got "
                           f"{type(params).__name__}", 400, "InvalidRequest")
    return dict(params)


def _from_v1(doc: Mapping[str, Any]) -> RawRequest:
    """KServe v1: ``{"instances": [<one instance>]}`` (see :func:`from_instance`)."""
    inst = doc["instances"]
    if not isinstance(inst, list) or len(inst) != 1:
        got = len(inst) if isinstance(inst, list) else type(inst).__name__
        raise RequestError(f"invalid value for instances: expected a list of exactly one "
                           f"instance, got {got}", 400, "InvalidRequest")
    return from_instance(inst[0])


def _from_v2(doc: Mapping[str, Any]) -> RawRequest:
    """KServe v2: one BYTES input holding one base64 image; options in ``parameters``."""
    inputs = doc["inputs"]
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], Mapping):
        raise RequestError("invalid value for inputs: expected a list of exactly one input "
                           "object", 400, "InvalidRequest")
    values = inputs[0].get("data")
    if isinstance(values, list) and len(values) == 1:
        values = values[0]
    params = v2_parameters(doc.get("parameters"))
    return RawRequest(image_from(values, "inputs[0].data"), params)


def from_json(doc: Mapping[str, Any]) -> RawRequest:
    """A parsed JSON request: ours, KServe v1 (one instance) or KServe v2 (one BYTES input)."""
    if "instances" in doc and "data" not in doc:
        return _from_v1(doc)
    if "inputs" in doc and "data" not in doc:
        return _from_v2(doc)
    return _from_ours(doc)


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
                           f"{list_names(row)}", 400, "InvalidRequest")
    fields = {k: v for k, v in row.items() if k not in DATA_KEYS}
    payload = row[key]
    if isinstance(payload, (bytes, bytearray, memoryview)):
        payload = _maybe_json(bytes(payload))
    elif isinstance(payload, str):
        payload = _maybe_json(payload)
    if isinstance(payload, Mapping):
        req = from_json(payload)
        return RawRequest(req.data, {**fields, **req.options})
    if isinstance(payload, list):
        raise RequestError("invalid JSON body: expected an object {\"data\": \"<base64>\", ...}, "
                           "got a list", 400, "InvalidRequest")
    return RawRequest(image_from(payload, key), fields)

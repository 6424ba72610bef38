"""KServe v1/v2 bodies -> the core's request records, one per image, in order.

Each image of a request becomes a :class:`camserve.envelopes.RawRequest` (its bytes and its options
as sent) or, when that image cannot be read, the :class:`camserve.errors.RequestError` it failed
with: that row's answer, beside its request-mates' answers. The rule for one image is
:mod:`camserve.envelopes`' own (:func:`~camserve.envelopes.from_instance`,
:func:`~camserve.envelopes.image_from`, :func:`~camserve.envelopes.v2_parameters`), so a body gets
the same status and message here and on the TorchServe handler.

Options are not read here: every key of a v1 instance but ``data``, and every v2 request parameter,
goes to :func:`camserve.options.parse_options` with its value as sent (v2 parameters apply to every
image of the request). A request with nothing to answer raises :class:`RequestError`: 400
``InvalidRequest`` (no ``instances`` list, no BYTES input named ``data``, no images, bad JSON,
``parameters`` that is not an object) or 413 ``WorkTooLarge`` (more than ``max_instances`` images).

* v1: ``{"instances": [<instance>, ...]}``, an instance being ``{"data": "<base64>", ...options}``,
  ``{"b64": "<base64>"}`` or a base64 string;
* v2 over REST: ``{"id"?, "inputs": [{"name": "data", "datatype": "BYTES", "shape": [N],
  "data": [<base64>, ...]}], "parameters"?: {...}}`` (:func:`read_v2`);
* v2 as KServe's ``InferRequest`` (gRPC, where elements are raw bytes and parameters gRPC values;
  REST with KServe's binary data extension): :func:`read_infer_request`.

Nothing here imports kserve. The manual: ``docs/kserve.md``.

Example::

    >>> req = read_v1({"instances": [{"data": "aGk=", "topk": 2}, "%%"]})
    >>> req.records[0]
    RawRequest(data=b'hi', options={'topk': 2})
    >>> req.records[1].code, req.records[1].type
    (400, 'InvalidImage')
    >>> read_v2({"inputs": [{"name": "data", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}],
    ...          "parameters": {"explain": True}}).records
    (RawRequest(data=b'hi', options={'explain': True}),)
    >>> overall_status([400, 200]), overall_status([422, 413])
    (200, 422)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

from ..envelopes import RawRequest, from_instance, image_from, list_names, parse_json, v2_parameters
from ..errors import RequestError, WorkTooLarge
from ..parsing import short_repr

DATA_INPUT = "data"
RESULT_OUTPUT = "result"
DEFAULT_MAX_INSTANCES = 64

#: One image of a request: its record, or the error it could not be read with.
Record = Union[RawRequest, RequestError]


@dataclass(frozen=True)
class WireRequest:
    """One KServe request as the core's records: ``protocol`` ``"v1"`` or ``"v2"``, one record per
    image in order, the v2 request ``id`` (None when none was sent), whether it came over gRPC."""

    protocol: str
    records: tuple[Record, ...]
    request_id: Optional[str] = None
    grpc: bool = False


def overall_status(statuses: Sequence[int]) -> int:
    """200 when any image succeeded, else the first failed image's code."""
    if not statuses or any(s == 200 for s in statuses):
        return 200
    return statuses[0]


def _invalid(message: str) -> RequestError:
    return RequestError(message, 400, "InvalidRequest")


def _check_count(n: int, limit: int, what: str) -> None:
    if n == 0:
        raise _invalid(f"invalid value for {what}: empty (send at least one image)")
    if n > limit:
        raise WorkTooLarge(f"invalid value for {what}: {n} images in one request (at most "
                           f"{limit}; split the request)")


def _document(payload: Any) -> Any:
    """A body as the server handed it: JSON text or bytes parsed (400 when it is not JSON)."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return parse_json(bytes(payload))
    if isinstance(payload, str):
        return parse_json(payload)
    return payload


def _record(read: Callable[[], RawRequest]) -> Record:
    """The record ``read`` returns, or the :class:`RequestError` it raises (that image's answer)."""
    try:
        return read()
    except RequestError as exc:
        return exc


def read_v1(payload: Any, max_instances: int = DEFAULT_MAX_INSTANCES) -> WireRequest:
    """The records of a v1 body (a parsed JSON object, or its text/bytes when the request was not
    sent as ``application/json``): one per instance, in order."""
    doc = _document(payload)
    if not isinstance(doc, Mapping) or "instances" not in doc:
        sent = list_names(doc) if isinstance(doc, Mapping) else type(doc).__name__
        raise _invalid(f"missing field 'instances' (a list of {{\"data\": \"<base64>\", "
                       f"...options}} objects); sent: {sent}")
    instances = doc["instances"]
    if not isinstance(instances, list):
        raise _invalid(f"invalid value for instances: expected a list, got "
                       f"{type(instances).__name__}")
    _check_count(len(instances), max_instances, "instances")
    return WireRequest("v1", tuple(_record(functools.partial(from_instance, item,
                                                             f"instances[{i}]"))
                                   for i, item in enumerate(instances)))


def read_v2(payload: Any, max_instances: int = DEFAULT_MAX_INSTANCES) -> WireRequest:
    """The records of a v2 REST body (a parsed JSON object, or its text/bytes): one per element
    of the BYTES input ``data``, each with the request's ``parameters`` as its options."""
    doc = _document(payload)
    if not isinstance(doc, Mapping):
        raise _invalid(f"invalid JSON body: expected an object {{\"inputs\": [...], "
                       f"\"parameters\": {{...}}}}, got {type(doc).__name__}")
    if "inputs" not in doc:
        raise _invalid(f"missing field 'inputs' (one BYTES input named '{DATA_INPUT}'); sent: "
                       f"{list_names(doc)}")
    inputs = doc["inputs"]
    if not isinstance(inputs, list):
        raise _invalid(f"invalid value for inputs: expected a list, got {type(inputs).__name__}")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _invalid(f"invalid value for id: expected a string, got {type(request_id).__name__}")
    triples = [(i.get("name"), i.get("datatype"), i.get("data")) if isinstance(i, Mapping)
               else (None, None, None) for i in inputs]
    return _read_v2(triples, doc.get("parameters"), request_id, False, max_instances)


def _plain(value: Any) -> Any:
    """A gRPC ``InferParameter`` as its plain value (other values pass through)."""
    if callable(getattr(value, "WhichOneof", None)):
        which = value.WhichOneof("parameter_choice")
        return getattr(value, which) if which else None
    return value


def read_infer_request(request: Any, max_instances: int = DEFAULT_MAX_INSTANCES) -> WireRequest:
    """The records of KServe's ``InferRequest`` (gRPC; REST with the binary data extension): as
    :func:`read_v2`, its parameters as plain values."""
    params = request.parameters
    if params is not None and not isinstance(params, (str, bytes)) and \
            callable(getattr(params, "items", None)):
        params = {k: _plain(v) for k, v in params.items()}
    triples = [(i.name, i.datatype, i.data) for i in (request.inputs or [])]
    request_id = request.id if isinstance(request.id, str) and request.id else None
    return _read_v2(triples, params, request_id, bool(request.from_grpc), max_instances)


def _element(item: Any, where: str, options: Mapping[str, Any]) -> RawRequest:
    return RawRequest(image_from(item, where), dict(options))


def _read_v2(inputs: list[tuple[Any, Any, Any]], params: Any, request_id: Optional[str],
             grpc: bool, max_instances: int) -> WireRequest:
    """v2 inputs as (name, datatype, data) and the request parameters -> records."""
    names = [name for name, _, _ in inputs]
    if names != [DATA_INPUT]:
        raise _invalid(f"invalid value for inputs: expected exactly one input named "
                       f"'{DATA_INPUT}' (BYTES, one base64 image per element), got "
                       f"{short_repr(names)}")
    _, datatype, data = inputs[0]
    if not isinstance(datatype, str) or datatype.upper() != "BYTES":
        raise _invalid(f"invalid value for inputs[0].datatype: {short_repr(datatype)} "
                       f"(allowed: BYTES)")
    if hasattr(data, "tolist"):
        data = data.tolist()
    if not isinstance(data, list):
        raise _invalid(f"invalid value for inputs[0].data: expected a list, got "
                       f"{type(data).__name__}")
    if data and isinstance(data[0], list):  # shape [N, 1] sent nested
        data = [x for part in data for x in (part if isinstance(part, list) else [part])]
    _check_count(len(data), max_instances, "inputs[0].data")
    options = v2_parameters(params)
    records = tuple(_record(functools.partial(_element, item, f"inputs[0].data[{i}]", options))
                    for i, item in enumerate(data))
    return WireRequest("v2", records, request_id, grpc)

"""camserve.kserve.wire: KServe v1/v2 bodies -> the core's request records, one per image.

The rule for one image is the envelope's own, so a body gets the same status and message on the
KServe predictor and on the TorchServe handler: checked case by case (the ``parameters`` cases that
were 422 on one server and 400, or ignored, on the other) and as properties over any JSON.
"""
from __future__ import annotations

import base64
import json
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from camserve.envelopes import RawRequest, extract_request
from camserve.errors import RequestError
from camserve.kserve.wire import (WireRequest, overall_status, read_infer_request, read_v1,
                                  read_v2)


def _v2_json(data: Any, parameters: Any = ..., name: Any = "data",
             datatype: Any = "BYTES") -> dict[str, Any]:
    body: dict[str, Any] = {"inputs": [{"name": name, "datatype": datatype, "shape": [1],
                                        "data": data}]}
    if parameters is not ...:
        body["parameters"] = parameters
    return body


def _infer_request(inputs: list[Any], parameters: Any = None, grpc: bool = False) -> Any:
    """What read_infer_request reads of KServe's InferRequest."""
    return SimpleNamespace(inputs=inputs, parameters=parameters, id=None, from_grpc=grpc)


def _outcome(read: Any) -> tuple[Any, ...]:
    """A record or a raised RequestError as comparable data."""
    try:
        rec = read() if callable(read) else read
    except RequestError as exc:
        rec = exc
    if isinstance(rec, RequestError):
        return ("error", rec.code, rec.type, rec.message)
    return ("ok", rec.data, rec.options)


# -- v1 -----------------------------------------------------------------------------------------------
def test_read_v1_one_record_per_instance_in_order() -> None:
    instances = [{"data": "QQ==", "topk": 1}, "Qg==", {"b64": "Qw=="}]
    req = read_v1({"instances": instances})
    assert req == WireRequest("v1", (RawRequest(b"A", {"topk": 1}), RawRequest(b"B", {}),
                                     RawRequest(b"C", {})))
    # each record is what the handler's envelope reads of that instance sent alone
    assert list(req.records) == [extract_request({"body": {"instances": [i]}}) for i in instances]
    assert read_v1(b'{"instances": ["QQ=="]}').records == (RawRequest(b"A", {}),)


@pytest.mark.parametrize("payload, code, words", [
    ({"data": "QQ=="}, 400, "missing field 'instances'"),
    ({"instances": "QQ=="}, 400, "expected a list"),
    ({"instances": []}, 400, "empty"),
    ({"instances": ["QQ=="] * 5}, 413, "at most 4"),
    (b"{not json", 400, "invalid JSON body"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    ([1, 2], 400, "sent: list"),
])
def test_read_v1_refuses_requests_without_instances(payload: Any, code: int, words: str) -> None:
    with pytest.raises(RequestError) as info:
        read_v1(payload, max_instances=4)
    assert info.value.code == code
    assert info.value.to_body()["code"] == code and words in info.value.message


def test_a_bad_instance_beside_good_ones_is_its_own_error() -> None:
    instances = [{"data": "QQ=="}, 5, {"data": "%%%"}, {"topk": 1}, {"data": "Qg==", "x": [1]}]
    recs = read_v1({"instances": instances}).records
    assert [type(r).__name__ for r in recs] == ["RawRequest", "RequestError", "InvalidImage",
                                                "RequestError", "RawRequest"]
    assert [getattr(r, "code", 200) for r in recs] == [200, 400, 400, 400, 200]
    assert "instances[1]" in recs[1].message  # the instance is named by its position
    assert "missing field 'data'" in recs[3].message
    assert recs[4] == RawRequest(b"B", {"x": [1]})  # unknown options are options.py's to refuse


def test_field_names_in_messages_are_escaped_and_cut() -> None:
    forged = "x\n2026-11-28 INFO fake log line" + "y" * 500
    with pytest.raises(RequestError) as info:
        read_v1({forged: 1, **{f"k{i}": i for i in range(1000)}})
    assert "\n" not in info.value.message and len(info.value.message) < 1000


# -- v2 -----------------------------------------------------------------------------------------------
def test_read_infer_request_applies_parameters_to_every_element() -> None:
    inp = SimpleNamespace(name="data", datatype="BYTES", data=["QQ==", b"raw"])
    req = read_infer_request(_infer_request([inp], {"explain": True, "topk": 2}))
    assert [r.data for r in req.records] == [b"A", b"raw"]
    assert all(r.options == {"explain": True, "topk": 2} for r in req.records)
    assert req.protocol == "v2" and not req.grpc


def test_read_v2_json_applies_parameters_to_every_element_and_keeps_the_id() -> None:
    body = _v2_json([["QQ=="], ["Qg=="], ["%%"]], {"explain": True})  # shape [3, 1], nested
    body["id"] = "req-7"
    req = read_v2(json.dumps(body).encode())
    assert req.request_id == "req-7" and len(req.records) == 3
    assert req.records[:2] == (RawRequest(b"A", {"explain": True}), RawRequest(b"B", {"explain": True}))
    assert req.records[2].code == 400 and "inputs[0].data[2]" in req.records[2].message


def test_grpc_parameters_become_plain_values() -> None:
    from camserve.kserve import import_kserve

    import_kserve()
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    params = {"explain": pb.InferParameter(bool_param=True),
              "topk": pb.InferParameter(int64_param=2),
              "target": pb.InferParameter(string_param="star,1"),
              "unset": pb.InferParameter()}
    inp = SimpleNamespace(name="data", datatype="BYTES", data=[b"png"])
    req = read_infer_request(_infer_request([inp], params, grpc=True))
    assert req.grpc and req.records == (RawRequest(b"png", {"explain": True, "topk": 2,
                                                            "target": "star,1",
                                                            "unset": None}),)


@pytest.mark.parametrize("inputs, words", [
    ([SimpleNamespace(name="image", datatype="BYTES", data=["QQ=="])], "named 'data'"),
    ([SimpleNamespace(name="data", datatype="FP32", data=[1.0])], "allowed: BYTES"),
    ([], "named 'data'"),
    ([SimpleNamespace(name="data", datatype="BYTES", data=[])], "empty"),
    ([SimpleNamespace(name="data", datatype="BYTES", data="QQ==")], "expected a list"),
])
def test_read_v2_refuses_other_inputs(inputs: list[Any], words: str) -> None:
    with pytest.raises(RequestError) as info:
        read_infer_request(_infer_request(inputs))
    assert info.value.code == 400 and words in info.value.message
    json_inputs = [{"name": i.name, "datatype": i.datatype, "shape": [1], "data": i.data}
                   for i in inputs]
    with pytest.raises(RequestError) as info:  # the same refusal from the REST JSON body
        read_v2({"inputs": json_inputs})
    assert info.value.code == 400 and words in info.value.message


@pytest.mark.parametrize("body, words", [
    ({"data": "QQ=="}, "missing field 'inputs'"),
    ({"inputs": {"name": "data"}}, "expected a list"),
    ({"inputs": [5]}, "named 'data'"),
    ({**_v2_json(["QQ=="]), "id": 5}, "invalid value for id"),
    ([1], "expected an object"),
])
def test_read_v2_refuses_bodies_kserve_validation_would_422(body: Any, words: str) -> None:
    with pytest.raises(RequestError) as info:
        read_v2(body)
    assert info.value.code == 400 and info.value.type == "InvalidRequest"
    assert words in info.value.message


def test_more_images_than_allowed_is_413() -> None:
    with pytest.raises(RequestError) as info:
        read_v2(_v2_json(["QQ=="] * 3), max_instances=2)
    assert info.value.code == 413 and info.value.type == "WorkTooLarge"


# -- one status everywhere ----------------------------------------------------------------------------
BAD_PARAMETERS = ["x", [1], 5, 2.5, True, [], "", 0, False]


@pytest.mark.parametrize("params", BAD_PARAMETERS)
def test_parameters_that_are_not_an_object_are_400_on_both_servers(params: Any) -> None:
    """Before: the KServe predictor answered 422 (its pydantic validation, or InvalidOption) and
    the TorchServe handler 400 — or nothing at all for [], "", 0 and false, which it ignored."""
    body = _v2_json(["QQ=="], params)
    with pytest.raises(RequestError) as kserve:
        read_v2(body)
    with pytest.raises(RequestError) as handler:
        extract_request({"body": body})
    inp = SimpleNamespace(name="data", datatype="BYTES", data=["QQ=="])
    with pytest.raises(RequestError) as binary:  # KServe's binary data extension passes them raw
        read_infer_request(_infer_request([inp], params))
    for err in (kserve.value, handler.value, binary.value):
        assert (err.code, err.type) == (400, "InvalidRequest")
        assert err.message == handler.value.message and "parameters" in err.message


def test_options_pass_through_as_sent() -> None:
    """Options are options.py's to read: whatever a new option's value (lists, objects, numbers),
    wire hands it on untouched, on v1 and v2 alike."""
    opts = {"boxes": [[0, 0, 8, 8]], "region": {"x": 1, "y": [2]}, "threshold": 0.25,
            "reference": "aGk=", "target": ["star", 1], "explain": None}
    assert read_v1({"instances": [{"data": "QQ==", **opts}]}).records[0].options == opts
    assert read_v2(_v2_json(["QQ==", "Qg=="], opts)).records[1].options == opts


def test_overall_status() -> None:
    assert overall_status([200]) == 200
    assert overall_status([413, 200, 400]) == 200
    assert overall_status([422, 400]) == 422


# -- properties ---------------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=20)
b64_text = st.binary(max_size=32).map(lambda b: base64.b64encode(b).decode())
image_field = st.one_of(b64_text, st.text(max_size=20), json_values,
                        st.fixed_dictionaries({"b64": st.one_of(b64_text, st.text(max_size=10))}))
instance = st.one_of(image_field, st.dictionaries(
    st.sampled_from(["data", "topk", "boxes", "x\ny"]), image_field, max_size=3))


@settings(max_examples=200, deadline=None)
@given(st.one_of(json_values, st.fixed_dictionaries({"instances": st.one_of(
    st.lists(instance, max_size=4), json_values)})))
def test_any_v1_body_gives_records_or_a_request_error(payload: Any) -> None:
    for sent in (payload, json.dumps(payload).encode()):
        try:
            req = read_v1(sent, max_instances=3)
        except RequestError as exc:
            assert exc.code in (400, 413) and len(exc.message) < 1000
            continue
        assert len(req.records) == len(payload["instances"])
        for rec in req.records:
            assert isinstance(rec, RawRequest) or (isinstance(rec, RequestError) and rec.code == 400)


@settings(max_examples=200, deadline=None)
@given(instance)
def test_an_instance_reads_as_the_handler_reads_it(item: Any) -> None:
    [rec] = read_v1({"instances": [item]}).records
    assert _outcome(rec) == _outcome(lambda: extract_request({"body": {"instances": [item]}}))


element = st.one_of(b64_text, st.text(max_size=20), st.binary(max_size=8), st.none(),
                    st.integers(), st.dictionaries(st.text(max_size=4), json_values, max_size=2),
                    st.fixed_dictionaries({"b64": b64_text}))


@settings(max_examples=200, deadline=None)
@given(element, st.one_of(st.just(...), json_values))
def test_a_v2_element_reads_as_the_handler_reads_it(item: Any, params: Any) -> None:
    """Same parameters outcome (message included); same status and type for the element."""
    body = _v2_json([item], params)
    handler = _outcome(lambda: extract_request({"body": body}))
    try:
        [rec] = read_v2(body).records
    except RequestError as exc:  # a request-level refusal: the parameters
        assert "parameters" in exc.message and handler == _outcome(exc)
        return
    got = _outcome(rec)
    assert got[:3] == handler[:3] if got[0] == "error" else got == handler

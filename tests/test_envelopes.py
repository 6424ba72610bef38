"""camserve.envelopes: raw, multipart, JSON and KServe v1/v2 request rows -> RawRequest.

Property tests: for any row (arbitrary bytes, text, nested JSON, KServe-shaped documents) the
result is a RawRequest or a camserve RequestError, never another exception.
"""
from __future__ import annotations

import base64
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from camserve.envelopes import RawRequest, extract_request
from camserve.errors import RequestError


def test_raw_body_is_the_image(png):
    data = png()
    req = extract_request({"body": data})
    assert req.data == data and req.options == {}
    assert extract_request(bytearray(data)).data == data


def test_multipart_fields_are_options(png):
    data = png()
    req = extract_request({"data": data, "explain": "true", "target": b"2"})
    assert req.data == data
    assert req.options == {"explain": "true", "target": b"2"}


def test_json_body_with_base64(png):
    data = png()
    doc = {"data": base64.b64encode(data).decode(), "explain": True, "topk": 2}
    req = extract_request({"body": doc})
    assert req.data == data and req.options == {"explain": True, "topk": 2}
    # JSON that TorchServe did not parse (TS_DECODE_INPUT_REQUEST=false) or sent as text
    assert extract_request({"body": json.dumps(doc).encode()}).options["topk"] == 2
    assert extract_request({"body": json.dumps(doc)}).data == data


def test_base64_variants(png):
    data = png()
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    assert extract_request({"body": {"data": url}}).data == data
    urlsafe = base64.urlsafe_b64encode(data).decode().rstrip("=")
    assert extract_request({"body": {"data": urlsafe}}).data == data
    wrapped = "\n".join(base64.b64encode(data).decode()[i:i + 60] for i in range(0, 400, 60))
    assert extract_request({"body": {"data": wrapped}}).data == data[:300]


@pytest.mark.parametrize("doc, code, needle", [
    ({"data": "###not base64###"}, 400, "not valid base64"),
    ({"data": ""}, 400, "empty"),
    ({"data": 12}, 400, "expected a base64 string"),
    ({"image": "abcd"}, 400, "missing field 'data'"),
    ({"instances": [{"data": "aGk="}, {"data": "aGk="}]}, 400, "exactly one instance"),
    ({"inputs": [{"data": ["aGk="]}], "parameters": [1]}, 400, "parameters"),
])
def test_bad_json_requests(doc, code, needle):
    with pytest.raises(RequestError) as ei:
        extract_request({"body": doc})
    assert ei.value.code == code and needle in ei.value.message
    body = ei.value.to_body()
    assert set(body) == {"code", "type", "message"} and body["code"] == code


def test_invalid_json_text_and_lists():
    with pytest.raises(RequestError, match="invalid JSON body"):
        extract_request({"body": b'{"data": '})
    with pytest.raises(RequestError, match="got a list"):
        extract_request({"body": [1, 2]})
    with pytest.raises(RequestError, match="missing image") as ei:
        extract_request({"explain": "true"})
    assert ei.value.code == 400


def test_json_nested_thousands_deep_is_400():
    deep = b'{"data": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(RequestError) as ei:
        extract_request({"body": deep})
    assert ei.value.code == 400 and "nested too deeply" in ei.value.message


def test_kserve_instances_do_not_recurse():
    doc: dict = {"data": "aGk="}
    for _ in range(5000):
        doc = {"instances": [doc]}
    with pytest.raises(RequestError, match="missing field 'data'"):
        extract_request({"body": doc})


def test_field_names_are_escaped_and_cut_in_messages():
    forged = "x\n2026-11-28 INFO fake log line" + "y" * 500
    with pytest.raises(RequestError) as ei:
        extract_request({forged: b"1"})
    assert "\n" not in ei.value.message and len(ei.value.message) < 400
    with pytest.raises(RequestError) as ei:
        extract_request({"body": {forged: 1, **{f"k{i}": i for i in range(1000)}}})
    assert "\n" not in ei.value.message and len(ei.value.message) < 1000


def test_kserve_v1_and_v2_bodies(png):
    data = png()
    b = base64.b64encode(data).decode()
    v1 = extract_request({"body": {"instances": [{"data": b, "target": 1}]}})
    assert v1.data == data and v1.options == {"target": 1}
    assert extract_request({"body": {"instances": [{"b64": b}]}}).data == data
    v2 = extract_request({"body": {"inputs": [{"name": "data", "datatype": "BYTES", "shape": [1],
                                               "data": [b]}], "parameters": {"method": "hirescam"}}})
    assert v2.data == data and v2.options == {"method": "hirescam"}


# -- properties ---------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30)
b64_text = st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode())
image_field = st.one_of(b64_text, st.text(max_size=40), json_values,
                        st.fixed_dictionaries({"b64": st.one_of(b64_text, st.text(max_size=20))}))
ours = st.dictionaries(st.sampled_from(["data", "explain", "target", "x\ny"]), image_field, max_size=4)
v1 = st.fixed_dictionaries({"instances": st.one_of(st.lists(st.one_of(ours, image_field), max_size=2),
                                                   json_values)})
v2 = st.fixed_dictionaries({"inputs": st.one_of(
    st.lists(st.fixed_dictionaries({"name": st.just("data"), "datatype": st.just("BYTES"),
                                    "data": st.one_of(st.lists(image_field, max_size=2), image_field)}),
             max_size=2), json_values),
    "parameters": st.one_of(st.none(), json_values)})
documents = st.one_of(ours, v1, v2, json_values)
rows = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200),
    documents.map(lambda d: {"body": d}),
    documents.map(lambda d: {"body": json.dumps(d).encode()}),
    st.dictionaries(st.one_of(st.text(max_size=10), st.sampled_from(["data", "body"])),
                    st.one_of(st.binary(max_size=40), st.text(max_size=40), json_values), max_size=4),
    json_values,
)


def _check(row) -> None:
    try:
        out = extract_request(row)
    except RequestError as exc:
        assert exc.code == 400 and exc.type in ("InvalidImage", "InvalidRequest")
        assert "\n" not in exc.message and len(exc.message) < 2000
        return
    assert isinstance(out, RawRequest) and isinstance(out.data, bytes)
    assert isinstance(out.options, dict)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows)
def test_any_row_is_a_request_or_a_request_error(row):
    _check(row)


@pytest.mark.slow
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows)
def test_any_row_is_a_request_or_a_request_error_many(row):
    _check(row)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 20000), st.sampled_from(["[", "{\"a\":"]))
def test_any_nesting_depth_is_a_request_or_a_request_error(depth, opener):
    closer = "]" if opener == "[" else "}"
    _check({"body": ('{"data": ' + opener * depth + "1" + closer * depth + "}").encode()})

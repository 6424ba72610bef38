"""camserve.options: strict option parsing (422 naming the option), and the serving limits.

Property test: any options mapping gives RequestOptions or an OptionError, never another
exception, and the message is bounded and has no raw newline.
"""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from camserve.errors import OptionError
from camserve.methods import available_methods
from camserve.models import ConfigError
from camserve.options import (MAX_TARGETS, TS_DEFAULT_MAX_RESPONSE_SIZE, RequestOptions,
                              ServingLimits, parse_options)
from camserve.testing.nets import TINY_LABELS, tiny_spec

LABELS = list(TINY_LABELS)
spec_of = tiny_spec


def test_defaults_come_from_the_spec():
    spec = spec_of(method="layercam", topk=10, outputs=["overlay"])
    o = parse_options({}, spec, LABELS)
    assert (o.explain, o.targets, o.topk, o.method, o.outputs) == (False, None, len(LABELS),
                                                                   "layercam", ("overlay",))


@pytest.mark.parametrize("forced, option, expected", [
    (True, None, True), (True, "false", True), (False, None, False), (False, "true", True),
    (False, "1", True), (False, "yes", True), (False, True, True), (False, "no", False),
    (False, 0, False), (False, b"TRUE", True),
])
def test_explain_forced_or_from_the_option(forced, option, expected):
    opts = {} if option is None else {"explain": option}
    assert parse_options(opts, spec_of(), LABELS, explain=forced).explain is expected


@pytest.mark.parametrize("value, expected", [
    (2, (2,)), ("2", (2,)), ("triangle", (2,)), ("Triangle", (2,)), (["star", 0], (3, 0)),
    ("square, 5", (1, 5)), ("[1, \"ring\"]", (1, 5)), (None, None), ("", None), (b"star", (3,)),
])
def test_target_forms(value, expected):
    assert parse_options({"target": value}, spec_of(), LABELS).targets == expected


@pytest.mark.parametrize("opts, needle", [
    ({"target": 6}, "out of range"),
    ({"target": -1}, "out of range"),
    ({"target": "hexagon"}, "unknown label 'hexagon' (known: circle, square"),
    ({"target": []}, "empty list"),
    ({"target": 1.5}, "a class index"),
    ({"target": list(range(MAX_TARGETS + 1))}, f"at most {MAX_TARGETS}"),
    ({"target": "²"}, "invalid value for target"),
    ({"target": "+-1"}, "invalid value for target"),
    ({"target": "9" * 4000}, "invalid value for target"),
    ({"target": "[" * 3000}, "invalid value for target"),
    ({"topk": 0}, "topk: 0 (allowed: 1..6)"),
    ({"topk": 7}, "allowed: 1..6"),
    ({"topk": "three"}, "an integer"),
    ({"topk": True}, "an integer"),
    ({"topk": "²"}, "an integer"),
    ({"topk": "+-1"}, "an integer"),
    ({"topk": "1" * 4000}, "an integer"),
    ({"topk": 10 ** 5000}, "allowed: 1..6"),
    ({"method": "gradcam9"}, "allowed: " + ", ".join(available_methods(cheap=True))),
    ({"method": 3}, "invalid value for method"),
    ({"outputs": "heatmap,png"}, "allowed: heatmap, overlay, raw, bbox"),
    ({"outputs": ""}, "empty"),
    ({"outputs": [1, 2]}, "a list of names"),
    ({"outputs": "[" * 3000}, "not a JSON list"),
    ({"explain": "maybe"}, "allowed: true, false"),
    ({"explain": b"\xff"}, "not UTF-8"),
    ({"traget": 1}, "unknown option 'traget' (allowed: explain, target, topk, method, outputs"),
])
def test_bad_options_are_422(opts, needle):
    with pytest.raises(OptionError) as ei:
        parse_options(opts, spec_of(), LABELS)
    assert ei.value.code == 422 and ei.value.type == "InvalidOption"
    assert needle in ei.value.message
    assert len(ei.value.message) < 600


def test_option_strings_have_a_length_limit():
    limits = ServingLimits(max_option_length=50)
    with pytest.raises(OptionError, match="60 characters \\(at most 50\\)"):
        parse_options({"method": "x" * 60}, spec_of(), LABELS, limits=limits)
    with pytest.raises(OptionError, match="at most 50"):
        parse_options({"target": b"1," * 30}, spec_of(), LABELS, limits=limits)
    # a 21 MB method field: refused with a short message, never echoed
    with pytest.raises(OptionError) as ei:
        parse_options({"method": "m" * 21_000_000}, spec_of(), LABELS)
    assert len(ei.value.message) < 200


def test_echoed_values_are_cut_and_keys_escaped():
    with pytest.raises(OptionError) as ei:
        parse_options({"method": "z" * 3000}, spec_of(), LABELS)
    assert len(ei.value.message) < 300 and "zzz..." in ei.value.message
    with pytest.raises(OptionError) as ei:
        parse_options({"bad\nINFO forged line" + "k" * 500: 1}, spec_of(), LABELS)
    assert "\n" not in ei.value.message and "\\n" in ei.value.message
    assert len(ei.value.message) < 300


def test_method_and_outputs_are_normalised():
    o = parse_options({"method": "GradCAM++", "outputs": "RAW, bbox,raw"}, spec_of(), LABELS)
    assert o.method == "gradcam++" and o.outputs == ("raw", "bbox")
    assert parse_options({"outputs": '["overlay"]'}, spec_of(), LABELS).outputs == ("overlay",)


def test_serving_limits_from_spec_and_env():
    spec = spec_of()
    assert ServingLimits.from_spec(spec, env={}) == ServingLimits()
    assert ServingLimits().max_response_size == TS_DEFAULT_MAX_RESPONSE_SIZE == 6553500
    assert ServingLimits.from_spec(spec, env={"TS_MAX_RESPONSE_SIZE": "1000"}).max_response_size == 1000
    lim = ServingLimits.from_spec(spec_of(max_response_size=99, max_option_length=7),
                                  env={"TS_MAX_RESPONSE_SIZE": "1000"})
    assert (lim.max_response_size, lim.max_option_length) == (99, 7)
    assert ServingLimits.from_spec(spec, env={"TS_MAX_RESPONSE_SIZE": "²"}) == ServingLimits()
    for bad in (0, -1, "10", True, 1.5):
        with pytest.raises(ConfigError, match="handler.max_response_size"):
            spec_of(max_response_size=bad)


# -- properties ---------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)
numbers_as_text = st.one_of(st.integers().map(str), st.from_regex(r"[+\- ]{0,3}[0-9²³¹٣]{0,30}",
                                                                  fullmatch=True))
values = st.one_of(json_values, st.binary(max_size=40), numbers_as_text,
                   st.lists(st.one_of(st.sampled_from(LABELS), numbers_as_text), max_size=20).map(",".join),
                   st.sampled_from(LABELS + available_methods() + ["heatmap,bbox", "[1, 2]", "RAW"]))
option_maps = st.dictionaries(
    st.one_of(st.sampled_from(["explain", "target", "topk", "method", "outputs"]), st.text(max_size=10)),
    values, max_size=5)


def _check_options(options, forced) -> None:
    try:
        out = parse_options(options, spec_of(), LABELS, explain=forced)
    except OptionError as exc:
        assert exc.code == 422 and "\n" not in exc.message and len(exc.message) < 1000
        return
    assert isinstance(out, RequestOptions)
    assert 1 <= out.topk <= len(LABELS) and out.method in available_methods()
    assert out.targets is None or all(0 <= t < len(LABELS) for t in out.targets)
    assert out.explain or not forced


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(option_maps, st.booleans())
def test_any_options_are_request_options_or_an_option_error(options, forced):
    _check_options(options, forced)


@pytest.mark.slow
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(option_maps, st.booleans())
def test_any_options_are_request_options_or_an_option_error_many(options, forced):
    _check_options(options, forced)
